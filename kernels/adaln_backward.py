"""Backward of the adaLN ops of `kernels.adaln` (LayerNorm-modulate, with or without the gated residual before it):
one program per (image, chunk of rows), each row's gradient from the saved mean and rstd, and per-chunk partial sums of
d(shift|scale|gate) reduced afterwards in a fixed order (deterministic). Its reference is autograd through
`kernels.adaln`'s `*_ref` functions (tests/test_kernels.py)."""

from __future__ import annotations

import torch

from kernels.backend import cdiv, row_num_warps, triton_kernel

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch backend needs no triton
    triton = tl = None

_BWD_TARGET_PROGRAMS = 256  # ~2 per SM: each program reduces d(shift|scale|gate) over its chunk of rows


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


def adaln_backward(grad_out, grad_x_new, x, y, gate, scale, mean, rstd):
    """(grad_x, grad_y, grad_gate, grad_shift, grad_scale) of `kernels.adaln`'s forward, from its saved inputs and
    row statistics; grad_y, grad_gate are None without the residual."""
    n_batch, n_tokens, dim = x.shape
    has_residual = y is not None
    n_chunks = max(1, min(n_tokens, cdiv(_BWD_TARGET_PROGRAMS, n_batch)))
    chunk = cdiv(n_tokens, n_chunks)
    n_chunks = cdiv(n_tokens, chunk)
    grad_x = torch.empty_like(x)
    grad_y = torch.empty_like(y) if has_residual else None
    partials = torch.empty(3 if has_residual else 2, n_batch, n_chunks, dim, device=x.device, dtype=torch.float32)
    block_d = triton.next_power_of_2(dim)
    _adaln_bwd_kernel[(n_batch, n_chunks)](
        grad_out.contiguous(), grad_x_new.contiguous() if grad_x_new is not None else grad_out,
        x, y if has_residual else x, gate if has_residual else scale, scale, mean, rstd,
        grad_x, grad_y if has_residual else grad_x, partials[0], partials[1], partials[-1],
        n_tokens, dim, chunk,
        HAS_RESIDUAL=has_residual, HAS_GRAD_X_NEW=grad_x_new is not None,
        BLOCK_D=block_d, num_warps=row_num_warps(block_d),
    )  # fmt: skip
    sums = partials.sum(dim=2)  # [2|3, B, D], fixed order: deterministic
    grad_gate = sums[2] if has_residual else None
    return grad_x, grad_y, grad_gate, sums[0], sums[1]
