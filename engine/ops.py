"""The fused-op seam of the backbone: each call goes to a Triton kernel or its pure-torch reference (`kernels/`).

The engine picks the backend once (`kernels.resolve`: `auto` | `triton` | `torch`) and runs its forward inside
`use(backend)`; the block code in `mmdit.py` calls these functions and never branches on the backend itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

import kernels

_current = "torch"


@contextlib.contextmanager
def use(backend: str) -> Iterator[None]:
    """Run the enclosed forward with `backend` ("triton" or "torch", already resolved)."""
    global _current
    previous, _current = _current, backend
    try:
        yield
    finally:
        _current = previous


def current() -> str:
    return _current


def near_clean(z0: torch.Tensor, t: float, **kw) -> torch.Tensor:
    return kernels.near_clean(z0, t, backend=_current, **kw)


def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return kernels.layernorm_modulate(x, shift, scale, backend=_current)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return kernels.gated_residual(x, y, gate, backend=_current)


def gated_residual_layernorm_modulate(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return kernels.gated_residual_layernorm_modulate(x, y, gate, shift, scale, backend=_current)


def mean_pool(h: torch.Tensor) -> torch.Tensor:
    return kernels.mean_pool(h, backend=_current)


def mean_pool_into(h: torch.Tensor, out: torch.Tensor, slot: int) -> None:
    kernels.mean_pool_into(h, out, slot, backend=_current)
