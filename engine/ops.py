"""The fused-op seam of the backbone: each call goes to a Triton kernel or its pure-torch reference (`kernels/`).

The engine picks the backend once (`kernels.resolve`: `auto` | `triton` | `torch`) and runs its forward inside
`use(backend)`; the block code in `mmdit.py` calls these functions and never branches on the backend itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F

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


class Float8Activation(NamedTuple):
    """An activation quantised by the op that produced it, for an FP8 linear (`engine.quant.Float8Linear`): rows
    [M, K] e4m3, scales [M, 1], the leading shape to restore and the dtype to compute the output in."""

    data: torch.Tensor
    scale: torch.Tensor
    lead_shape: torch.Size
    dtype: torch.dtype


def _feeds_fp8(into: torch.nn.Module | None) -> bool:
    """Whether `into` (the consuming linear) takes a `Float8Activation`."""
    return getattr(into, "takes_fp8_input", False)


def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, into: torch.nn.Module | None = None):
    """LN(x) * (1 + scale) + shift. `into` is the linear that consumes the result: an FP8 one gets it quantised in
    the same pass, as a `Float8Activation` (never written in bf16)."""
    if _feeds_fp8(into):
        q, row_scale = kernels.layernorm_modulate_fp8(x, shift, scale, backend=_current)
        return Float8Activation(q, row_scale, x.shape[:-1], x.dtype)
    return kernels.layernorm_modulate(x, shift, scale, backend=_current)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return kernels.gated_residual(x, y, gate, backend=_current)


def gated_residual_layernorm_modulate(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    into: torch.nn.Module | None = None,
):
    """(x + gate * y, its `layernorm_modulate`); `into` as in `layernorm_modulate`."""
    if _feeds_fp8(into):
        x_new, q, row_scale = kernels.gated_residual_layernorm_modulate_fp8(x, y, gate, shift, scale, backend=_current)
        return x_new, Float8Activation(q, row_scale, x.shape[:-1], x.dtype)
    return kernels.gated_residual_layernorm_modulate(x, y, gate, shift, scale, backend=_current)


def mean_pool(h: torch.Tensor) -> torch.Tensor:
    return kernels.mean_pool(h, backend=_current)


def mean_pool_into(h: torch.Tensor, out: torch.Tensor, slot: int) -> None:
    kernels.mean_pool_into(h, out, slot, backend=_current)


def joint_qkv(img_qkv: torch.Tensor, txt_qkv: torch.Tensor | None, heads: int, norms: tuple | None):
    return kernels.joint_qkv(img_qkv, txt_qkv, heads, norms, backend=_current)


def linear_gelu(x, proj: torch.nn.Module, into: torch.nn.Module | None = None):
    """tanh-GELU(proj(x)). `into` is the linear that consumes the result: an FP8 one gets the GELU fused into the
    quantisation of its input, as a `Float8Activation`."""
    if _feeds_fp8(into):
        h = proj(x)
        q, scale = kernels.quantize_rowwise(h.reshape(-1, h.shape[-1]), gelu=True, backend=_current)
        return Float8Activation(q, scale, h.shape[:-1], h.dtype)
    if isinstance(proj, torch.nn.Linear) and x.is_cuda and not torch.is_grad_enabled() and _gelu_epilogue_ok(x.dtype):
        # cuBLASLt's GELU epilogue: the activation is applied to the fp32 accumulator inside the GEMM, saving a read
        # and a write of the 4D-wide hidden state (the largest elementwise pass of a block).
        out = torch._addmm_activation(proj.bias, x.reshape(-1, x.shape[-1]), proj.weight.t(), use_gelu=True)
        return out.view(*x.shape[:-1], -1)
    return F.gelu(proj(x), approximate="tanh")


_gelu_epilogue_checked: bool | None = None


def _gelu_epilogue_ok(dtype: torch.dtype) -> bool:
    """Use `torch._addmm_activation(use_gelu=True)` only after checking, once per process, that it computes SD3's
    tanh-GELU on this device: in fp32 (no TF32) its output must be 10x closer to tanh-GELU than to exact GELU (the
    CPU version is exact GELU; a CUDA build whose epilogue differed falls back to F.gelu with a warning)."""
    global _gelu_epilogue_checked
    if _gelu_epilogue_checked is None:
        g = torch.Generator(device="cuda").manual_seed(0)
        x, w, b = (torch.randn(*shape, device="cuda", generator=g) for shape in ((64, 256), (512, 256), (512,)))
        tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
        try:
            fused = torch._addmm_activation(b, x, w.t(), use_gelu=True).double()
            pre = F.linear(x.double(), w.double(), b.double())
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        err_tanh = float((fused - F.gelu(pre, approximate="tanh")).norm())
        err_exact = float((fused - F.gelu(pre)).norm())
        _gelu_epilogue_checked = err_tanh * 10 < err_exact
        if not _gelu_epilogue_checked:
            import warnings

            warnings.warn(
                f"torch._addmm_activation's GELU is not tanh-GELU here (errors vs tanh {err_tanh:.1e}, vs "
                f"exact {err_exact:.1e}); using F.gelu",
                RuntimeWarning,
                stacklevel=2,
            )
    return _gelu_epilogue_checked and dtype in (torch.bfloat16, torch.float16, torch.float32)
