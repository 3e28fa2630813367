"""Deterministic cost counters: FLOPs and parameter bytes of a forward, counted on meta tensors (no memory, no GPU).

`engine_costs("sd35-large", 512)` builds the slimmed backbone on the meta device and counts the FLOPs of one
reward forward with `torch.utils.flop_counter`; `diffusers_flops` does the same for diffusers' full
`SD3Transformer2DModel` forward. Both are exact for the shapes given (matmuls, convs and attention; elementwise ops
are not counted, as is the convention).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils.flop_counter import FlopCounterMode

from engine.config import BackboneConfig, RewardConfig
from engine.model.mmdit import MMDiTReward, Readout
from engine.runtime.backends import Backends


def _inputs(cfg: BackboneConfig, resolution: int, text_len: int, batch: int, dtype: torch.dtype):
    side = resolution // 8

    def empty(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, dtype=dtype, device="meta")

    return (
        empty(batch, cfg.in_channels, side, side),
        empty(batch, text_len, cfg.joint_attention_dim),
        empty(batch, cfg.pooled_projection_dim),
        empty(batch, cfg.in_channels, side, side),
    )


def engine_costs(
    preset: str | BackboneConfig,
    resolution: int = 512,
    text_len: int = 333,
    batch: int = 1,
    layers: tuple[int, ...] | None = None,
    readout: Readout | None = None,
) -> dict[str, float]:
    """FLOPs per image of the engine's reward forward (conditioning included; the head's are not counted),
    parameter bytes (bf16) and the number of dispatched aten ops, counted on fake tensors. `preset`: a preset name
    or a config (a checkpoint's); `layers`: the pooled layers (default: the backbone's default), or `readout`: what
    the head reads (an engine's `backbone.readout`, e.g. a query-attention head's image and text tokens)."""
    cfg = preset if isinstance(preset, BackboneConfig) else BackboneConfig.from_name(preset)
    if readout is None:
        readout = Readout(pooled=RewardConfig.for_backbone(cfg, **({"layers": layers} if layers else {})).layers)
    ops_seen: Counter[str] = Counter()
    with torch.device("meta"):
        model = MMDiTReward(cfg, readout).to(torch.bfloat16)
    z0, prompt_embeds, pooled, noise = _inputs(cfg, resolution, text_len, batch, torch.bfloat16)
    with FlopCounterMode(display=False) as counter, _OpCounter(ops_seen), torch.no_grad():
        cond = model.condition(prompt_embeds, pooled, 0.1)  # (the noise level changes no shape)
        model(z0, cond.context, cond.modulation, cond.t, Backends(kernels="torch"), noise=noise, temb=cond.temb)
    params = sum(p.numel() for p in model.parameters())
    return {
        "flops_per_image": counter.get_total_flops() / batch,
        "param_bytes_bf16": 2 * params,
        "dispatched_ops": sum(ops_seen.values()),
    }


def diffusers_flops(preset: str, resolution: int = 512, text_len: int = 333, batch: int = 1) -> float:
    """FLOPs per image of diffusers' full SD3Transformer2DModel forward at the same shape."""
    from diffusers import SD3Transformer2DModel

    cfg = BackboneConfig.from_name(preset)
    with torch.device("meta"):
        model = SD3Transformer2DModel(out_channels=cfg.in_channels, **cfg.to_dict()).to(torch.bfloat16)
    z, prompt_embeds, pooled, _ = _inputs(cfg, resolution, text_len, batch, torch.bfloat16)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(
            hidden_states=z,
            encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled,
            timestep=torch.full((batch,), 100.0, device="meta"),
        )
    return counter.get_total_flops() / batch


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts every aten op dispatched (a proxy for kernel launches in eager mode)."""

    def __init__(self, counts: Counter[str]):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))
