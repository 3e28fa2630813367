"""Rowwise FP8 (e4m3) quantisation of activations, optionally fused with the tanh-GELU that produces them.

    y[m, :] = act(x[m, :]);  scale[m] = max(|y[m, :]|, tiny) / 448;  q[m, :] = e4m3(y[m, :] / scale[m])

One pass over x (read bf16, write 1-byte fp8 + one fp32 per row), where the eager version is five (abs, amax, upcast,
divide, cast) and the FFN's GELU a sixth. `torch._scaled_mm` then takes (q, scale) as its rowwise-scaled A operand.
Inference only (no backward): the fp8 path is for scoring, training runs in bf16.
"""

from __future__ import annotations

import math

import torch

from kernels.backend import describe, resolve, triton_kernel

try:
    import triton.language as tl
except ImportError:  # the torch backend needs no triton
    tl = None

E4M3_MAX = 448.0
_TINY = 1e-12  # an all-zero row gets scale tiny/448 instead of 0 (no division by zero, q = 0)


@triton_kernel
def _quantize_rows_kernel(
    x_ptr, q_ptr, scale_ptr, n_cols, stride_x, stride_q, APPLY_GELU: tl.constexpr, BLOCK: tl.constexpr
):
    # y = gelu_tanh(x) if APPLY_GELU else x;  scale = max(|y|) / 448;  q = e4m3(y / scale)   (fp32 math)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    y = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if APPLY_GELU:
        inner = 0.7978845608028654 * (y + 0.044715 * y * y * y)  # sqrt(2/pi) * (y + 0.044715 y^3)
        inner = tl.minimum(tl.maximum(inner, -15.0), 15.0)  # tanh is +-1 in fp32 beyond; keeps exp() finite
        y = 0.5 * y * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0))  # tanh(u) = 2 sigmoid(2u) - 1
    scale = tl.maximum(tl.max(tl.abs(y), axis=0), 1e-12) / 448.0
    v = y / scale
    # Round-to-nearest-even onto the e4m3 grid in fp32 (3 mantissa bits, subnormal step 2^-9) so that the cast below
    # is exact: Triton's CPU interpreter mis-rounds fp32->e4m3 casts that carry into the exponent (126.2 -> 64, not
    # 128); rounding here keeps the interpreter and the GPU bit-identical. 1.5 * 2^23 added and subtracted rounds
    # |x| < 2^22 to an integer, ties to even.
    step = tl.exp2(tl.maximum(tl.floor(tl.log2(tl.maximum(tl.abs(v), 1.0 / 512.0))), -6.0) - 3.0)
    v = ((v / step + 12582912.0) - 12582912.0) * step
    tl.store(q_ptr + row * stride_q + cols, v.to(tl.float8e4nv), mask=mask)
    tl.store(scale_ptr + row, scale)


def _launch(x: torch.Tensor, gelu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = x.shape
    q = torch.empty(rows, cols, device=x.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty(rows, 1, device=x.device, dtype=torch.float32)
    if rows:
        block = 1 << math.ceil(math.log2(cols))
        _quantize_rows_kernel[(rows,)](
            x, q, scale, cols, x.stride(0), q.stride(0), APPLY_GELU=gelu, BLOCK=block,
            num_warps=4 if block <= 4096 else 8,
        )  # fmt: skip
    return q, scale


def quantize_rowwise(
    x: torch.Tensor, *, gelu: bool = False, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (bf16/fp16/fp32, last dim contiguous) -> (q [M, K] float8_e4m3fn, scale [M, 1] fp32), x ≈ q * scale.

    `gelu=True` quantises tanh-GELU(x) instead (the FFN's hidden activation)."""
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or not x.is_floating_point():
        raise TypeError(f"quantize_rowwise expects a floating-point [M, K] tensor, got {describe(x)}")
    if resolve(backend, x.device) == "torch":
        return quantize_rowwise_ref(x, gelu=gelu)
    if x.stride(1) != 1:
        x = x.contiguous()
    return _launch(x, gelu)


def quantize_rowwise_ref(x: torch.Tensor, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch reference (fp32 math)."""
    y = x.float()
    if gelu:
        y = torch.nn.functional.gelu(y, approximate="tanh")
    scale = y.abs().amax(dim=-1, keepdim=True).clamp_min(_TINY) / E4M3_MAX
    return (y / scale).to(torch.float8_e4m3fn), scale
