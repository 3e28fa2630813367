"""The original single-file SD3/SD3.5 layout (``model.diffusion_model.joint_blocks...``): a key plan to the diffusers
names (fused qkv split, adaLN halves swapped), applied lazily per tensor, and its inverse for writing test files."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from engine.config import BackboneConfig
from engine.io.sources import TensorSource

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
