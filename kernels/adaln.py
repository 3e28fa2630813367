"""adaLN pieces of an MMDiT block: LayerNorm (no affine) + modulate, and the gated residual fused into the next one.

    layernorm_modulate:                 out = LN(x) * (1 + scale[b]) + shift[b]
    gated_residual_layernorm_modulate:  x_new = x + gate[b] * y;  out = LN(x_new) * (1 + scale[b]) + shift[b]
    gated_residual:                     x_new = x + gate[b] * y

LayerNorm statistics and all arithmetic are fp32 inside the kernels whatever the storage dtype (diffusers computes the
modulation in bf16; the kernels are closer to the fp32 result). In the fused op the LayerNorm reads the fp32 ``x_new``
before it is rounded to the storage dtype.

The ``*_fp8`` variants feed an FP8 GEMM: ``out`` leaves the kernel as e4m3 with one scale per token (rowwise, as
``kernels.quant``), quantised from its fp32 value in the same pass, so it is never written in bf16 and read back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.adaln_backward import adaln_backward
from kernels.backend import (
    accumulation_dtype,
    cdiv,
    describe,
    interpreting,
    needs_grad,
    resolve,
    row_num_warps,
    row_tiles,
    triton_helper,
    triton_kernel,
)
from kernels.quant import e4m3_scales, quantize_rowwise_ref, to_e4m3

try:
    import triton.language as tl
except ImportError:  # the torch backend needs no triton
    tl = None


def _rows_per_program(rows: int) -> int:
    # Up to 4 rows (tokens of one image) share one load of the modulation vectors; below 2048 rows in all, one row
    # per program keeps >= 8 programs per SM on 132 SMs (a b1 512² image stream has 1024 rows)
    return max(1, min(4, rows // 2048))


@triton_helper
def _load_f32(ptrs, mask, EVICTION: tl.constexpr):
    # a tile in fp32, 0 where masked (mask None: every lane valid, an unpredicated vector load)
    if mask is None:
        return tl.load(ptrs, eviction_policy=EVICTION).to(tl.float32)
    else:
        return tl.load(ptrs, mask=mask, other=0.0, eviction_policy=EVICTION).to(tl.float32)


@triton_helper
def _load_mod(ptrs, mask):
    # a modulation vector's tile, read by every program of its image: kept in L2
    return _load_f32(ptrs, mask, "evict_last")


@triton_helper
def _load_row(ptrs, mask):
    # a token row's tile, read once: streamed through L2
    return _load_f32(ptrs, mask, "evict_first")


@triton_helper
def _welford_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    # Chan et al.'s merge of two disjoint sets' (mean, sum of squared deviations, count): one reduction gives both
    # statistics, with no cancellation (fp32)
    n = n_a + n_b
    w_b = tl.where(n == 0.0, 0.0, n_b / n)
    delta = mean_b - mean_a
    return mean_a + delta * w_b, m2_a + m2_b + delta * delta * n_a * w_b, n


@triton_helper
def _row_mean_m2(x_a, x_b, mask_b, dim, WELFORD: tl.constexpr):
    # (mean, sum of squared deviations) of one row held as tile a (all lanes valid) and tile b (mask_b; 0 elsewhere)
    if WELFORD:  # one pass: a single reduction of (mean, m2, count) per tile, then the two tiles merged
        mean, m2, n = tl.reduce((x_a, tl.zeros_like(x_a), tl.full(x_a.shape, 1.0, tl.float32)), 0, _welford_combine)
        mean_b, m2_b, n_b = tl.reduce((x_b, tl.zeros_like(x_b), mask_b.to(tl.float32)), 0, _welford_combine)
        mean, m2, _ = _welford_combine(mean, m2, n, mean_b, m2_b, n_b)
    else:  # the interpreter runs a generic tl.reduce one element at a time in Python: there, two sums
        mean = (tl.sum(x_a, axis=0) + tl.sum(x_b, axis=0)) / dim
        xc_b = tl.where(mask_b, x_b - mean, 0.0)
        m2 = tl.sum((x_a - mean) * (x_a - mean), axis=0) + tl.sum(xc_b * xc_b, axis=0)
    return mean, m2


@triton_kernel(do_not_specialize=("rows_per_program",))
def _adaln_fwd_kernel(
    x_ptr, y_ptr, gate_ptr, shift_ptr, scale_ptr, x_new_ptr, out_ptr, out_scale_ptr, mean_ptr, rstd_ptr,
    n_tokens, dim, rows_per_program, eps,
    HAS_RESIDUAL: tl.constexpr, FP8_OUT: tl.constexpr, STORE_STATS: tl.constexpr, WELFORD: tl.constexpr,
    EXACT_ROUNDING: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    # [x <- x + gate[b] * y]  (stored to x_new)
    # out = (x - mean) * rstd * (1 + scale[b]) + shift[b],   rstd = 1 / sqrt(var + eps),  biased var, fp32
    # [FP8_OUT: out stored as e4m3(out / s) with the row's scale s = max|out| / 448 stored to out_scale]
    # [STORE_STATS: mean and rstd stored for the backward]
    # Program (i, b) handles tokens i*R .. i*R + R - 1 of image b, R = rows_per_program (the last program of an image
    # repeats its last token instead of masking: the same values written twice), the modulation vectors loaded once.
    # A row is held as two tiles of BLOCK_A (never masked) + BLOCK_B lanes (`row_tiles`); the loop is software
    # pipelined (the next row's loads are issued before this row's reductions).
    b = tl.program_id(1)
    cols_a = tl.arange(0, BLOCK_A)
    cols_b = BLOCK_A + tl.arange(0, BLOCK_B)
    mask_b = cols_b < dim
    mod_off = b.to(tl.int64) * dim
    # the modulation vectors are read by every program of the image: keep them in L2
    shift_a = _load_mod(shift_ptr + mod_off + cols_a, None)
    shift_b = _load_mod(shift_ptr + mod_off + cols_b, mask_b)
    scale_a = 1.0 + _load_mod(scale_ptr + mod_off + cols_a, None)
    scale_b = 1.0 + _load_mod(scale_ptr + mod_off + cols_b, mask_b)
    if HAS_RESIDUAL:
        gate_a = _load_mod(gate_ptr + mod_off + cols_a, None)
        gate_b = _load_mod(gate_ptr + mod_off + cols_b, mask_b)
    first = tl.program_id(0) * rows_per_program
    for r in tl.range(0, rows_per_program, num_stages=2):
        row = b * n_tokens + tl.minimum(first + r, n_tokens - 1)
        row_off = row.to(tl.int64) * dim
        x_a = _load_row(x_ptr + row_off + cols_a, None)
        x_b = _load_row(x_ptr + row_off + cols_b, mask_b)
        if HAS_RESIDUAL:
            x_a = x_a + gate_a * _load_row(y_ptr + row_off + cols_a, None)
            x_b = x_b + gate_b * _load_row(y_ptr + row_off + cols_b, mask_b)
            tl.store(x_new_ptr + row_off + cols_a, x_a.to(x_new_ptr.dtype.element_ty))
            tl.store(x_new_ptr + row_off + cols_b, x_b.to(x_new_ptr.dtype.element_ty), mask=mask_b)
        mean, m2 = _row_mean_m2(x_a, x_b, mask_b, dim, WELFORD)
        rstd = 1.0 / tl.sqrt(m2 / dim + eps)
        out_a = (x_a - mean) * rstd * scale_a + shift_a
        out_b = (x_b - mean) * rstd * scale_b + shift_b
        if FP8_OUT:
            amax_b = tl.max(tl.where(mask_b, tl.abs(out_b), 0.0), axis=0)
            out_scale, inv_scale = e4m3_scales(tl.maximum(tl.max(tl.abs(out_a), axis=0), amax_b))
            tl.store(out_ptr + row_off + cols_a, to_e4m3(out_a, inv_scale, EXACT_ROUNDING))
            tl.store(out_ptr + row_off + cols_b, to_e4m3(out_b, inv_scale, EXACT_ROUNDING), mask=mask_b)
            tl.store(out_scale_ptr + row, out_scale)
        else:
            tl.store(out_ptr + row_off + cols_a, out_a.to(out_ptr.dtype.element_ty))
            tl.store(out_ptr + row_off + cols_b, out_b.to(out_ptr.dtype.element_ty), mask=mask_b)
        if STORE_STATS:
            tl.store(mean_ptr + row, mean)
            tl.store(rstd_ptr + row, rstd)


@triton_kernel
def _gated_residual_kernel(x_ptr, y_ptr, gate_ptr, out_ptr, n_per_batch, dim, BLOCK: tl.constexpr):
    # out[b, n, d] = x[b, n, d] + gate[b, d] * y[b, n, d]
    b = tl.program_id(1)
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = e < n_per_batch
    off = b.to(tl.int64) * n_per_batch + e
    x = tl.load(x_ptr + off, mask=mask).to(tl.float32)
    y = tl.load(y_ptr + off, mask=mask).to(tl.float32)
    gate = tl.load(gate_ptr + b.to(tl.int64) * dim + e % dim, mask=mask).to(tl.float32)
    tl.store(out_ptr + off, (x + gate * y).to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------------
# Launchers and autograd
# ----------------------------------------------------------------------------------------------------------------------


def _adaln_forward(x, y, gate, shift, scale, eps, fp8_out=False, store_stats=False):
    """x, y: [B, N, D] contiguous; gate/shift/scale: [B, D] contiguous; y, gate None without the residual.
    Returns (x_new, out, out_scale, mean, rstd): out is [B, N, D] in x's dtype, or with `fp8_out` [B*N, D] e4m3 with
    out_scale [B*N, 1] fp32 (None otherwise); mean, rstd [B*N] fp32 with `store_stats` (for a backward), else None."""
    n_batch, n_tokens, dim = x.shape
    has_residual = y is not None
    if fp8_out:
        out = torch.empty(n_batch * n_tokens, dim, device=x.device, dtype=torch.float8_e4m3fn)
        out_scale = torch.empty(n_batch * n_tokens, 1, device=x.device, dtype=torch.float32)
    else:
        out, out_scale = torch.empty_like(x), None
    x_new = torch.empty_like(x) if has_residual else None
    mean = rstd = None
    if store_stats:
        mean = torch.empty(n_batch * n_tokens, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
    if x.numel():
        block_a, block_b = row_tiles(dim)
        rows = _rows_per_program(n_batch * n_tokens)
        # (absent tensors: any pointer of the right kind, never dereferenced)
        _adaln_fwd_kernel[(cdiv(n_tokens, rows), n_batch)](
            x, y if has_residual else x, gate if has_residual else shift, shift, scale,
            x_new if has_residual else x, out, out_scale if fp8_out else shift,
            mean if store_stats else shift, rstd if store_stats else shift, n_tokens, dim, rows, eps,
            HAS_RESIDUAL=has_residual, FP8_OUT=fp8_out, STORE_STATS=store_stats, WELFORD=not interpreting(),
            EXACT_ROUNDING=fp8_out and interpreting(), BLOCK_A=block_a, BLOCK_B=block_b,
            num_warps=row_num_warps(block_a + block_b),
        )  # fmt: skip
    return x_new, out, out_scale, mean, rstd


def _cast(grad, like):
    return None if grad is None else grad.to(like.dtype)


class _LayerNormModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        x, shift, scale = x.contiguous(), shift.contiguous(), scale.contiguous()
        _, out, _, mean, rstd = _adaln_forward(x, None, None, shift, scale, eps, store_stats=True)
        ctx.save_for_backward(x, shift, scale, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, shift, scale, mean, rstd = ctx.saved_tensors
        grad_x, _, _, grad_shift, grad_scale = adaln_backward(grad_out, None, x, None, None, scale, mean, rstd)
        return grad_x, _cast(grad_shift, shift), _cast(grad_scale, scale), None


class _GatedResidualLayerNormModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, gate, shift, scale, eps):
        x, y, gate = x.contiguous(), y.contiguous(), gate.contiguous()
        shift, scale = shift.contiguous(), scale.contiguous()
        x_new, out, _, mean, rstd = _adaln_forward(x, y, gate, shift, scale, eps, store_stats=True)
        ctx.save_for_backward(x, y, gate, shift, scale, mean, rstd)
        ctx.set_materialize_grads(False)
        return x_new, out

    @staticmethod
    def backward(ctx, grad_x_new, grad_out):
        x, y, gate, shift, scale, mean, rstd = ctx.saved_tensors
        if grad_out is None:  # only x_new was used downstream
            grad_out = torch.zeros_like(x)
        grads = adaln_backward(grad_out, grad_x_new, x, y, gate, scale, mean, rstd)
        grad_x, grad_y, grad_gate, grad_shift, grad_scale = grads
        return grad_x, grad_y, _cast(grad_gate, gate), _cast(grad_shift, shift), _cast(grad_scale, scale), None


def _gated_residual_forward(x, y, gate):
    """x + gate[b] * y for x, y [B, N, D] and gate [B, D], all contiguous."""
    out = torch.empty_like(x)
    n_per_batch = x[0].numel() if x.shape[0] else 0
    if out.numel():
        block = 1024
        _gated_residual_kernel[(cdiv(n_per_batch, block), x.shape[0])](
            x, y, gate, out, n_per_batch, x.shape[2], BLOCK=block, num_warps=4
        )
    return out


class _GatedResidual(torch.autograd.Function):
    # x_new = x + gate[b] * y:  dx = g,  dy = gate[b] * g,  dgate[b] = sum_n g * y   (elementwise; torch backward)
    @staticmethod
    def forward(ctx, x, y, gate):
        y, gate = y.contiguous(), gate.contiguous()
        ctx.save_for_backward(y, gate)
        return _gated_residual_forward(x.contiguous(), y, gate)

    @staticmethod
    def backward(ctx, grad):
        y, gate = ctx.saved_tensors
        grad32 = grad.float()
        grad_y = (grad32 * gate.float()[:, None]).to(y.dtype) if ctx.needs_input_grad[1] else None
        grad_gate = (grad32 * y.float()).sum(dim=1).to(gate.dtype) if ctx.needs_input_grad[2] else None
        return grad, grad_y, grad_gate


# ----------------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------------


def layernorm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6, *, backend: str | None = None
) -> torch.Tensor:
    """``LN(x) * (1 + scale[:, None]) + shift[:, None]``; LayerNorm without affine, statistics in fp32.

    Args:
        x: tokens ``[B, N, D]`` (bf16/fp16/fp32).
        shift, scale: adaLN modulation ``[B, D]`` (any float dtype).
        eps: LayerNorm epsilon.

    Returns:
        ``[B, N, D]`` in x's dtype. Differentiable in x, shift and scale.
    """
    _check_tokens("x", x)
    _check_modulation(x, shift=shift, scale=scale)
    if resolve(backend, x.device) == "torch":
        return layernorm_modulate_ref(x, shift, scale, eps, upcast=True)
    if needs_grad(x, shift, scale):
        return _LayerNormModulate.apply(x, shift, scale, float(eps))
    return _adaln_forward(x.contiguous(), None, None, shift.contiguous(), scale.contiguous(), float(eps))[1]


def gated_residual_layernorm_modulate(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated residual then the next adaLN: returns ``(x_new, out)``.

    ``x_new = x + gate[:, None] * y`` and ``out = LN(x_new) * (1 + scale[:, None]) + shift[:, None]``.

    Args:
        x: residual stream ``[B, N, D]``; y: the branch output ``[B, N, D]``.
        gate, shift, scale: adaLN modulation ``[B, D]``.
        eps: LayerNorm epsilon.

    Returns:
        ``x_new`` and ``out``, both ``[B, N, D]`` in x's dtype. Differentiable in all five tensors.
    """
    _check_residual(x, y, gate=gate, shift=shift, scale=scale)
    if resolve(backend, x.device) == "torch":
        return gated_residual_layernorm_modulate_ref(x, y, gate, shift, scale, eps, upcast=True)
    if needs_grad(x, y, gate, shift, scale):
        return _GatedResidualLayerNormModulate.apply(x, y, gate, shift, scale, float(eps))
    x_new, out, _, _, _ = _adaln_forward(
        x.contiguous(), y.contiguous(), gate.contiguous(), shift.contiguous(), scale.contiguous(), float(eps)
    )
    return x_new, out


def layernorm_modulate_fp8(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`layernorm_modulate` with its output quantised for an FP8 GEMM in the same pass (inference only).

    Returns:
        ``(q, row_scale)``: ``q`` ``[B*N, D]`` float8_e4m3fn and ``row_scale`` ``[B*N, 1]`` fp32, one scale per token
        (``max|out| / 448`` of the fp32 ``out``), ``q * row_scale ≈ out``: the A operand of ``torch._scaled_mm``.
    """
    _check_tokens("x", x)
    _check_modulation(x, shift=shift, scale=scale)
    _check_no_grad(x=x, shift=shift, scale=scale)
    if resolve(backend, x.device) == "torch":
        return layernorm_modulate_fp8_ref(x, shift, scale, eps)
    _, q, row_scale, _, _ = _adaln_forward(
        x.contiguous(), None, None, shift.contiguous(), scale.contiguous(), float(eps), fp8_out=True
    )
    return q, row_scale


def gated_residual_layernorm_modulate_fp8(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`gated_residual_layernorm_modulate` with ``out`` quantised as in `layernorm_modulate_fp8` (inference only).

    Returns:
        ``(x_new, q, row_scale)``: ``x_new`` ``[B, N, D]`` in x's dtype; ``q``, ``row_scale`` as in
        `layernorm_modulate_fp8`.
    """
    _check_residual(x, y, gate=gate, shift=shift, scale=scale)
    _check_no_grad(x=x, y=y, gate=gate, shift=shift, scale=scale)
    if resolve(backend, x.device) == "torch":
        return gated_residual_layernorm_modulate_fp8_ref(x, y, gate, shift, scale, eps)
    x_new, q, row_scale, _, _ = _adaln_forward(
        x.contiguous(), y.contiguous(), gate.contiguous(), shift.contiguous(), scale.contiguous(), float(eps),
        fp8_out=True,
    )  # fmt: skip
    return x_new, q, row_scale


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """``x + gate[:, None] * y`` for x, y ``[B, N, D]`` and gate ``[B, D]``; fp32 arithmetic, x's dtype out."""
    _check_residual(x, y, gate=gate)
    if resolve(backend, x.device) == "torch":
        return gated_residual_ref(x, y, gate, upcast=True)
    if needs_grad(x, y, gate):
        return _GatedResidual.apply(x, y, gate)
    return _gated_residual_forward(x.contiguous(), y.contiguous(), gate.contiguous())


def _check_tokens(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor [B, N, D], got {describe(x)}")


def _check_residual(x: torch.Tensor, y: torch.Tensor, **modulation: torch.Tensor) -> None:
    """x and the branch output y: matching [B, N, D] tokens; modulation vectors [B, D]."""
    _check_tokens("x", x)
    _check_tokens("y", y)
    if y.shape != x.shape or y.device != x.device:
        raise ValueError(f"y must match x ({tuple(x.shape)} on {x.device}), got {tuple(y.shape)} on {y.device}")
    _check_modulation(x, **modulation)


def _check_no_grad(**tensors: torch.Tensor) -> None:
    if needs_grad(*tensors.values()):
        names = [name for name, t in tensors.items() if t.requires_grad]
        raise ValueError(
            f"the FP8 output has no gradient, but {', '.join(names)} require grad: use the bf16 op for training "
            f"(or run under torch.no_grad())"
        )


def _check_modulation(x: torch.Tensor, **modulation: torch.Tensor) -> None:
    expected = (x.shape[0], x.shape[2])
    for name, m in modulation.items():
        if not isinstance(m, torch.Tensor) or not m.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor [B, D] = {list(expected)}, got {describe(m)}")
        if tuple(m.shape) != expected:
            raise ValueError(f"{name} must have shape [B, D] = {list(expected)} to match x, got {list(m.shape)}")
        if m.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {m.device}")


# ----------------------------------------------------------------------------------------------------------------------
# References (upcast=False: in x's dtype, as diffusers computes; upcast=True: at least fp32 math (fp64 stays fp64),
# cast back to x's dtype)
# ----------------------------------------------------------------------------------------------------------------------


def layernorm_modulate_ref(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6, upcast: bool = False
) -> torch.Tensor:
    """``LN(x) * (1 + scale[:, None]) + shift[:, None]`` in plain torch."""
    dtype = x.dtype
    compute = accumulation_dtype(dtype) if upcast else dtype
    x, shift, scale = x.to(compute), shift.to(compute), scale.to(compute)
    out = F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale[:, None]) + shift[:, None]
    return out.to(dtype)


def gated_residual_ref(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, upcast: bool = False) -> torch.Tensor:
    """``x + gate[:, None] * y`` in plain torch."""
    dtype = x.dtype
    compute = accumulation_dtype(dtype) if upcast else dtype
    return (x.to(compute) + gate.to(compute)[:, None] * y.to(compute)).to(dtype)


def gated_residual_layernorm_modulate_ref(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_new, LN(x_new) * (1 + scale) + shift)`` with ``x_new = x + gate * y``; upcast keeps x_new fp32 for LN."""
    dtype = x.dtype
    compute = accumulation_dtype(dtype) if upcast else dtype
    x_new = x.to(compute) + gate.to(compute)[:, None] * y.to(compute)
    out = layernorm_modulate_ref(x_new, shift.to(compute), scale.to(compute), eps)
    return x_new.to(dtype), out.to(dtype)


def layernorm_modulate_fp8_ref(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """`layernorm_modulate_ref` at fp32, then `quantize_rowwise_ref` of its rows (out never rounded to x's dtype)."""
    out = layernorm_modulate_ref(x.to(accumulation_dtype(x.dtype)), shift, scale, eps)
    return quantize_rowwise_ref(out.reshape(-1, out.shape[-1]))


def gated_residual_layernorm_modulate_fp8_ref(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`gated_residual_layernorm_modulate_ref` at fp32: (x_new in x's dtype, then the rows of out quantised)."""
    compute = accumulation_dtype(x.dtype)
    x_new, out = gated_residual_layernorm_modulate_ref(x.to(compute), y.to(compute), gate, shift, scale, eps)
    return (x_new.to(x.dtype), *quantize_rowwise_ref(out.reshape(-1, out.shape[-1])))
