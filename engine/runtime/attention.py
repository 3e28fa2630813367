"""The one attention seam. Every attention in the engine goes through `attention()`.

Layout: q, k, v are `[B, N, H, head_dim]` (what a linear projection gives after a free `view`); the output has q's
layout. Backends:
- `sdpa`: `F.scaled_dot_product_attention`, letting PyTorch pick flash / cuDNN / memory-efficient kernels.
- `cudnn`, `flash`, `efficient`, `math`: SDPA pinned to that PyTorch backend (raises if it cannot run).
- `flash_attn`: the flash-attn package (FA3's `flash_attn_interface` on Hopper when importable, else FA2).
- `sdpa_cudnn_first`: SDPA with the priority cuDNN > flash > memory-efficient > math (a shape cuDNN rejects falls
  through to the next).
- `auto`: FA3 (`flash_attn_interface`) on Hopper (sm90) if importable, else `sdpa_cudnn_first` on CUDA, else
  `sdpa`. FA2 alone is never picked: it runs the same algorithm as SDPA's flash kernel, which cuDNN beats at SD3's
  head dim 64 on Hopper (DESIGN.md, H200: 412 vs 286 TFLOP/s); FA2 stays available as `flash_attn`.
The softmax scale is head_dim**-0.5 and there is no mask, as in SD3's joint attention.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("auto", "sdpa", "sdpa_cudnn_first", "cudnn", "flash", "efficient", "math", "flash_attn")
_SDPA_CHOICES: dict[str, list[SDPBackend] | None] = {
    "sdpa": None,
    "sdpa_cudnn_first": [
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    ],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "flash": [SDPBackend.FLASH_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "math": [SDPBackend.MATH],
}


@functools.cache
def _fa3_func() -> Callable | None:
    """FA3's `flash_attn_func` (Hopper), None when `flash_attn_interface` does not import."""
    try:
        from flash_attn_interface import flash_attn_func

        return flash_attn_func
    except ImportError:
        return None


@functools.cache
def _fa2_func() -> Callable | None:
    """FA2's `flash_attn_func`, None when `flash_attn` does not import."""
    try:
        from flash_attn import flash_attn_func

        return flash_attn_func
    except ImportError:
        return None


def _flash_attn_func() -> Callable | None:
    """What the explicit `flash_attn` backend runs: FA3 first, then FA2; None when neither imports."""
    return _fa3_func() or _fa2_func()


def _fa3_or_fa2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    fn = _flash_attn_func()
    if fn is None:
        raise RuntimeError(
            "attention backend 'flash_attn' requested but neither flash_attn_interface (FA3) nor "
            "flash_attn (FA2) can be imported; pip install flash-attn, or use backend='sdpa'"
        )
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError(f"attention backend 'flash_attn' needs CUDA fp16/bf16 inputs, got {q.device} {q.dtype}")
    out = fn(q, k, v)
    return out[0] if isinstance(out, tuple) else out


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, choices: list[SDPBackend] | None) -> torch.Tensor:
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # -> [B, H, N, hd]: SDPA's layout, a view
    if choices is None:
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        with sdpa_kernel(choices, set_priority=True):
            out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2)


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The concrete backend `auto` means on this device (env DITREWARD_ATTENTION overrides the default)."""
    backend = backend or os.environ.get("DITREWARD_ATTENTION", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if device.type != "cuda":
        return "sdpa"
    if torch.cuda.get_device_capability(device)[0] == 9 and _fa3_func() is not None:
        return "flash_attn"
    # cuDNN attention measured fastest for head_dim 64 on Hopper (DESIGN.md: 412 vs 286 TFLOP/s for flash).
    return "sdpa_cudnn_first"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Softmax attention without mask. q [B, Nq, H, hd], k/v [B, Nk, H, hd] -> [B, Nq, H, hd].

    `backend` is a concrete name from `resolve_backend`; a pinned SDPA backend that cannot run the inputs raises.
    """
    if backend == "flash_attn":
        return _fa3_or_fa2(q, k, v)
    if backend not in _SDPA_CHOICES:
        raise ValueError(f"attention backend must be one of {BACKENDS[1:]}, got {backend!r}")
    return _sdpa(q, k, v, _SDPA_CHOICES[backend])
