"""What the benchmarks feed the engine: benchmark dtype names as engine arguments, and random inputs.

Shared by `bench.latency` and `bench.gpu_check`.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.config import BackboneConfig

BASE_DTYPES = ("bf16", "fp8", "fp32")
VARIANTS = {  # "+<variant>" suffixes of a benchmark dtype name, and the engine arguments they set
    "adaln": {"fp8_adaln": True},  # adaLN weights e4m3 too (fp8 only)
    "fast-accum": {"fp8_fast_accum": True},  # Hopper's fast FP8 accumulation (fp8 only)
    "host-adaln": {"adaln_on_host": True},  # adaLN weights in pinned host memory, streamed by condition()
}
FP8_ONLY = ("adaln", "fast-accum")


def dtype_kwargs(name: str) -> dict[str, Any]:
    """Engine-constructor arguments for a benchmark dtype name `<bf16|fp8|fp32>[+variant...]`, e.g.
    "fp8+host-adaln+fast-accum" (variants: see `VARIANTS`)."""
    base, *variants = name.split("+")
    unknown = [v for v in variants if v not in VARIANTS]
    if base not in BASE_DTYPES or unknown or len(set(variants)) != len(variants):
        raise ValueError(f"benchmark dtype must be <{'|'.join(BASE_DTYPES)}>[+{'|+'.join(VARIANTS)}...], got {name!r}")
    if base != "fp8" and any(v in FP8_ONLY for v in variants):
        raise ValueError(f"{name!r}: +{' / +'.join(FP8_ONLY)} apply to fp8 only")
    kwargs: dict[str, Any] = {"dtype": base}
    for v in variants:
        kwargs |= VARIANTS[v]
    return kwargs


def random_inputs(
    cfg: BackboneConfig, batch: int, side: int, text_len: int, *, generator, device, dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random latents [B, C, side/8, side/8], prompt embeddings [B, text_len, joint_dim] and pooled [B, pooled_dim]."""
    kw = dict(generator=generator, device=device, dtype=dtype)
    return (
        torch.randn(batch, cfg.in_channels, side // 8, side // 8, **kw),
        torch.randn(batch, text_len, cfg.joint_attention_dim, **kw),
        torch.randn(batch, cfg.pooled_projection_dim, **kw),
    )


def latent_inputs(cfg: BackboneConfig, batch: int, side: int, text_len: int, device, dtype, n: int = 3) -> list:
    """`n` distinct input sets (rotated by the timer so no call re-reads the previous one from L2)."""
    return [
        random_inputs(
            cfg,
            batch,
            side,
            text_len,
            generator=torch.Generator(device=device).manual_seed(i),
            device=device,
            dtype=dtype,
        )  # fmt: skip
        for i in range(n)
    ]
