"""Bradley-Terry training of DiT-Reward (DESIGN.md Eq. 1-6) on cached latents and text embeddings.

    python -m training.train --config run.json [key=value ...]               # one process
    torchrun --nproc_per_node 8 -m training.train --config run.json            # FSDP2, one block per shard unit

Modes: ``full`` fine-tunes the backbone and the head (fresh noise every step at the configured t); ``frozen`` runs
the backbone once per image (fixed, seeded noise), caches the pooled features and trains only the head (seconds).

Everything a step consumes is a pure function of (config, step): the pairs (a seeded permutation per epoch), the noise
(a generator seeded from the step) and the learning rate (`get_lr`). A checkpoint therefore needs only the trainable
weights, the optimizer state and the step, and a resumed run equals an uninterrupted one. Checkpoints are safetensors
files (tensors) with their structure, the config and the data fingerprint as JSON metadata: resume never unpickles
anything. They are written to a temp file and ``os.replace``d; resume takes the newest one that loads and never sees
a half-written file (a crashed writer's temp file is removed at the next start), and log.jsonl is cut back to the
resumed step. A checkpoint records a fingerprint of the training inputs (the JSON files' content hashes, the kept
pairs, the cache); resuming on other data is refused unless ``resume_on_changed_data``. One run at a time holds
``out_dir/.lock``.

Not implemented: HPSv3's uncertainty loss (it needs a head that predicts a variance, which the engine's head and
checkpoint format do not have); gradient accumulation (the per-rank batch is the micro-batch).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
import types
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from engine.api import RewardEngine
from engine.config import RewardConfig
from engine.io.backbone import base_source
from training.cache import LatentCache
from training.data import (
    BAD_IMAGE_POLICIES,
    HPSV3_CONFIDENCE,
    PreferencePair,
    file_digest,
    load_pairs,
    parse_sources,
    read_file,
)
from training.files import atomic_write, exclusive_lock


@dataclass
class TrainConfig:
    # data
    cache: str = ""  # training.cache output: the trainer never runs the VAE or the text encoders
    train_json: list[str] = field(default_factory=list)  # HPSv3-format files; "file.json:2" mixes with weight 2
    val_json: list[str] = field(default_factory=list)  # held-out pairs: accuracy and the stored reward mean/std
    confidence_threshold: float | None = HPSV3_CONFIDENCE  # HPSv3 trains on confidence >= 0.95; null passes
    on_bad_image: str = "error"  # "skip" drops and counts records with missing/unreadable images
    image_root: str | None = None  # relative image paths resolve here, images must lie in it; None: the JSON's folder
    allow_outside_root: bool = False  # accept image paths that resolve outside image_root
    # model
    base: str = ""  # SD3/SD3.5 diffusers directory or single file; only the transformer weights are read
    layers: list[int] | None = None  # pooled blocks; None = the engine's default for this depth (paper: 15,23,28,37)
    t: float = 0.1  # Eq. 1 noise level (paper); stored with the head
    head_hidden: list[int] = field(default_factory=lambda: [1024, 256])  # the paper's MLP head
    mode: str = "full"  # "full": backbone + head; "frozen": head only, on features computed once
    # optimisation
    steps: int = 2000  # optimizer steps
    batch_size: int = 32  # global pairs per step, split evenly over the ranks
    lr_backbone: float = 1e-5  # small: the backbone is pretrained and its features are what we pay for
    lr_head: float = 1e-4  # the head starts from random init and needs a larger step
    weight_decay: float = 0.01  # AdamW default scale; regularises the freshly initialised head
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW defaults; BT gradients are not spiky
    warmup_ratio: float = 0.05  # linear warmup over the first 5% of steps protects the pretrained backbone
    schedule: str = "cosine"  # "cosine" (to min_lr_ratio) or "constant" after warmup
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of the peak lr (nanoGPT: lr / 10)
    grad_clip: float = 1.0  # clip the global grad norm; 0 disables
    grad_checkpointing: bool = False  # recompute each block in backward: ~1/3 more compute for O(1)-block memory
    # run
    seed: int = 0  # head init, data order and training noise
    eval_seed: int = 1234  # validation noise: image k of a file uses stream k (bench.accuracy uses the same)
    out_dir: str = "runs/dit-reward"  # log.jsonl, checkpoints/, reward/ (the final reward checkpoint)
    log_every: int = 10  # steps between log lines (each is a cross-rank sync)
    eval_every: int = 0  # steps between validations; 0: only at the end
    checkpoint_every: int = 200  # steps between resumable checkpoints; 0: only at the end
    keep_checkpoints: int = 2  # older resumable checkpoints are deleted
    eval_batch_size: int = 64  # pairs per validation forward
    device: str = "auto"  # "auto": cuda (this rank's GPU) if available, else cpu
    peak_flops: float = 0.0  # per-device peak for MFU; 0: detect on known GPUs, else MFU is not reported
    resume_on_changed_data: bool = False  # resume even if the data files, their filtering or the cache changed

    def __post_init__(self) -> None:
        # One path for a list of paths ("train_json=/data/train.json" on the command line, as for a single file);
        # tuples and path objects from Python become what the JSON round trip of a checkpoint gives back.
        for name in ("cache", "base", "out_dir", "image_root"):
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
        for name in ("train_json", "val_json"):
            value = getattr(self, name)
            if isinstance(value, (str, os.PathLike)):
                value = [value]
            if isinstance(value, (list, tuple)):
                setattr(self, name, [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value])
        for name in ("layers", "head_hidden", "betas"):
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))


_FIELD_TYPES = typing.get_type_hints(TrainConfig)
_PYTHON_LITERALS = {"True": True, "False": False, "None": None}  # what a Python user types on the command line


def _is_instance(value: Any, hint: Any) -> bool:
    """isinstance against a field annotation (bool, int, float, str, list[X], X | None). A bool is no number here and
    an int is a float (JSON writes 1.0 as 1)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_is_instance(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(_is_instance(v, typing.get_args(hint)[0]) for v in value)
    if hint is type(None):
        return value is None
    if isinstance(value, bool):
        return hint is bool
    return isinstance(value, (int, float)) if hint is float else isinstance(value, hint)


def _parse_override(key: str, raw: str) -> Any:
    """A command-line value: JSON (``steps=100``, ``betas=[0.9,0.95]``, ``lr_head=NaN``), Python's True/False/None,
    else the text. Text fields (paths, modes) keep the text unless it is a JSON string: ``out_dir=2024`` is a path."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = _PYTHON_LITERALS.get(raw, raw)
    takes_text = _FIELD_TYPES.get(key) in (str, list[str])
    return raw if takes_text and not isinstance(value, (str, list)) else value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults, then a JSON file, then ``key=value`` overrides (see `_parse_override`)."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"config {path} is not valid JSON: {e}") from e
        if not isinstance(values, dict):
            raise ValueError(f"config {path} must be a JSON object of TrainConfig fields")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like key=value")
        values[key] = _parse_override(key, raw)
    unknown = sorted(set(values) - set(_FIELD_TYPES))
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(_FIELD_TYPES)}")
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """ValueError, naming the field and the fix, for a config that cannot run: checked before any work."""
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        if not _is_instance(value, _FIELD_TYPES[f.name]):
            raise ValueError(f"config field {f.name!r} must be {f.type}, got {value!r} ({type(value).__name__})")
        numbers = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise ValueError(f"config field {f.name!r} must be finite, got {value!r}")
    for name in ("cache", "base", "out_dir"):
        if not getattr(cfg, name):
            raise ValueError(f"config field {name!r} is required")
    for name in ("train_json", "val_json"):
        if not getattr(cfg, name) or not all(getattr(cfg, name)):
            raise ValueError(
                f"config field {name!r} needs one or more HPSv3-format JSON files, got {getattr(cfg, name)}"
            )
    if cfg.mode not in ("full", "frozen"):
        raise ValueError(f"mode must be 'full' or 'frozen', got {cfg.mode!r}")
    if cfg.schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {cfg.schedule!r}")
    if cfg.on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {cfg.on_bad_image!r}")
    if cfg.confidence_threshold is not None and not 0.0 <= cfg.confidence_threshold <= 1.0:
        raise ValueError(
            f"confidence_threshold must lie in [0, 1] (HPSv3: {HPSV3_CONFIDENCE}) or be null, "
            f"got {cfg.confidence_threshold}"
        )
    try:  # the engine's own rules for the pooled blocks, t and the head (the blocks' range is checked against the base)
        RewardConfig(
            **({"layers": tuple(cfg.layers)} if cfg.layers is not None else {}),
            t=cfg.t,
            head_hidden=tuple(cfg.head_hidden),
        )
    except ValueError as e:
        raise ValueError(f"config fields layers/t/head_hidden: {e}") from e
    for name in ("steps", "batch_size", "eval_batch_size", "log_every", "keep_checkpoints"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be a positive int, got {getattr(cfg, name)!r}")
    for name in ("eval_every", "checkpoint_every"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be an int >= 0 (0: only at the end), got {getattr(cfg, name)!r}")
    for name in ("lr_backbone", "lr_head", "weight_decay", "grad_clip", "peak_flops"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be a number >= 0, got {getattr(cfg, name)!r}")
    if len(cfg.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.betas):
        raise ValueError(f"betas must be two AdamW coefficients in [0, 1) (default [0.9, 0.999]), got {cfg.betas}")
    if not 0.0 <= cfg.warmup_ratio < 1.0 or not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ValueError(
            f"warmup_ratio must lie in [0, 1) and min_lr_ratio in [0, 1], got {cfg.warmup_ratio} and {cfg.min_lr_ratio}"
        )
    if not 0 <= cfg.seed < 2**32:  # per-epoch and per-step generator seeds are derived from it (batch_indices)
        raise ValueError(f"seed must be an int in [0, 2**32), got {cfg.seed}")
    if not 0 <= cfg.eval_seed < 2**63:  # the noise kernel's seed range (bench.accuracy reuses it)
        raise ValueError(f"eval_seed must be an int in [0, 2**63), got {cfg.eval_seed}")


# ----------------------------------------------------------------------------------------------------- schedule


def get_lr(step: int, cfg: TrainConfig) -> float:
    """LR multiplier for optimizer step `step` (0-based): linear warmup over warmup_ratio * steps, then cosine decay
    to min_lr_ratio at the last step, or constant. Each parameter group's lr is its base lr times this."""
    warmup = math.ceil(cfg.warmup_ratio * cfg.steps)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, cfg.steps - 1 - warmup)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def batch_indices(step: int, n_pairs: int, batch_size: int, seed: int) -> list[int]:
    """Pair indices of global batch `step`: a seeded permutation per epoch read as one endless stream, so the data
    position of a resumed run is step * batch_size and nothing else."""
    out = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, n_pairs)
        if offset == 0 or not out:
            perm = torch.randperm(n_pairs, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perm[offset]))
    return out


def step_noise(step: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Fresh eps for training step `step`, ``[2, B, C, h, w]`` (winners, losers) for the GLOBAL batch, on the CPU; each
    rank takes its slice, so the noise does not depend on the number of ranks."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step + 1)
    return torch.randn(shape, generator=generator)


# -------------------------------------------------------------------------------------------------------- model


class TrainableReward(nn.Module):
    """The engine's backbone and head as one differentiable module (Eq. 1-5): the root FSDP2 shards, with one unit per
    backbone block. Shares the engine's parameters and backends and runs the backbone's own forward, handing it temb
    instead of precomputed modulations so each block computes its adaLN vectors inside its forward (FSDP2 gathers
    those weights with the block; checkpointing recomputes them). Equals `engine.score` for the same noise."""

    def __init__(self, engine: RewardEngine, grad_checkpointing: bool = False):
        super().__init__()
        self.backbone, self.head = engine.backbone, engine.head
        self.backbone.gradient_checkpointing = grad_checkpointing
        self.layers, self.t, self.backends = self.backbone.layers, engine.reward_config.t, engine.backends

    def features(
        self,
        z0: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        noise: torch.Tensor | None = None,
        seed: int | None = None,
        image_offset: int = 0,
    ) -> torch.Tensor:
        """z0 [B, C, h, w] transformer-space latents, prompt_embeds [B, L, joint_dim], pooled [B, pooled_dim]; noise
        [B, C, h, w] or (seed, image_offset) as in `engine.features` -> pooled features [B, n_layers, D] float32."""
        dtype = self.backbone.context_embedder.weight.dtype
        context, temb = self.backbone.embed_prompt(prompt_embeds.to(dtype), pooled.to(dtype), self.t)
        return self.backbone(z0, context, temb, self.t, self.backends, noise, seed, image_offset)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Rewards [B] float32 (Eq. 5); arguments as `features`."""
        return self.head(self.features(*args, **kwargs))


def engine_backbone_key(key: str) -> str | None:
    """TrainableReward state-dict key -> the engine backbone's key (None for head keys)."""
    return key.removeprefix("backbone.") if key.startswith("backbone.") else None


def bt_loss(r_w: torch.Tensor, r_l: torch.Tensor) -> torch.Tensor:
    """Eq. 6: mean over pairs of -log sigmoid(r_w - r_l); r_w, r_l [B] float32."""
    return -F.logsigmoid(r_w - r_l).mean()


# ---------------------------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; nccl on CUDA, gloo on CPU. One process: no process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if world == 1:
        return Dist(device=torch.device("cuda" if use_cuda else device if device != "auto" else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(
        dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    )


def shard(model: TrainableReward, world: int, device: torch.device) -> None:
    """FSDP2: one shard unit per block (gathered for its forward, freed after), then the root (embedders, head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for block in model.backbone.transformer_blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def all_mean(values: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)  # sync point: only on log steps
        values /= d.world
    return values


# ----------------------------------------------------------------------------------------------- checkpoints


def _state_options(**kw: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


CHECKPOINT_FORMAT = "dit-reward-train-state/1"
CHECKPOINT_SUFFIX = ".safetensors"


def _pack(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Nested dicts/lists/tuples of tensors and JSON scalars -> a JSON tree whose tensors are names in `tensors`.
    Dict keys keep their type (str or int: optimizer states key parameters either way)."""
    if isinstance(value, torch.Tensor):
        name = str(len(tensors))
        tensors[name] = value.detach().cpu().contiguous()
        return {"tensor": name}
    if isinstance(value, dict):
        if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in value):
            raise TypeError(f"checkpoint state has dict keys {list(value)[:5]}; only str and int keys are stored")
        return {"dict": [[k, _pack(v, tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [_pack(v, tensors) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"checkpoint state holds a {type(value).__name__}; only tensors, containers and scalars are stored")


def _unpack(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    (kind, body), *rest = node.items() if isinstance(node, dict) else [(None, None)]
    if rest or kind not in ("tensor", "dict", "list", "tuple", "value"):
        raise ValueError(f"unexpected checkpoint structure node {str(node)[:80]}")
    if kind == "tensor":
        return tensors[body]
    if kind == "dict":
        return {k: _unpack(v, tensors) for k, v in body}
    if kind in ("list", "tuple"):
        items = [_unpack(v, tensors) for v in body]
        return items if kind == "list" else tuple(items)
    return body


def write_checkpoint_file(path: Path, payload: dict[str, Any]) -> None:
    """`payload` (tensors in nested containers, JSON scalars) as one safetensors file, atomically; a full disk is a
    `DiskFullError` with the bytes needed."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _pack(payload, tensors)
    metadata = {"format": CHECKPOINT_FORMAT, "state": json.dumps(tree)}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values()) + len(metadata["state"]) + 100 * len(tensors)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), nbytes)


def read_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    """The payload of `write_checkpoint_file`. Only safetensors and JSON are parsed: nothing is unpickled."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: format {metadata.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    payload = _unpack(json.loads(metadata["state"]), tensors)
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: the stored state is a {type(payload).__name__}, expected a dict")
    return payload


def save_checkpoint(
    model: nn.Module, optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig, d: Dist, fingerprint: dict
) -> None:
    """Trainable weights, optimizer state, step/data position, RNG states and the data fingerprint, gathered to rank 0
    and written atomically (`write_checkpoint_file`): a crash mid-write leaves only a temp file, which resume
    ignores."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state = get_model_state_dict(model, options=_state_options())  # collective under FSDP: every rank calls it
    optim_state = get_optimizer_state_dict(model, optimizer, options=_state_options())
    if d.main:
        directory = Path(cfg.out_dir) / "checkpoints"
        directory.mkdir(parents=True, exist_ok=True)
        payload = {
            "step": step,
            "data_position": step * cfg.batch_size,
            "config": asdict(cfg),
            "fingerprint": fingerprint,
            "model": {k: v for k, v in state.items() if k in trainable},
            "optimizer": optim_state,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }
        write_checkpoint_file(directory / f"step_{step:08d}{CHECKPOINT_SUFFIX}", payload)
        # Prune among the checkpoints up to this step, so the one just written is always kept. A later step's file
        # is one that resume skipped as unreadable (else it would have resumed from it): it never counts as kept, and
        # is replaced or pruned once the run gets there.
        for old in [path for s, path in checkpoint_files(directory) if s <= step][: -cfg.keep_checkpoints]:
            old.unlink()
    if d.world > 1:
        dist.barrier()  # no rank runs ahead of a checkpoint another rank might resume from


def checkpoint_files(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of the ``step_N.safetensors`` files in `directory`, oldest first: ordered by step, not by name.
    Temp files (".step_N.safetensors.tmp-PID") never match."""
    found = [(path.name[len("step_") : -len(CHECKPOINT_SUFFIX)], path) for path in directory.glob("step_*.safetensors")]
    return sorted((int(digits), path) for digits, path in found if digits.isdigit())


def latest_checkpoint(out_dir: str | os.PathLike) -> tuple[Path, dict] | None:
    """The newest checkpoint under out_dir/checkpoints that loads completely; temp files are never considered and a
    damaged or foreign file is skipped with a message. Files of other formats (a ``.pt`` pickle) are never opened:
    unpickling a file can run code."""
    directory = Path(out_dir) / "checkpoints"
    for path in sorted(directory.glob("step_*.pt")):
        print(
            f"ignoring {path}: pickled checkpoints are never loaded (unpickling can run code); resume reads "
            "step_N.safetensors"
        )
    for _, path in reversed(checkpoint_files(directory)):
        try:
            payload = read_checkpoint_file(path)
            missing = {"step", "model", "optimizer", "rng", "config", "fingerprint"} - set(payload)
            if not missing:
                return path, payload
            print(f"skipping checkpoint {path}: it lacks {sorted(missing)}")
        except Exception as e:  # truncated or foreign file: fall back to an older checkpoint
            print(f"skipping unreadable checkpoint {path}: {type(e).__name__}: {e}")
    return None


def truncate_log(path: Path, step: int) -> None:
    """Cut log.jsonl back to what a run resumed at `step` does not write again: the lines up to `step`, none when the
    run starts over (step 0 is evaluated again). A line torn by a kill goes too. The first line after a resume still
    averages loss/accuracy over the steps since the resume only, not over the whole log window."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            logged = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            continue
        if step > 0 and isinstance(logged, int) and logged <= step:
            kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


# Fields that only change bookkeeping; any other difference would make the resumed run a different run.
_RESUME_FREE = {
    "out_dir",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "device",
    "peak_flops",
    "eval_batch_size",
    "resume_on_changed_data",
}
# The data fields: a run told to resume on changed data (resume_on_changed_data) may change them.
_DATA_FIELDS = {
    "train_json",
    "val_json",
    "confidence_threshold",
    "on_bad_image",
    "image_root",
    "allow_outside_root",
    "cache",
}


def check_resumable(saved: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    current = asdict(cfg)
    free = _RESUME_FREE | (_DATA_FIELDS if cfg.resume_on_changed_data else set())
    if cfg.mode == "frozen":  # the training features are extracted in eval_batch_size batches too: another batching
        free = free - {"eval_batch_size"}  # changes them in the last bit, and the resumed head would differ
    changed = sorted(k for k in current if k not in free and saved.get(k) != current[k])
    if changed:
        raise ValueError(
            f"cannot resume from {path}: config fields {changed} differ from the checkpoint's "
            f"({ {k: saved.get(k) for k in changed} }); restore them or use a new out_dir"
        )


def data_fingerprint(
    cfg: TrainConfig, pairs: list[PreferencePair], val_sets: dict[str, list[PreferencePair]], cache: LatentCache
) -> dict[str, str]:
    """What the training inputs were: each data file's sha256, digests of the kept training and validation pairs (the
    filters' and the image root's effect) and the cache's own fingerprint."""
    digest = lambda value: hashlib.sha256(json.dumps(value).encode()).hexdigest()
    kept = lambda ps: digest([[p.source, p.index, str(p.winner), str(p.loser), p.prompt, p.confidence] for p in ps])
    out = {f"train_json {path.resolve()}": file_digest(path) for path, _ in parse_sources(cfg.train_json)}
    out |= {f"val_json {Path(path).resolve()}": file_digest(path) for path in cfg.val_json}
    out["training pairs"] = kept(pairs)
    out["validation pairs"] = kept([p for v in val_sets.values() for p in v])
    out["cache"] = cache.fingerprint
    return out


def check_same_data(saved: dict[str, str], current: dict[str, str], cfg: TrainConfig, path: Path) -> None:
    """ValueError naming what changed between the checkpoint's data fingerprint and this run's, unless
    `cfg.resume_on_changed_data` (then a printed note)."""
    changed = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    if not changed:
        return
    status = lambda k: "not in this run" if k not in current else "new in this run" if k not in saved else "changed"
    what = "; ".join(f"{k}: {status(k)}" for k in changed)
    if cfg.resume_on_changed_data:
        print(f"resuming from {path} on changed data (resume_on_changed_data): {what}")
        return
    raise ValueError(
        f"cannot resume from {path}: the training inputs changed since it was written ({what}); the resumed run would "
        "see another data order. Restore the data, use a new out_dir, or set resume_on_changed_data=true to continue "
        "anyway"
    )


def check_export_target(target: Path) -> None:
    """ValueError now, not after training, if the final export could not replace `target` (out_dir/reward): it holds
    files that are not part of a reward checkpoint."""
    from engine.io.checkpoint import CHECKPOINT_FILES

    if not target.exists():
        return
    strangers = sorted(p.name for p in target.iterdir()) if target.is_dir() else [target.name]
    strangers = [name for name in strangers if name not in CHECKPOINT_FILES]
    if strangers:
        raise ValueError(
            f"{target} holds files that are not part of a reward checkpoint ({', '.join(strangers[:5])}); the export "
            "at the end of training would have to replace them: move them away or use another out_dir"
        )


def restore(model: nn.Module, optimizer: torch.optim.Optimizer, payload: dict) -> int:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, payload["model"], options=_state_options(strict=False))
    set_optimizer_state_dict(model, optimizer, payload["optimizer"], options=_state_options())
    torch.set_rng_state(payload["rng"]["torch"])
    if payload["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
    return int(payload["step"])


# -------------------------------------------------------------------------------------------------- evaluation


def interleave(winners: torch.Tensor, losers: torch.Tensor) -> torch.Tensor:
    """[B, ...] x 2 -> [2B, ...] as w0, l0, w1, l1, ...: pair i's images are images 2i and 2i+1 of the file, whose
    noise streams (seed path of Eq. 1) `bench.accuracy` reproduces."""
    return torch.stack([winners, losers], dim=1).flatten(0, 1)


@torch.no_grad()
def pair_rewards(
    score: Callable[..., torch.Tensor],
    pairs: list[PreferencePair],
    cache: LatentCache,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> torch.Tensor:
    """Rewards [n, 2] (winner, loser) of one file's pairs, with the validation noise: `score(z0, embeds, pooled,
    seed=, image_offset=)` is called on interleaved batches."""
    out = []
    for start in range(0, len(pairs), batch_size):
        b = cache.batch(pairs[start : start + batch_size])
        z0 = interleave(b["winners"], b["losers"]).to(device)
        embeds = b["prompt_embeds"].repeat_interleave(2, dim=0).to(device)
        pooled = b["pooled"].repeat_interleave(2, dim=0).to(device)
        out.append(score(z0, embeds, pooled, seed=seed, image_offset=2 * start).float().view(-1, 2).cpu())
    return torch.cat(out)


def accuracy(rewards: torch.Tensor) -> float:
    """Fraction of pairs [n, 2] with r_w > r_l; a tie counts as wrong (as HPSv3 counts)."""
    return float((rewards[:, 0] > rewards[:, 1]).float().mean())


def detect_peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of known GPUs (FLOP/s per device); None elsewhere (MFU is then not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    table = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}
    return next((v for k, v in table.items() if k in name), None)


# -------------------------------------------------------------------------------------------------------- train


def train(cfg: TrainConfig, on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Run (or resume) training; returns the final metrics. `on_step(step, metrics)` runs after every step (and its
    checkpoint), e.g. to stop a run early in tests."""
    validate(cfg)
    d = setup_distributed(cfg.device)
    if cfg.mode == "frozen" and d.world > 1:
        raise ValueError("mode='frozen' trains only the head (seconds on one device); run it without torchrun")
    if cfg.batch_size % d.world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes {d.world}")
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # One run per out_dir: rank 0 holds the lock until train() returns or raises (ranks of one run share out_dir).
    with exclusive_lock(out_dir, "another training run") if d.main else contextlib.nullcontext():
        return _train(cfg, d, out_dir, on_step)


def _train(cfg: TrainConfig, d: Dist, out_dir: Path, on_step: Callable[[int, dict], None] | None) -> dict[str, Any]:
    log = print if d.main else (lambda *a, **k: None)
    if d.main:  # a crashed writer's temp checkpoints: never read, each as large as a checkpoint
        for stale in (out_dir / "checkpoints").glob(".step_*.tmp-*"):
            stale.unlink(missing_ok=True)
    check_export_target(out_dir / "reward")  # refused now, not after every step has run

    # Cheap checks of the base and the cache first: reading and verifying the images is the slow part.
    if cfg.layers is not None:
        RewardConfig(layers=tuple(cfg.layers)).check_against(base_source(cfg.base)[0])
    cache = LatentCache(cfg.cache)

    # Data: pairs from the JSON files, tensors from the cache.
    roots = {"image_root": cfg.image_root, "allow_outside_root": cfg.allow_outside_root}
    pairs, report = load_pairs(cfg.train_json, cfg.confidence_threshold, cfg.on_bad_image, cfg.seed, **roots)
    val_sets = {str(p): read_file(p, None, cfg.on_bad_image, **roots) for p in cfg.val_json}  # every pair counts
    empty = [name for name, val_pairs in val_sets.items() if not val_pairs]
    if empty:
        raise ValueError(
            f"validation file(s) {empty} hold no pairs (no records, or every record skipped by on_bad_image='skip'): "
            "each val_json file needs at least one pair"
        )
    cache.check(pairs + [p for v in val_sets.values() for p in v])
    log(f"train pairs: {len(pairs)}\n{report}\nval pairs: {sum(map(len, val_sets.values()))}")
    fingerprint = data_fingerprint(cfg, pairs, val_sets, cache)
    found = latest_checkpoint(out_dir)  # its config and data are checked here; its state is restored below
    if found is not None:
        check_resumable(found[1]["config"], cfg, found[0])
        check_same_data(found[1]["fingerprint"], fingerprint, cfg, found[0])

    # Model: same seed on every rank, so the freshly initialised head is identical before sharding.
    torch.manual_seed(cfg.seed)
    engine = RewardEngine.from_base(
        cfg.base, layers=cfg.layers, t=cfg.t, dtype=torch.float32, device=d.device, head_hidden=cfg.head_hidden
    )
    model = TrainableReward(engine, cfg.grad_checkpointing)
    full = cfg.mode == "full"
    engine.backbone.requires_grad_(full)
    engine.head.requires_grad_(True)
    model.train()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if d.device.type == "cuda" else contextlib.nullcontext()
    local = slice(d.rank * cfg.batch_size // d.world, (d.rank + 1) * cfg.batch_size // d.world)

    if full:

        def step_rewards(step: int, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            """Rewards [2, b] (winners, losers) of this rank's slice, fresh noise at t."""
            z0 = torch.stack([batch["winners"], batch["losers"]])  # [2, b, C, h, w]
            noise = step_noise(step, (2, cfg.batch_size, *z0.shape[2:]), cfg.seed)[:, local]
            embeds, pooled = batch["prompt_embeds"], batch["pooled"]
            with autocast:
                r = model(
                    z0.flatten(0, 1).to(d.device),
                    embeds.repeat(2, 1, 1).to(d.device),
                    pooled.repeat(2, 1).to(d.device),
                    noise=noise.flatten(0, 1).to(d.device),
                )
            return r.view(2, -1)

        def validation_rewards(name: str) -> torch.Tensor:
            model.eval()
            with autocast:
                r = pair_rewards(model, val_sets[name], cache, cfg.eval_batch_size, cfg.eval_seed, d.device)
            model.train()
            return r
    else:
        # Frozen backbone: one forward per pair, fixed noise (train: seed, val: eval_seed as bench.accuracy does).
        def features(file_pairs: list[PreferencePair], seed: int) -> torch.Tensor:  # [n, 2, n_layers, D]
            with autocast:
                f = pair_rewards(
                    lambda *a, **k: model.features(*a, **k).flatten(1),
                    file_pairs,
                    cache,
                    cfg.eval_batch_size,
                    seed,
                    d.device,
                )
            return f.view(len(file_pairs), 2, len(model.layers), -1)

        train_features = features(pairs, cfg.seed)
        val_features = {name: features(v, cfg.eval_seed) for name, v in val_sets.items()}

        def step_rewards(step: int, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            f = train_features[torch.tensor(batch["indices"])].to(d.device)  # [b, 2, L, D]
            return model.head(f.transpose(0, 1).flatten(0, 1)).view(2, -1)

        def validation_rewards(name: str) -> torch.Tensor:
            with torch.no_grad():
                return model.head(val_features[name].flatten(0, 1).to(d.device)).view(-1, 2).cpu()

    def load_batch(step: int) -> dict[str, torch.Tensor]:
        indices = batch_indices(step, len(pairs), cfg.batch_size, cfg.seed)[local]  # this rank's pairs only
        return cache.batch([pairs[i] for i in indices]) if full else {"indices": indices}

    # Model FLOPs per step, measured once before sharding: 3x the forward (backward ~ 2x forward), the MFU convention.
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        step_rewards(0, load_batch(0))
    step_flops = 3 * counter.get_total_flops()
    peak = cfg.peak_flops or detect_peak_flops(d.device)

    if d.world > 1:
        shard(model, d.world, d.device)
    backbone_params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    groups = [{"params": list(model.head.parameters()), "lr": cfg.lr_head, "base_lr": cfg.lr_head}]
    if full:
        groups.insert(0, {"params": backbone_params, "lr": cfg.lr_backbone, "base_lr": cfg.lr_backbone})
    optimizer = torch.optim.AdamW(groups, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)

    step = 0
    if found is not None:
        path, payload = found
        step = restore(model, optimizer, payload)
        log(f"resumed from {path} (step {step}, data position {payload['data_position']})")
        found = payload = None  # the restored state lives in the model and optimizer now

    def evaluate() -> dict[str, Any]:
        rewards = {name: validation_rewards(name) for name in val_sets}
        everything = torch.cat(list(rewards.values()))
        return {
            "val_accuracy": accuracy(everything),
            "val_accuracy_per_file": {name: accuracy(r) for name, r in rewards.items()},
            "reward_mean": float(everything.mean()),
            "reward_std": float(everything.std()),
        }

    if d.main:
        truncate_log(out_dir / "log.jsonl", step)
    log_file = open(out_dir / "log.jsonl", "a") if d.main else None  # noqa: SIM115 (open for the whole run)
    metrics: dict[str, Any] = {}
    if step == 0:  # the untrained baseline (~50%), logged as step 0
        metrics = {"step": 0, **evaluate()}
        log(f"step 0 val_accuracy {metrics['val_accuracy']:.4g}")
        if log_file is not None:
            log_file.write(json.dumps(metrics) + "\n")
    window = {"loss": 0.0, "correct": 0.0, "n": 0, "t0": time.perf_counter(), "steps": 0}
    while step < cfg.steps:
        scale = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * scale
        r = step_rewards(step, load_batch(step))
        loss = bt_loss(r[0], r[1])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.grad_clip)
        optimizer.step()
        step += 1
        window["loss"] += loss.detach()
        window["correct"] += (r[0] > r[1]).float().mean().detach()
        window["steps"] += 1

        metrics = {"step": step}
        if step % cfg.log_every == 0 or step == cfg.steps:
            loss_acc = all_mean(torch.stack([window["loss"], window["correct"]]).float() / window["steps"], d)
            elapsed = time.perf_counter() - window["t0"]  # the all_reduce / .tolist() above synchronised the device
            loss_value, acc_value = loss_acc.tolist()
            metrics |= {"loss": loss_value, "accuracy": acc_value, "lr_head": cfg.lr_head * scale}
            if full:
                metrics["lr_backbone"] = cfg.lr_backbone * scale
            metrics["pairs_per_s"] = window["steps"] * cfg.batch_size / elapsed
            metrics["mfu"] = step_flops * window["steps"] / elapsed / peak if peak else None
            window = {"loss": 0.0, "correct": 0.0, "n": 0, "t0": time.perf_counter(), "steps": 0}
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            metrics |= evaluate()
        if len(metrics) > 1 and log_file is not None:
            log(
                " ".join(
                    f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in metrics.items()
                    if not isinstance(v, dict)
                )
            )
            log_file.write(json.dumps(metrics) + "\n")
            log_file.flush()
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps:
            save_checkpoint(model, optimizer, step, cfg, d, fingerprint)
        if on_step is not None:
            on_step(step, metrics)

    if "val_accuracy" not in metrics:  # resumed at the last step: nothing ran, evaluate for the export
        metrics |= evaluate()
    export(engine, model, cfg, metrics, d)
    if log_file is not None:
        log_file.close()
    return metrics


def export(engine: RewardEngine, model: TrainableReward, cfg: TrainConfig, metrics: dict, d: Dist) -> Path:
    """The final reward checkpoint (out_dir/reward) via `engine.save_pretrained`, with the validation reward mean/std
    (for `score(normalize=True)`) and what bench.accuracy needs to reproduce the validation."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_state_options())  # collective under FSDP
    target = Path(cfg.out_dir) / "reward"
    if d.main:
        if d.world > 1:  # the engine's modules hold shards now: write from an unsharded copy of the final weights
            engine = RewardEngine.from_base(
                cfg.base, layers=cfg.layers, t=cfg.t, dtype=torch.float32, head_hidden=cfg.head_hidden
            )
            engine.backbone.load_state_dict(
                {engine_backbone_key(k): v for k, v in state.items() if engine_backbone_key(k) is not None},
                strict=False,
            )
            engine.head.load_state_dict({k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")})
        engine.reward_config = dataclasses.replace(
            engine.reward_config, reward_mean=metrics["reward_mean"], reward_std=max(metrics["reward_std"], 1e-6)
        )
        cache_settings = LatentCache(cfg.cache).settings
        engine.save_pretrained(
            target,
            include_backbone=cfg.mode == "full",
            training={
                "mode": cfg.mode,
                "steps": cfg.steps,
                "eval_seed": cfg.eval_seed,
                "val_accuracy": metrics["val_accuracy"],
                "max_sequence_length": cache_settings["max_sequence_length"],
                "max_side": cache_settings["max_side"],
                "cache_dtype": cache_settings["dtype"],
            },
        )
        print(f"reward checkpoint: {target} (val accuracy {metrics['val_accuracy']:.4f})")
    if d.world > 1:
        dist.barrier()
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="JSON file of TrainConfig fields (defaults at the top of training/train.py)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=100 mode=frozen")
    args = parser.parse_args(argv)
    train(load_config(args.config, args.overrides))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()


__all__ = ["TrainConfig", "TrainableReward", "bt_loss", "get_lr", "load_config", "train"]
