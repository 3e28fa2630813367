"""Build the backbone from weight sources: blocks on the meta device filled with `load_state_dict(assign=True)`, one
tensor at a time cast to the target dtype/device, so no full-precision copy of the backbone ever exists. Every
weight is checked (floating point, finite) with the key and the file it came from."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engine.config import BackboneConfig
from engine.io.single_file import single_file_source
from engine.io.sources import TensorSource, describe_source, diffusers_dir_source
from engine.model.mmdit import MMDiTReward, Readout, diffusers_state_dict

if TYPE_CHECKING:
    from engine.io.lora import LoraAdapter


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
    readout: Readout | tuple[int, ...],
    sources: list[Mapping[str, torch.Tensor]],
    dtype: torch.dtype,
    device: torch.device | str,
    adapter: LoraAdapter | None = None,
) -> MMDiTReward:
    """Build the blocks a head's `readout` needs (a tuple: the pooled blocks) on meta and fill them from `sources`
    (later ones override earlier ones). Blocks missing from the sources are refused before any tensor is read; every
    tensor passes `checked_weights`. `adapter` (`engine.io.lora.read_lora_adapter`) is merged into the weights it
    adapts as they are read."""
    if adapter is not None:  # a last source: the adapted weights, each merged from the sources before it
        sources = [*sources, adapter.over(sources)]
    with torch.device("meta"):
        model = MMDiTReward(cfg, readout)
    held = _block_indices(sources)
    _check_depth(model.readout.blocks, held, sources)
    expected = diffusers_state_dict(model)
    allowed = full_model_keys(cfg, max(held, default=-1) + 1)  # as deep as the sources name blocks
    described = [(source, describe_source(source)) for source in sources]  # (a description walks the source's keys)
    for source, description in described:
        unexpected = sorted(set(source) - allowed)
        if unexpected:
            raise ValueError(
                f"unexpected key {unexpected[0]!r} in {description} ({len(unexpected)} in all): not "
                f"a key of an SD3 transformer with {cfg.num_layers} blocks; wrong model or config?"
            )
    state, where = {}, {}
    for key, meta in expected.items():
        found = next(((s, d) for s, d in reversed(described) if key in s), None)
        if found is None:
            raise ValueError(f"missing key {key!r} in {', '.join(d for _, d in described)}")
        source, description = found
        tensor = source[key]
        if tuple(tensor.shape) != tuple(meta.shape):
            raise ValueError(
                f"shape mismatch for {key!r} in {description}: checkpoint {list(tensor.shape)}, "
                f"model {list(meta.shape)}"
            )
        check_floating(key, tensor, description)
        # an in-memory model's tensors are copied, never adopted: the engine must not change when that model is
        # trained further (e.g. the policy's own transformer). Files are read into fresh tensors anyway.
        state[key] = tensor.to(device=device, dtype=dtype, copy=not isinstance(source, TensorSource))
        where[key] = description
    checked_weights(state, where, dtype)
    model.load_state_dict(state, assign=True, strict=True)
    model.merged_adapter = None if adapter is None else adapter.describe()
    return model.eval().requires_grad_(False)


def _block_indices(sources: list[Mapping[str, torch.Tensor]]) -> set[int]:
    """The indices of the blocks the sources name keys of (key names only: nothing is read)."""
    return {int(k.split(".")[1]) for s in sources for k in s if k.startswith("transformer_blocks.")}


def _check_depth(layers: tuple[int, ...], held: set[int], sources: list[Mapping[str, torch.Tensor]]) -> None:
    """Every block up to the deepest pooled one is among `held`, the sources' block indices."""
    depth = next(i for i in range(len(held) + 1) if i not in held)  # blocks 0..depth-1 are all there
    missing = [i for i in layers if i >= depth]
    if missing:
        held_by = ", ".join(describe_source(s) for s in sources)
        raise ValueError(
            f"reward layers {missing} need blocks 0..{max(layers)}, but {held_by} "
            f"holds {depth} blocks (0..{depth - 1}): a truncated or shallower base model?"
        )


def check_floating(key: str, tensor: torch.Tensor, where: str) -> None:
    """Refuse an integer/bool tensor (`where`: the file it came from) before a cast to float would hide it."""
    if not tensor.is_floating_point():
        raise ValueError(
            f"tensor {key!r} in {where} is {tensor.dtype}, but weights must be floating point: a corrupt file or "
            f"not a model checkpoint"
        )


def checked_weights(
    tensors: Mapping[str, torch.Tensor], where: Mapping[str, str] | str, dtype: torch.dtype | None = None
) -> Mapping[str, torch.Tensor]:
    """Refuse weights that are not finite, naming the tensor and its file (`where`: one description for all, or one
    per key). `tensors` are the loaded (cast) values: one pass over memory, one device sync for all of them; a value
    finite in the file but not in the target `dtype` (1e6 in float16) is refused too. Callers run `check_floating`
    on each tensor before casting it (a cast to float would hide an integer tensor)."""
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


def random_backbone(
    cfg: BackboneConfig,
    readout: Readout | tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device | str,
    seed: int = 0,
) -> MMDiTReward:
    """The blocks `readout` needs (see `load_backbone`) with random weights, built straight on `device` (an 8B model
    takes seconds on a GPU). Linear weights ~ N(0, 0.02²), biases 0.01·N(0,1), qk-norm weights ~1; the positional
    table is SD3's real sincos."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    with torch.device("meta"):
        model = MMDiTReward(cfg, readout)
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
