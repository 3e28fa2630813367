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

from kernels.backend import accumulation_dtype, cdiv, describe, interpreting, resolve, triton_kernel
from kernels.quant import e4m3_scale, quantize_rowwise_ref, to_e4m3

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch backend needs no triton
    triton = tl = None

_BWD_TARGET_PROGRAMS = 256  # ~2 per SM: each program reduces d(shift|scale|gate) over its chunk of rows


def _block_d(dim: int) -> int:
    return triton.next_power_of_2(dim)


def _num_warps(block_d: int) -> int:
    return 8 if block_d >= 2048 else 4


@triton_kernel
def _adaln_fwd_kernel(
    x_ptr,
    y_ptr,
    gate_ptr,
    shift_ptr,
    scale_ptr,
    x_new_ptr,
    out_ptr,
    out_scale_ptr,
    mean_ptr,
    rstd_ptr,
    n_tokens,
    dim,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    FP8_OUT: tl.constexpr,
    EXACT_ROUNDING: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # [x <- x + gate[b] * y]  (stored to x_new)
    # out = (x - mean) * rstd * (1 + scale[b]) + shift[b],   rstd = 1 / sqrt(var + eps),  biased var, fp32
    # [FP8_OUT: out stored as e4m3(out / s) with the row's scale s = max|out| / 448 stored to out_scale]
    row = tl.program_id(0)
    b = row // n_tokens
    d = tl.arange(0, BLOCK_D)
    mask = d < dim
    row_off = row.to(tl.int64) * dim
    mod_off = b.to(tl.int64) * dim
    x = tl.load(x_ptr + row_off + d, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        y = tl.load(y_ptr + row_off + d, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(gate_ptr + mod_off + d, mask=mask, other=0.0).to(tl.float32)
        x = x + gate * y
        tl.store(x_new_ptr + row_off + d, x.to(x_new_ptr.dtype.element_ty), mask=mask)
    mean = tl.sum(x, axis=0) / dim
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / dim + eps)
    shift = tl.load(shift_ptr + mod_off + d, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + mod_off + d, mask=mask, other=0.0).to(tl.float32)
    out = xc * rstd * (1.0 + scale) + shift
    if FP8_OUT:
        out_scale = e4m3_scale(tl.max(tl.where(mask, tl.abs(out), 0.0), axis=0))
        tl.store(out_ptr + row_off + d, to_e4m3(out, out_scale, EXACT_ROUNDING), mask=mask)
        tl.store(out_scale_ptr + row, out_scale)
    else:
        tl.store(out_ptr + row_off + d, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton_kernel
def _adaln_bwd_kernel(
    grad_out_ptr,
    grad_x_new_ptr,
    x_ptr,
    y_ptr,
    gate_ptr,
    scale_ptr,
    mean_ptr,
    rstd_ptr,
    grad_x_ptr,
    grad_y_ptr,
    grad_shift_part_ptr,
    grad_scale_part_ptr,
    grad_gate_part_ptr,
    n_tokens,
    dim,
    chunk,
    HAS_RESIDUAL: tl.constexpr,
    HAS_GRAD_X_NEW: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # xhat = (x - mean) * rstd,  g = dout * (1 + scale[b])
    # dx = rstd * (g - mean_d(g) - xhat * mean_d(g * xhat))  [+ dx_new]        (LayerNorm backward)
    # dshift[b] = sum_n dout,  dscale[b] = sum_n dout * xhat                      (partials over this row chunk)
    # residual: dy = gate[b] * dx,  dgate[b] = sum_n dx * y
    b = tl.program_id(0)
    s = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    mask = d < dim
    mod_off = b.to(tl.int64) * dim
    scale = tl.load(scale_ptr + mod_off + d, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        gate = tl.load(gate_ptr + mod_off + d, mask=mask, other=0.0).to(tl.float32)
    acc_shift = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_scale = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_gate = tl.zeros((BLOCK_D,), dtype=tl.float32)
    start = s * chunk
    stop = tl.minimum(start + chunk, n_tokens)
    for n in range(start, stop):
        row = b * n_tokens + n
        row_off = row.to(tl.int64) * dim
        x = tl.load(x_ptr + row_off + d, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            y = tl.load(y_ptr + row_off + d, mask=mask, other=0.0).to(tl.float32)
            x = x + gate * y
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        dout = tl.load(grad_out_ptr + row_off + d, mask=mask, other=0.0).to(tl.float32)
        acc_shift += dout
        acc_scale += dout * xhat
        g = dout * (1.0 + scale)
        dx = rstd * (g - tl.sum(g, axis=0) / dim - xhat * (tl.sum(g * xhat, axis=0) / dim))
        if HAS_GRAD_X_NEW:
            dx += tl.load(grad_x_new_ptr + row_off + d, mask=mask, other=0.0).to(tl.float32)
        tl.store(grad_x_ptr + row_off + d, dx.to(grad_x_ptr.dtype.element_ty), mask=mask)
        if HAS_RESIDUAL:
            acc_gate += dx * y
            tl.store(grad_y_ptr + row_off + d, (gate * dx).to(grad_y_ptr.dtype.element_ty), mask=mask)
    part_off = (b * tl.num_programs(1) + s).to(tl.int64) * dim
    tl.store(grad_shift_part_ptr + part_off + d, acc_shift, mask=mask)
    tl.store(grad_scale_part_ptr + part_off + d, acc_scale, mask=mask)
    if HAS_RESIDUAL:
        tl.store(grad_gate_part_ptr + part_off + d, acc_gate, mask=mask)


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


def _adaln_forward(x, y, gate, shift, scale, eps, fp8_out=False):
    """x, y: [B, N, D] contiguous; gate/shift/scale: [B, D] contiguous; y, gate None without the residual.
    Returns (x_new, out, out_scale, mean, rstd): out is [B, N, D] in x's dtype, or with `fp8_out` [B*N, D] e4m3 with
    out_scale [B*N, 1] fp32 (None otherwise)."""
    n_batch, n_tokens, dim = x.shape
    has_residual = y is not None
    if fp8_out:
        out = torch.empty(n_batch * n_tokens, dim, device=x.device, dtype=torch.float8_e4m3fn)
        out_scale = torch.empty(n_batch * n_tokens, 1, device=x.device, dtype=torch.float32)
    else:
        out, out_scale = torch.empty_like(x), None
    x_new = torch.empty_like(x) if has_residual else None
    mean = torch.empty(n_batch * n_tokens, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if x.numel():
        block_d = _block_d(dim)
        _adaln_fwd_kernel[(n_batch * n_tokens,)](
            x, y if has_residual else x, gate if has_residual else shift, shift, scale,
            x_new if has_residual else x, out, out_scale if fp8_out else mean, mean, rstd, n_tokens, dim, eps,
            HAS_RESIDUAL=has_residual, FP8_OUT=fp8_out, EXACT_ROUNDING=fp8_out and interpreting(),
            BLOCK_D=block_d, num_warps=_num_warps(block_d),
        )  # fmt: skip
    return x_new, out, out_scale, mean, rstd


def _adaln_backward(grad_out, grad_x_new, x, y, gate, scale, mean, rstd):
    """(grad_x, grad_y, grad_gate, grad_shift, grad_scale); grad_y, grad_gate are None without the residual."""
    n_batch, n_tokens, dim = x.shape
    has_residual = y is not None
    n_chunks = max(1, min(n_tokens, cdiv(_BWD_TARGET_PROGRAMS, n_batch)))
    chunk = cdiv(n_tokens, n_chunks)
    n_chunks = cdiv(n_tokens, chunk)
    grad_x = torch.empty_like(x)
    grad_y = torch.empty_like(y) if has_residual else None
    partials = torch.empty(3 if has_residual else 2, n_batch, n_chunks, dim, device=x.device, dtype=torch.float32)
    block_d = _block_d(dim)
    _adaln_bwd_kernel[(n_batch, n_chunks)](
        grad_out.contiguous(), grad_x_new.contiguous() if grad_x_new is not None else grad_out,
        x, y if has_residual else x, gate if has_residual else scale, scale, mean, rstd,
        grad_x, grad_y if has_residual else grad_x, partials[0], partials[1], partials[-1],
        n_tokens, dim, chunk,
        HAS_RESIDUAL=has_residual, HAS_GRAD_X_NEW=grad_x_new is not None,
        BLOCK_D=block_d, num_warps=_num_warps(block_d),
    )  # fmt: skip
    sums = partials.sum(dim=2)  # [2|3, B, D], fixed order: deterministic
    grad_gate = sums[2] if has_residual else None
    return grad_x, grad_y, grad_gate, sums[0], sums[1]


def _cast(grad, like):
    return None if grad is None else grad.to(like.dtype)


class _LayerNormModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        x, shift, scale = x.contiguous(), shift.contiguous(), scale.contiguous()
        _, out, _, mean, rstd = _adaln_forward(x, None, None, shift, scale, eps)
        ctx.save_for_backward(x, shift, scale, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, shift, scale, mean, rstd = ctx.saved_tensors
        grad_x, _, _, grad_shift, grad_scale = _adaln_backward(grad_out, None, x, None, None, scale, mean, rstd)
        return grad_x, _cast(grad_shift, shift), _cast(grad_scale, scale), None


class _GatedResidualLayerNormModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, gate, shift, scale, eps):
        x, y, gate = x.contiguous(), y.contiguous(), gate.contiguous()
        shift, scale = shift.contiguous(), scale.contiguous()
        x_new, out, _, mean, rstd = _adaln_forward(x, y, gate, shift, scale, eps)
        ctx.save_for_backward(x, y, gate, shift, scale, mean, rstd)
        ctx.set_materialize_grads(False)
        return x_new, out

    @staticmethod
    def backward(ctx, grad_x_new, grad_out):
        x, y, gate, shift, scale, mean, rstd = ctx.saved_tensors
        if grad_out is None:  # only x_new was used downstream
            grad_out = torch.zeros_like(x)
        grads = _adaln_backward(grad_out, grad_x_new, x, y, gate, scale, mean, rstd)
        grad_x, grad_y, grad_gate, grad_shift, grad_scale = grads
        return grad_x, grad_y, _cast(grad_gate, gate), _cast(grad_shift, shift), _cast(grad_scale, scale), None


class _GatedResidual(torch.autograd.Function):
    # x_new = x + gate[b] * y:  dx = g,  dy = gate[b] * g,  dgate[b] = sum_n g * y   (elementwise; torch backward)
    @staticmethod
    def forward(ctx, x, y, gate):
        x, y, gate = x.contiguous(), y.contiguous(), gate.contiguous()
        out = torch.empty_like(x)
        n_per_batch = x[0].numel() if x.shape[0] else 0
        if out.numel():
            block = 1024
            _gated_residual_kernel[(cdiv(n_per_batch, block), x.shape[0])](
                x, y, gate, out, n_per_batch, x.shape[2], BLOCK=block, num_warps=4
            )
        ctx.save_for_backward(y, gate)
        return out

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
    return _LayerNormModulate.apply(x, shift, scale, float(eps))


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
    return _GatedResidualLayerNormModulate.apply(x, y, gate, shift, scale, float(eps))


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
    return _GatedResidual.apply(x, y, gate)


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
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors.values()):
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
