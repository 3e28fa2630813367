"""Weights in, weights out: diffusers directories, original single-file checkpoints, in-memory diffusers models and
our own reward checkpoints. Models are built on the meta device and filled with `load_state_dict(assign=True)` from
memory-mapped safetensors (never pickle), one tensor at a time cast to the target dtype/device, so no full-precision
copy of the backbone ever exists.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from engine.config import BackboneConfig, RewardConfig
from engine.head import RewardHead
from engine.model.mmdit import MMDiTReward, diffusers_state_dict

REWARD_FORMAT = "dit-reward/1"
REWARD_CONFIG = "reward_config.json"
HEAD_FILE = "head.safetensors"
BACKBONE_FILE = "backbone.safetensors"
CHECKPOINT_FILES = frozenset({REWARD_CONFIG, HEAD_FILE, BACKBONE_FILE})


# ------------------------------------------------------------------------------------------------ tensor sources


class TensorSource(Mapping):
    """Lazy key -> tensor view over one or more safetensors files (a diffusers shard index or a single file).

    `keymap` exposes the stored tensors under other names: exposed key -> (stored key, transform or None), e.g. a
    slice of a fused qkv. Without it the stored names are exposed as they are."""

    def __init__(self, files: Iterable[Path], keymap: Mapping[str, tuple[str, Callable | None]] | None = None):
        self._file_of: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        for path in files:
            for key in self._handle(path).keys():  # noqa: SIM118 (safe_open is not a dict)
                self._file_of[key] = path
        self._keymap = dict(keymap) if keymap is not None else {k: (k, None) for k in self._file_of}

    def _handle(self, path: Path):
        if path not in self._handles:
            if not path.is_file():
                raise FileNotFoundError(f"weights file {path} does not exist")
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError, ValueError) as e:
                raise ValueError(f"cannot read safetensors file {path}: {e} (corrupt or not a safetensors file)") from e
        return self._handles[path]

    def stored(self, key: str) -> torch.Tensor:
        """A tensor by its stored name."""
        path = self._file_of[key]
        try:
            return self._handle(path).get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"cannot read tensor {key!r} from {path}: {e}") from e

    def stored_keys(self) -> set[str]:
        return set(self._file_of)

    def __getitem__(self, key: str) -> torch.Tensor:
        stored, transform = self._keymap[key]
        tensor = self.stored(stored)
        return tensor if transform is None else transform(tensor)

    def __iter__(self):
        return iter(self._keymap)

    def __len__(self) -> int:
        return len(self._keymap)

    def __contains__(self, key: object) -> bool:
        return key in self._keymap

    def describe(self) -> str:
        files = sorted({str(p) for p in self._file_of.values()})
        if not files:
            return "an empty weights source"
        return files[0] if len(files) == 1 else f"{len(files)} files in {Path(files[0]).parent}"


def _safetensors_in(directory: Path, stem: str) -> list[Path]:
    index = directory / f"{stem}.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"corrupt shard index {index}: {e}") from e
        return sorted({directory / name for name in weight_map.values()})
    single = directory / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no {stem}.safetensors or {stem}.safetensors.index.json in {directory}")


# ------------------------------------------------------------------------------------------------ diffusers layout


def transformer_dir(base: str | os.PathLike) -> Path:
    """The `transformer/` folder of an SD3/SD3.5 diffusers directory (or that folder itself)."""
    base = Path(base)
    for candidate in (base / "transformer", base):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"{base} is not an SD3/SD3.5 diffusers directory: expected {base / 'transformer' / 'config.json'}"
    )


def diffusers_dir_source(base: str | os.PathLike) -> tuple[BackboneConfig, TensorSource]:
    directory = transformer_dir(base)
    try:
        raw = json.loads((directory / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt transformer config {directory / 'config.json'}: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"transformer config {directory / 'config.json'} must hold a JSON object")
    if raw.get("_class_name", "SD3Transformer2DModel") != "SD3Transformer2DModel":
        raise ValueError(f"{directory} holds a {raw['_class_name']}, expected an SD3Transformer2DModel")
    try:
        config = BackboneConfig.from_diffusers(raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"transformer config {directory / 'config.json'}: {e}") from e
    return config, TensorSource(_safetensors_in(directory, "diffusion_pytorch_model"))


# ------------------------------------------------------------------------------- original (single-file) layout

_ORIGINAL_PREFIX = "model.diffusion_model."
_GLOBAL_KEYS = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "context_embedder": "context_embedder",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",  # (shift, scale) -> (scale, shift)
}
_BLOCK_KEYS = {  # original joint_blocks.{i}.<key> -> diffusers transformer_blocks.{i}.<key>
    "x_block.attn.ln_q": "attn.norm_q",
    "x_block.attn.ln_k": "attn.norm_k",
    "context_block.attn.ln_q": "attn.norm_added_q",
    "context_block.attn.ln_k": "attn.norm_added_k",
    "x_block.attn.proj": "attn.to_out.0",
    "context_block.attn.proj": "attn.to_add_out",
    "x_block.attn2.ln_q": "attn2.norm_q",
    "x_block.attn2.ln_k": "attn2.norm_k",
    "x_block.attn2.proj": "attn2.to_out.0",
    "x_block.adaLN_modulation.1": "norm1.linear",
    "context_block.adaLN_modulation.1": "norm1_context.linear",  # swapped in the final block
    "x_block.mlp.fc1": "ff.net.0.proj",
    "x_block.mlp.fc2": "ff.net.2",
    "context_block.mlp.fc1": "ff_context.net.0.proj",
    "context_block.mlp.fc2": "ff_context.net.2",
}
_FUSED_QKV = {  # fused qkv -> three projections (chunks 0, 1, 2 along dim 0)
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
}


def swap_scale_shift(w: torch.Tensor) -> torch.Tensor:
    """The original continuous adaLN stores (shift, scale); diffusers (scale, shift). Its own inverse."""
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def original_to_diffusers_plan(keys: Iterable[str], num_layers: int) -> dict[str, tuple[str, int | None, bool]]:
    """diffusers key -> (original key, qkv chunk index or None, swap scale/shift). Mirrors diffusers'
    `convert_sd3_transformer_checkpoint_to_diffusers`."""
    plan: dict[str, tuple[str, int | None, bool]] = {}
    for key in keys:
        module, _, leaf = key.rpartition(".")
        if module in _GLOBAL_KEYS:
            plan[f"{_GLOBAL_KEYS[module]}.{leaf}"] = (key, None, module.startswith("final_layer.adaLN"))
        elif key == "pos_embed":
            plan["pos_embed.pos_embed"] = (key, None, False)
        elif key.startswith("joint_blocks."):
            _, index, rest = module.split(".", 2)
            prefix = f"transformer_blocks.{index}"
            if rest in _FUSED_QKV:
                for chunk, name in enumerate(_FUSED_QKV[rest]):
                    plan[f"{prefix}.{name}.{leaf}"] = (key, chunk, False)
            elif rest in _BLOCK_KEYS:
                swap = rest == "context_block.adaLN_modulation.1" and int(index) == num_layers - 1
                plan[f"{prefix}.{_BLOCK_KEYS[rest]}.{leaf}"] = (key, None, swap)
            else:
                raise ValueError(f"unexpected key {key!r} in original SD3 checkpoint")
        else:
            raise ValueError(f"unexpected key {key!r} in original SD3 checkpoint")
    return plan


def diffusers_to_original(state_dict: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """The inverse mapping: a diffusers SD3 state dict -> original single-file keys (with the model prefix)."""
    leaves = ("weight", "bias")
    candidates = ["pos_embed", *(f"{k}.{leaf}" for k in _GLOBAL_KEYS for leaf in leaves)]
    candidates += [
        f"joint_blocks.{i}.{k}.{leaf}"
        for i in range(num_layers)
        for k in (*_BLOCK_KEYS, *_FUSED_QKV)
        for leaf in leaves
    ]
    plan = original_to_diffusers_plan(candidates, num_layers)
    grouped: dict[str, dict[int | None, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for d_key, (o_key, chunk, swap) in plan.items():
        if d_key not in state_dict:
            continue
        tensor = state_dict[d_key]
        if chunk is None:
            out[_ORIGINAL_PREFIX + o_key] = swap_scale_shift(tensor) if swap else tensor
        else:
            grouped.setdefault(o_key, {})[chunk] = tensor
    for o_key, parts in grouped.items():
        out[_ORIGINAL_PREFIX + o_key] = torch.cat([parts[i] for i in range(3)], dim=0)
    return out


def single_file_source(
    path: str | os.PathLike, config: BackboneConfig | None = None
) -> tuple[BackboneConfig, TensorSource]:
    """An original SD3/SD3.5 single-file checkpoint (`model.diffusion_model.joint_blocks.N...`, fused qkv), exposed
    under diffusers names. Text encoders or a VAE in the same file are ignored."""
    path = Path(path)
    stored = TensorSource([path]).stored_keys()
    prefix = _ORIGINAL_PREFIX if any(k.startswith(_ORIGINAL_PREFIX) for k in stored) else ""
    keys = {k[len(prefix) :]: k for k in stored if k.startswith(prefix)}
    keys = {k: v for k, v in keys.items() if k.split(".")[0] in _ORIGINAL_TOP_LEVEL}
    if not any(k.startswith("joint_blocks.") for k in keys):
        raise ValueError(f"{path} is not an original SD3 checkpoint: no '{_ORIGINAL_PREFIX}joint_blocks.*' keys")
    source = TensorSource([path])
    if config is None:
        config = _infer_original_config(source, keys, path)
    try:
        plan = original_to_diffusers_plan(keys, config.num_layers)
    except ValueError as e:
        raise ValueError(f"{e} {path}") from e
    keymap = {d_key: (keys[o_key], _original_transform(chunk, swap)) for d_key, (o_key, chunk, swap) in plan.items()}
    return config, TensorSource([path], keymap)


_ORIGINAL_TOP_LEVEL = {
    "joint_blocks",
    "pos_embed",
    "x_embedder",
    "t_embedder",
    "y_embedder",
    "context_embedder",
    "final_layer",
}


def _original_transform(chunk: int | None, swap: bool) -> Callable | None:
    if chunk is None and not swap:
        return None

    def transform(tensor: torch.Tensor) -> torch.Tensor:
        if chunk is not None:
            tensor = tensor.chunk(3, dim=0)[chunk]
        return swap_scale_shift(tensor) if swap else tensor

    return transform


def _infer_original_config(source: TensorSource, keys: dict[str, str], path: Path) -> BackboneConfig:
    def shape(k: str) -> tuple[int, ...]:
        if k not in keys:
            raise ValueError(f"original SD3 checkpoint {path} lacks key {_ORIGINAL_PREFIX + k!r}")
        return tuple(source.stored(keys[k]).shape)

    blocks = {int(k.split(".")[1]) for k in keys if k.startswith("joint_blocks.")}
    dim = shape("joint_blocks.0.x_block.attn.qkv.weight")[1]
    qk_norm = "joint_blocks.0.x_block.attn.ln_q.weight" in keys
    head_dim = shape("joint_blocks.0.x_block.attn.ln_q.weight")[0] if qk_norm else 64
    patch = shape("x_embedder.proj.weight")
    return BackboneConfig(
        num_layers=max(blocks) + 1,
        num_attention_heads=dim // head_dim,
        attention_head_dim=head_dim,
        patch_size=patch[-1],
        in_channels=patch[1],
        joint_attention_dim=shape("context_embedder.weight")[1],
        pooled_projection_dim=shape("y_embedder.mlp.0.weight")[1],
        caption_projection_dim=dim,
        pos_embed_max_size=math.isqrt(shape("pos_embed")[1]),
        qk_norm="rms_norm" if qk_norm else None,
        dual_attention_layers=tuple(sorted(i for i in blocks if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in keys)),
    )


def base_source(base: str | os.PathLike, config: BackboneConfig | None = None) -> tuple[BackboneConfig, TensorSource]:
    """A diffusers directory or an original single `.safetensors` file."""
    base = Path(base)
    if base.is_dir():
        return diffusers_dir_source(base)
    if base.suffix == ".safetensors":
        return single_file_source(base, config)
    raise FileNotFoundError(f"base model {base} is neither a diffusers directory nor a .safetensors file")


# ---------------------------------------------------------------------------------------------- build + load


def full_model_keys(cfg: BackboneConfig, blocks: int | None = None) -> set[str]:
    """Every key a complete diffusers `SD3Transformer2DModel` of this config has (what a base may contain), or those
    of its first `blocks` blocks and the rest: only those are built, so a config's depth costs nothing until a file
    holds that many blocks."""
    deepest = cfg.num_layers - 1 if blocks is None else min(cfg.num_layers - 1, blocks)  # (its keys: a subset)
    with torch.device("meta"):
        keys = set(diffusers_state_dict(MMDiTReward(cfg, (deepest,))))
    last = f"transformer_blocks.{cfg.num_layers - 1}.attn"
    extra = [
        f"{last}.add_q_proj.weight",
        f"{last}.add_q_proj.bias",
        "norm_out.linear.weight",
        "norm_out.linear.bias",
        "proj_out.weight",
        "proj_out.bias",
    ]
    if cfg.qk_norm:
        extra.append(f"{last}.norm_added_q.weight")
    return keys | set(extra)


def load_backbone(
    cfg: BackboneConfig,
    layers: tuple[int, ...],
    sources: list[Mapping[str, torch.Tensor]],
    dtype: torch.dtype,
    device: torch.device | str,
) -> MMDiTReward:
    """Build blocks 0..max(layers) on meta and fill them from `sources` (later ones override earlier ones). Blocks
    missing from the sources are refused before any tensor is read; every tensor passes `checked_weights`."""
    _check_depth(layers, sources)
    with torch.device("meta"):
        model = MMDiTReward(cfg, layers)
    expected = diffusers_state_dict(model)
    allowed = full_model_keys(cfg, _held_blocks(sources))
    for source in sources:
        unexpected = sorted(set(source) - allowed)
        if unexpected:
            raise ValueError(
                f"unexpected key {unexpected[0]!r} in {_describe(source)} ({len(unexpected)} in all): not "
                f"a key of an SD3 transformer with {cfg.num_layers} blocks; wrong model or config?"
            )
    state, where = {}, {}
    for key, meta in expected.items():
        source = next((s for s in reversed(sources) if key in s), None)
        if source is None:
            raise ValueError(f"missing key {key!r} in {', '.join(_describe(s) for s in sources)}")
        tensor = source[key]
        if tuple(tensor.shape) != tuple(meta.shape):
            raise ValueError(
                f"shape mismatch for {key!r} in {_describe(source)}: checkpoint {list(tensor.shape)}, "
                f"model {list(meta.shape)}"
            )
        _check_floating(key, tensor, _describe(source))
        # an in-memory model's tensors are copied, never adopted: the engine must not change when that model is
        # trained further (e.g. the policy's own transformer). Files are read into fresh tensors anyway.
        state[key] = tensor.to(device=device, dtype=dtype, copy=not isinstance(source, TensorSource))
        where[key] = _describe(source)
    checked_weights(state, where, dtype)
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval().requires_grad_(False)


def _describe(source: Mapping) -> str:
    return source.describe() if isinstance(source, TensorSource) else "the in-memory state dict"


def _block_indices(sources: list[Mapping[str, torch.Tensor]]) -> set[int]:
    return {int(k.split(".")[1]) for s in sources for k in s if k.startswith("transformer_blocks.")}


def _held_blocks(sources: list[Mapping[str, torch.Tensor]]) -> int:
    """How many blocks the sources name keys of (the highest index + 1)."""
    return max(_block_indices(sources), default=-1) + 1


def _check_depth(layers: tuple[int, ...], sources: list[Mapping[str, torch.Tensor]]) -> None:
    """Every block up to the deepest pooled one is in the sources (key names only: nothing is read)."""
    held = _block_indices(sources)
    depth = next(i for i in range(len(held) + 1) if i not in held)  # blocks 0..depth-1 are all there
    missing = [i for i in layers if i >= depth]
    if missing:
        raise ValueError(
            f"reward layers {missing} need blocks 0..{max(layers)}, but {', '.join(_describe(s) for s in sources)} "
            f"holds {depth} blocks (0..{depth - 1}): a truncated or shallower base model?"
        )


def _check_floating(key: str, tensor: torch.Tensor, where: str) -> None:
    if not tensor.is_floating_point():
        raise ValueError(
            f"tensor {key!r} in {where} is {tensor.dtype}, but weights must be floating point: a corrupt file or "
            f"not a model checkpoint"
        )


def checked_weights(
    tensors: Mapping[str, torch.Tensor], where: Mapping[str, str] | str, dtype: torch.dtype | None = None
) -> Mapping[str, torch.Tensor]:
    """Refuse weights that are not floating point or not finite, naming the tensor and its file (`where`: one
    description for all, or one per key). `tensors` are the loaded (cast) values: one pass over memory, one device
    sync for all of them; a value finite in the file but not in the target `dtype` (1e6 in float16) is refused too."""
    for key, tensor in tensors.items():
        _check_floating(key, tensor, where if isinstance(where, str) else where[key])
    on_device = {k: t for k, t in tensors.items() if t.device.type != "meta"}  # (meta tensors hold no values)
    if not on_device:
        return tensors
    finite = torch.stack([torch.isfinite(t).all() for t in on_device.values()])
    if not bool(finite.all()):
        key = list(on_device)[int((~finite).nonzero()[0])]
        in_dtype = f" (after casting to {str(dtype).removeprefix('torch.')})" if dtype is not None else ""
        raise ValueError(
            f"tensor {key!r} in {where if isinstance(where, str) else where[key]} holds NaN or Inf values{in_dtype}: "
            f"a corrupt or diverged checkpoint"
        )
    return tensors


# ---------------------------------------------------------------------------------------------- reward checkpoint


CORE_FIELDS = ("format", "reward", "backbone", "backbone_weights")
METADATA = "metadata"
# A sibling of checkpoint NAME that an export in process PID is writing (tmp) or has just moved aside (old).
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")


def checked_path(directory: str | os.PathLike, name: object, field: str) -> Path:
    """`directory / name` for a file a checkpoint names, refused unless it resolves (symlinks followed) inside
    `directory`: a checkpoint must not reach `../other/x.safetensors` or `/etc/passwd`. `field` names where the
    name came from (e.g. "reward_config.json field 'backbone_weights'") for the error."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ValueError(f"{field} must be a file name inside {directory}, got {name!r}")
    root = Path(directory).resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or path == root:
        raise ValueError(
            f"{field} is {name!r}, which resolves to {path}, outside the checkpoint directory {root}: a checkpoint "
            f"may only name files inside itself"
        )
    return path


def _process_alive(pid: int) -> bool:
    """Whether `pid` runs on this machine (checkpoints are assumed to be written from one host)."""
    if pid == os.getpid():
        return True  # another thread of this process may be exporting
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _is_complete(directory: Path) -> bool:
    return (directory / REWARD_CONFIG).is_file() and (directory / HEAD_FILE).is_file()


def recover_checkpoint(directory: str | os.PathLike) -> None:
    """Finish what a killed export left: if `directory` is missing but a complete copy was moved aside
    (`.NAME.old-PID-*`, the kill came between the two renames of `save_reward_checkpoint`), move it back; then remove
    the `.NAME.tmp-*` / `.NAME.old-*` siblings of dead processes. Best effort: a read-only parent is left as it is."""
    directory = Path(directory).resolve()
    try:
        siblings = list(directory.parent.iterdir())
    except OSError:
        return
    stale = []
    for path in siblings:
        match = _LEFTOVER.match(path.name)
        if match and match["name"] == directory.name and not _process_alive(int(match["pid"])):
            stale.append((match["kind"], path))
    moved_aside = sorted((p for kind, p in stale if kind == "old" and _is_complete(p)), key=lambda p: p.stat().st_mtime)
    try:
        if not directory.exists() and moved_aside:
            os.replace(moved_aside[-1], directory)
            _fsync_dir(directory.parent)
        for _, path in stale:
            if path.exists():
                shutil.rmtree(path)
    except OSError:
        pass


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_sibling(directory: Path, kind: str) -> Path:
    """A fresh name `.NAME.KIND-PID-HEX` beside `directory` (PID lets a later run tell a dead export's leftovers)."""
    return directory.with_name(f".{directory.name}.{kind}-{os.getpid()}-{secrets.token_hex(6)}")


def save_reward_checkpoint(
    directory: str | os.PathLike,
    reward: RewardConfig,
    backbone_cfg: BackboneConfig,
    head: RewardHead,
    backbone_state: Mapping[str, torch.Tensor] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write `reward_config.json`, `head.safetensors` and optionally `backbone.safetensors` so that a reader finds
    the old or the new checkpoint, never neither and never a half-written one: everything is written and fsynced in a
    sibling `.NAME.tmp-PID-*` that then replaces `directory` (the old one moved aside to `.NAME.old-PID-*` first). A
    kill between the two renames is repaired by `recover_checkpoint`, which the next save and the next load run.
    `metadata` (JSON) is stored under its own key and cannot shadow the core fields. The directory gets the
    permissions the umask gives a new directory. An existing `directory` is replaced only if it is a reward
    checkpoint (holds nothing but checkpoint files): anything else there would be deleted, so that is a ValueError."""
    directory = Path(directory).resolve()  # ("." has no name to build the sibling temp dir from)
    meta = {
        "format": REWARD_FORMAT,
        "reward": reward.to_dict(),
        "backbone": {"preset": backbone_cfg.preset_name(), "config": backbone_cfg.to_dict()},
        "backbone_weights": BACKBONE_FILE if backbone_state is not None else None,
        METADATA: dict(metadata or {}),
    }
    try:
        text = json.dumps(meta, indent=2)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint metadata must be JSON-serialisable (dicts, lists, str, numbers): {e}") from e
    recover_checkpoint(directory)
    if directory.exists():
        if not directory.is_dir():
            raise ValueError(f"{directory} exists and is not a directory: save the reward checkpoint elsewhere")
        strangers = sorted(p.name for p in directory.iterdir() if p.name not in CHECKPOINT_FILES)
        if strangers:
            shown = ", ".join(strangers[:5]) + (", ..." if len(strangers) > 5 else "")
            raise ValueError(
                f"{directory} holds files that are not part of a reward checkpoint ({shown}); saving would replace "
                f"the whole directory: save into a new directory or an existing reward checkpoint"
            )
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_sibling(directory, "tmp")
    tmp.mkdir()  # mode 0o777 & ~umask, like any new directory
    old = None
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(tmp / HEAD_FILE))
        if backbone_state is not None:
            save_file({k: v.detach().cpu().clone() for k, v in backbone_state.items()}, str(tmp / BACKBONE_FILE))
        (tmp / REWARD_CONFIG).write_text(text)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if directory.exists():
            old = _new_sibling(directory, "old")
            os.replace(directory, old)
        os.replace(tmp, directory)
        _fsync_dir(directory.parent)
    except BaseException:
        if old is not None and not directory.exists():
            os.replace(old, directory)  # put the old checkpoint back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return directory


def _require_dict(value: object, field: str, path: Path) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{path}: field {field!r} must be a JSON object, got {type(value).__name__} {value!r:.60}")
    return value


def _build(cls: type, fields: dict, field: str, path: Path, required: set[str]):
    """A config dataclass from a JSON object: every key known, every required key present, values checked by the
    dataclass; errors name the file and the field."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {unknown} in {field!r}; expected {sorted(known)}")
    missing = sorted(required - set(fields))
    if missing:
        raise ValueError(f"{path}: field {field!r} lacks {', '.join(repr(m) for m in missing)} (required)")
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: invalid field {field!r}: {e}") from e


def read_reward_config(directory: str | os.PathLike) -> tuple[dict, RewardConfig, BackboneConfig]:
    """Read and check `reward_config.json` (after `recover_checkpoint`). Returns the document, normalised: every
    non-core field under "metadata" (older checkpoints kept them at the top level), and "backbone_weights" as the
    checked absolute `Path` of the file or None; then the reward and backbone configs. Errors name the file and the
    field."""
    directory = Path(directory)
    recover_checkpoint(directory)
    if not (directory / REWARD_CONFIG).is_file():
        raise FileNotFoundError(f"{directory} is not a reward checkpoint: {REWARD_CONFIG} missing")
    path = checked_path(directory, REWARD_CONFIG, REWARD_CONFIG)
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}): a corrupt reward config") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt reward config {path}: {e}") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: the top level must be a JSON object, got {type(meta).__name__}")
    if meta.get("format") != REWARD_FORMAT:
        raise ValueError(f"{path}: field 'format' is {meta.get('format')!r}, expected {REWARD_FORMAT!r}")
    metadata = _require_dict(meta.get(METADATA, {}), METADATA, path)
    legacy = {k: v for k, v in meta.items() if k not in (*CORE_FIELDS, METADATA)}
    reward_fields = _require_dict(meta.get("reward"), "reward", path)
    reward = _build(
        RewardConfig,
        reward_fields,
        "reward",
        path,
        # head_outputs is optional: a checkpoint without it has a point-reward head
        required={f.name for f in dataclasses.fields(RewardConfig)} - {"head_outputs"},
    )
    backbone_section = _require_dict(meta.get("backbone"), "backbone", path)
    backbone = _build(
        BackboneConfig,
        _require_dict(backbone_section.get("config"), "backbone.config", path),
        "backbone.config",
        path,
        required={f.name for f in dataclasses.fields(BackboneConfig)},
    )
    try:
        reward.check_against(backbone)
    except ValueError as e:
        raise ValueError(f"{path}: field 'reward.layers': {e}") from e
    weights = meta.get("backbone_weights")
    if weights is not None:
        weights = checked_path(directory, weights, f"{path} field 'backbone_weights'")
    normalised = {
        "format": REWARD_FORMAT,
        "reward": reward_fields,
        "backbone": backbone_section,
        "backbone_weights": weights,
        METADATA: {**legacy, **metadata},
    }
    return normalised, reward, backbone


def load_head(directory: str | os.PathLike, reward: RewardConfig, dim: int) -> RewardHead:
    path = checked_path(directory, HEAD_FILE, f"the head file {Path(directory) / HEAD_FILE}")
    source = TensorSource([path])
    with torch.device("meta"):  # shapes first: a config's head sizes allocate nothing until the file agrees
        head = RewardHead(len(reward.layers), dim, reward.head_hidden, reward.head_outputs)
    expected = head.state_dict()
    for key in expected:
        if key not in source:
            raise ValueError(f"missing key {key!r} in {source.describe()}")
        if tuple(source[key].shape) != tuple(expected[key].shape):
            raise ValueError(
                f"shape mismatch for {key!r} in {source.describe()}: checkpoint "
                f"{list(source[key].shape)}, head {list(expected[key].shape)}"
            )
    extra = sorted(set(source) - set(expected))
    if extra:
        raise ValueError(f"unexpected key {extra[0]!r} in {source.describe()}")
    raw = {k: source[k] for k in expected}
    for key, tensor in raw.items():
        _check_floating(key, tensor, source.describe())  # before the cast would hide an integer tensor
    state = checked_weights({k: v.to(torch.float32) for k, v in raw.items()}, source.describe(), torch.float32)
    # the sizes agree with the file: allocate
    head = RewardHead(len(reward.layers), dim, reward.head_hidden, reward.head_outputs)
    head.load_state_dict(state)  # (copied into fresh parameters, not adopted from the file's buffer)
    return head


def random_backbone(
    cfg: BackboneConfig, layers: tuple[int, ...], dtype: torch.dtype, device: torch.device | str, seed: int = 0
) -> MMDiTReward:
    """Blocks 0..max(layers) with random weights, built straight on `device` (an 8B model takes seconds on a GPU).
    Linear weights ~ N(0, 0.02²), biases 0.01·N(0,1), qk-norm weights ~1; the positional table is SD3's real sincos."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    with torch.device("meta"):
        model = MMDiTReward(cfg, layers)
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or "norm_added" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator, device=device))
            elif name.endswith("bias"):
                p.copy_(0.01 * torch.randn(p.shape, generator=generator, device=device))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=generator, device=device))
        table = get_2d_sincos_pos_embed(
            cfg.hidden_size,
            cfg.pos_embed_max_size,
            base_size=cfg.sample_size // cfg.patch_size,
            interpolation_scale=1.0,
            output_type="pt",
        )
        model.pos_embed.pos_embed.copy_(table.float().unsqueeze(0))
    return model.to(dtype).eval().requires_grad_(False)
