"""Rowwise FP8 (e4m3) quantisation of activations, optionally fused with the tanh-GELU that produces them.

    y[m, :] = act(x[m, :]);  scale[m] = max(|y[m, :]|, tiny) / 448;  q[m, :] = e4m3(y[m, :] / scale[m])

One pass over x (read bf16, write 1-byte fp8 + one fp32 per row), where the eager version is five (abs, amax, upcast,
divide, cast) and the FFN's GELU a sixth. `torch._scaled_mm` then takes (q, scale) as its rowwise-scaled A operand.
Inference only (no backward): the fp8 path is for scoring, training runs in bf16.
"""

from __future__ import annotations

import math

import torch

from kernels.backend import describe, interpreting, resolve, triton_helper, triton_kernel

try:
    import triton.language as tl
except ImportError:  # the torch backend needs no triton
    tl = None

E4M3_MAX = 448.0
_TINY = 1e-12  # an all-zero row gets scale tiny/448 instead of 0 (no division by zero, q = 0)


@triton_helper
def e4m3_scale(amax):
    # the row's scale: its largest magnitude maps to e4m3's largest finite value (an all-zero row gets tiny / 448)
    return tl.maximum(amax, 1e-12) / 448.0


@triton_helper
def to_e4m3(y, scale, EXACT_ROUNDING: tl.constexpr):
    # e4m3(y / scale), round to nearest even (fp32 in)
    v = y / scale
    if EXACT_ROUNDING:
        # Triton's CPU interpreter mis-rounds fp32->e4m3 casts that carry into the exponent (126.2 -> 64, not 128).
        # Round to nearest-even onto the e4m3 grid first (3 mantissa bits, subnormal step 2^-9), so its cast is
        # exact; the GPU's cvt.rn instruction rounds the same way by itself. Adding and subtracting 1.5 * 2^23 rounds
        # |x| < 2^22 to an integer, ties to even.
        step = tl.exp2(tl.maximum(tl.floor(tl.log2(tl.maximum(tl.abs(v), 1.0 / 512.0))), -6.0) - 3.0)
        v = ((v / step + 12582912.0) - 12582912.0) * step
    return v.to(tl.float8e4nv)


@triton_helper
def _gelu_tanh(y):
    # 0.5 y (1 + tanh(u)), u = sqrt(2/pi) (y + 0.044715 y^3), tanh(u) = 2 sigmoid(2u) - 1; u clamped: exp stays finite
    u = tl.minimum(tl.maximum(0.7978845608028654 * (y + 0.044715 * y * y * y), -15.0), 15.0)
    return y / (1.0 + tl.exp(-2.0 * u))


@triton_kernel
def _quantize_rows_kernel(
    x_ptr, q_ptr, scale_ptr, n_cols, rows_per_batch, stride_xb, stride_xm, stride_q,
    APPLY_GELU: tl.constexpr, EXACT_ROUNDING: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # y = gelu_tanh(x) if APPLY_GELU else x;  scale = max(|y|) / 448;  q = e4m3(y / scale)   (fp32 math)
    # Row r of x is x[r // rows_per_batch, r % rows_per_batch, :] (a [B, M, K] view with any row and batch strides:
    # the image rows of the joint attention output are read in place). One program per row, in BLOCK-wide chunks:
    # pass 1 finds the row's max, pass 2 (re-reading the row from L2) scales and stores. A whole 4D-wide row (9728
    # at SD3.5-L) in registers at once spilled: the single-pass version profiled at ~600 GB/s on an H200.
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + (row // rows_per_batch) * stride_xb + (row % rows_per_batch) * stride_xm
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        y = tl.load(x_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        if APPLY_GELU:
            y = _gelu_tanh(y)
        amax = tl.maximum(amax, tl.abs(y))
    scale = e4m3_scale(tl.max(amax, axis=0))
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        y = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if APPLY_GELU:
            y = _gelu_tanh(y)
        tl.store(q_ptr + row * stride_q + cols, to_e4m3(y, scale, EXACT_ROUNDING), mask=mask)
    tl.store(scale_ptr + row, scale)


def _launch(x: torch.Tensor, gelu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    batch, rows_per_batch, cols = x.shape
    rows = batch * rows_per_batch
    q = torch.empty(rows, cols, device=x.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty(rows, 1, device=x.device, dtype=torch.float32)
    if rows:
        block = min(1 << math.ceil(math.log2(cols)), 2048)
        _quantize_rows_kernel[(rows,)](
            x, q, scale, cols, rows_per_batch, x.stride(0), x.stride(1), q.stride(0),
            APPLY_GELU=gelu, EXACT_ROUNDING=interpreting(), BLOCK=block, num_warps=4,
        )  # fmt: skip
    return q, scale


def quantize_rowwise(
    x: torch.Tensor, *, gelu: bool = False, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] or [B, M, K] (bf16/fp16/fp32) -> (q [B*M, K] float8_e4m3fn, scale [B*M, 1] fp32), x ≈ q * scale.

    A [B, M, K] view is read in place whatever its batch and row strides (e.g. the image rows of a [B, N, K]
    tensor); only K must be contiguous, else x is copied first. `gelu=True` quantises tanh-GELU(x) instead (the FFN's
    hidden activation)."""
    if not isinstance(x, torch.Tensor) or x.ndim not in (2, 3) or not x.is_floating_point():
        raise TypeError(f"quantize_rowwise expects a floating-point [M, K] or [B, M, K] tensor, got {describe(x)}")
    if x.shape[-1] == 0:
        raise ValueError(f"quantize_rowwise needs rows of at least one element, got shape {tuple(x.shape)}")
    if resolve(backend, x.device) == "torch":
        return quantize_rowwise_ref(x.reshape(-1, x.shape[-1]), gelu=gelu)
    if x.stride(-1) != 1:
        x = x.contiguous()
    return _launch(x if x.ndim == 3 else x[None], gelu)


def quantize_rowwise_ref(x: torch.Tensor, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch reference (fp32 math)."""
    y = x.float()
    if gelu:
        y = torch.nn.functional.gelu(y, approximate="tanh")
    scale = y.abs().amax(dim=-1, keepdim=True).clamp_min(_TINY) / E4M3_MAX
    return (y / scale).to(torch.float8_e4m3fn), scale
