"""Rowwise FP8 (e4m3) quantisation of activations, optionally fused with the tanh-GELU that produces them.

    y[m, :] = act(x[m, :]);  scale[m] = max(|y[m, :]|, tiny) / 448;  q[m, :] = e4m3(y[m, :] * (1 / scale[m]))

One pass over x (read bf16, write 1-byte fp8 + one fp32 per row), where the eager version is five (abs, amax, upcast,
divide, cast) and the FFN's GELU a sixth. `torch._scaled_mm` then takes (q, scale) as its rowwise-scaled A operand.
Inference only (no backward): the fp8 path is for scoring, training runs in bf16.
"""

from __future__ import annotations

import torch

from kernels.backend import describe, interpreting, resolve, row_tiles, triton_helper, triton_kernel

try:
    import triton.language as tl
except ImportError:  # the torch backend needs no triton
    tl = None

E4M3_MAX = 448.0
_TINY = 1e-12  # an all-zero row gets scale tiny/448 instead of 0 (no division by zero, q = 0)
MAX_ROW = 16384  # widest row the kernel holds in registers (SD3.5-L's FFN hidden row is 9728); wider: the reference


@triton_helper
def e4m3_scales(amax):
    # (scale, 1 / scale): the row's largest magnitude maps to e4m3's largest finite value (an all-zero row gets
    # tiny / 448). Both divisions IEEE-rounded, as torch divides in `quantize_rowwise_ref`: the same fp32 values.
    scale = tl.fdiv(tl.maximum(amax, 1e-12), 448.0, ieee_rounding=True)
    return scale, tl.fdiv(1.0, scale, ieee_rounding=True)


@triton_helper
def to_e4m3(y, inv_scale, EXACT_ROUNDING: tl.constexpr):
    # e4m3(y * inv_scale), round to nearest even (fp32 in); a multiply per element, not a division
    v = y * inv_scale
    if EXACT_ROUNDING:
        # Triton's CPU interpreter mis-rounds fp32->e4m3 casts that carry into the exponent (126.2 -> 64, not 128).
        # Round to nearest-even onto the e4m3 grid first (3 mantissa bits, subnormal step 2^-9), so its cast is
        # exact; the GPU's cvt.rn instruction rounds the same way by itself. Adding and subtracting 1.5 * 2^23 rounds
        # |x| < 2^22 to an integer, ties to even.
        step = tl.exp2(tl.maximum(tl.floor(tl.log2(tl.maximum(tl.abs(v), 1.0 / 512.0))), -6.0) - 3.0)
        v = ((v / step + 12582912.0) - 12582912.0) * step
    return v.to(tl.float8e4nv)


@triton_helper
def _gelu_tanh(y, FAST_TANH: tl.constexpr):
    # 0.5 y (1 + tanh(u)),  u = sqrt(2/pi) (y + 0.044715 y^3)
    u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
    if FAST_TANH:
        # the SFU's tanh (one MUFU.TANH, max relative error 2^-11, far below e4m3's 2^-4 step)
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [u], dtype=tl.float32, is_pure=True, pack=1)
        return 0.5 * y * (1.0 + t)
    else:
        # the interpreter has no inline PTX: tanh(u) = 2 sigmoid(2u) - 1, u clamped so that exp stays finite
        return y / (1.0 + tl.exp(-2.0 * tl.minimum(tl.maximum(u, -15.0), 15.0)))


@triton_kernel
def _quantize_rows_kernel(
    x_ptr, q_ptr, scale_ptr, n_cols, rows_per_batch, stride_xb, stride_xm, stride_q,
    APPLY_GELU: tl.constexpr, FAST_TANH: tl.constexpr, EXACT_ROUNDING: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    # y = gelu_tanh(x) if APPLY_GELU else x;  scale = max|y| / 448;  q = e4m3(y * (1 / scale))   (fp32 math)
    # Row r of x is x[r // rows_per_batch, r % rows_per_batch, :] (a [B, M, K] view with any row and batch strides:
    # the image rows of the joint attention output are read in place). One program per row, the whole row in
    # registers as two tiles (`row_tiles`: 9728 = 8192 + 2048 lanes, 5% masked), so x is read once and GELU
    # evaluated once per element.
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + (row // rows_per_batch) * stride_xb + (row % rows_per_batch) * stride_xm
    q_row = q_ptr + row * stride_q
    cols_a = tl.arange(0, BLOCK_A)  # BLOCK_A <= n_cols: no mask
    y_a = tl.load(x_row + cols_a, eviction_policy="evict_first").to(tl.float32)
    cols_b = BLOCK_A + tl.arange(0, BLOCK_B)
    mask_b = cols_b < n_cols
    y_b = tl.load(x_row + cols_b, mask=mask_b, other=0.0, eviction_policy="evict_first").to(tl.float32)
    if APPLY_GELU:
        y_a = _gelu_tanh(y_a, FAST_TANH)
        y_b = _gelu_tanh(y_b, FAST_TANH)  # gelu(0) = 0: masked lanes stay out of the max
    scale, inv_scale = e4m3_scales(tl.maximum(tl.max(tl.abs(y_a), axis=0), tl.max(tl.abs(y_b), axis=0)))
    tl.store(q_row + cols_a, to_e4m3(y_a, inv_scale, EXACT_ROUNDING))
    tl.store(q_row + cols_b, to_e4m3(y_b, inv_scale, EXACT_ROUNDING), mask=mask_b)
    tl.store(scale_ptr + row, scale)


def _launch(x: torch.Tensor, gelu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    batch, rows_per_batch, cols = x.shape
    rows = batch * rows_per_batch
    q = torch.empty(rows, cols, device=x.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty(rows, 1, device=x.device, dtype=torch.float32)
    if rows:
        block_a, block_b = row_tiles(cols)
        _quantize_rows_kernel[(rows,)](
            x, q, scale, cols, rows_per_batch, x.stride(0), x.stride(1), q.stride(0),
            APPLY_GELU=gelu, FAST_TANH=not interpreting(), EXACT_ROUNDING=interpreting(),
            BLOCK_A=block_a, BLOCK_B=block_b, num_warps=_num_warps(block_a + block_b),
        )  # fmt: skip
    return q, scale


def _num_warps(lanes: int) -> int:
    # 16-32 fp32 values per thread (SD3.5-L's 10240-lane FFN row: 16 warps, 20 each), 4 warps at least
    return min(16, max(4, 1 << max(lanes // 512, 1).bit_length() - 1))


def quantize_rowwise(
    x: torch.Tensor, *, gelu: bool = False, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] or [B, M, K] (bf16/fp16/fp32) -> (q [B*M, K] float8_e4m3fn, scale [B*M, 1] fp32), x ≈ q * scale.

    A [B, M, K] view is read in place whatever its batch and row strides (e.g. the image rows of a [B, N, K]
    tensor); only K must be contiguous, else x is copied first. `gelu=True` quantises tanh-GELU(x) instead (the FFN's
    hidden activation). Rows wider than `MAX_ROW` take the reference path."""
    if not isinstance(x, torch.Tensor) or x.ndim not in (2, 3) or not x.is_floating_point():
        raise TypeError(f"quantize_rowwise expects a floating-point [M, K] or [B, M, K] tensor, got {describe(x)}")
    if x.shape[-1] == 0:
        raise ValueError(f"quantize_rowwise needs rows of at least one element, got shape {tuple(x.shape)}")
    if resolve(backend, x.device) == "torch" or x.shape[-1] > MAX_ROW:
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
    return (y * scale.reciprocal()).to(torch.float8_e4m3fn), scale
