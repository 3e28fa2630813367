"""Mean pooling of image-token hidden states (Eq. 3): ``p[b, :] = mean_n h[b, n, :]``, accumulated in fp32.

The Triton path is a deterministic two-stage reduction: stage 1 splits the tokens into ``S`` chunks (enough programs
to fill the GPU at batch 1, D = 2432, N = 4096) and writes fp32 partial means ``[B, S, D]``; stage 2 sums the ``S``
partials in a fixed order straight into the destination (``out`` or ``out[:, slot]``). With ``S == 1`` stage 1 writes
the destination directly. No atomics, so results are bitwise reproducible.
"""

from __future__ import annotations

import torch

from kernels.backend import accumulation_dtype, cdiv, describe, resolve, triton_kernel

try:
    import triton.language as tl
except ImportError:  # the torch backend needs no triton
    tl = None

_BLOCK_N = 32
_BLOCK_D = 128
_TOKENS_PER_PROGRAM = 256  # below this a chunk is too short to amortise its partial write
_TARGET_PROGRAMS = 1024  # ~8 per SM on an H100/H200


@triton_kernel
def _sum_tokens_kernel(
    x_ptr,
    out_ptr,
    n_tokens,
    dim,
    chunk,
    stride_xb,
    stride_xn,
    stride_ob,
    stride_os,
    scale,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # out[b, s, d] = scale * sum_{n in chunk s} x[b, n, d]   (fp32 accumulation; x's last dim contiguous)
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    s = tl.program_id(2)
    d_mask = d < dim
    start = s * chunk
    stop = tl.minimum(start + chunk, n_tokens)
    x_row = x_ptr + b.to(tl.int64) * stride_xb
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for n0 in range(start, stop, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mask = (n < stop)[:, None] & d_mask[None, :]
        ptrs = x_row + n.to(tl.int64)[:, None] * stride_xn + d[None, :]
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    total = tl.sum(acc, axis=0) * scale
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + s * stride_os + d, total, mask=d_mask)


def _mean_pool_launch(h: torch.Tensor, out: torch.Tensor) -> None:
    """Write ``mean_n h[:, n, :]`` into ``out`` (fp32 ``[B, D]``, any strides with a contiguous last dim)."""
    n_batch, n_tokens, dim = h.shape
    if out.numel() == 0:
        return
    if h.stride(2) != 1:
        h = h.contiguous()  # slices along N (e.g. the image part of [image | text]) keep stride 1 and are not copied
    d_blocks = cdiv(dim, _BLOCK_D)
    n_chunks = max(1, min(cdiv(n_tokens, _TOKENS_PER_PROGRAM), _TARGET_PROGRAMS // (n_batch * d_blocks)))
    chunk = cdiv(n_tokens, n_chunks)
    n_chunks = cdiv(n_tokens, chunk)  # no empty chunks
    common = {"BLOCK_N": _BLOCK_N, "BLOCK_D": _BLOCK_D, "num_warps": 4}
    if n_chunks == 1:
        _sum_tokens_kernel[(n_batch, d_blocks, 1)](
            h, out, n_tokens, dim, n_tokens, h.stride(0), h.stride(1), out.stride(0), 0, 1.0 / n_tokens, **common
        )
        return
    partial = torch.empty(n_batch, n_chunks, dim, device=h.device, dtype=torch.float32)
    _sum_tokens_kernel[(n_batch, d_blocks, n_chunks)](
        h, partial, n_tokens, dim, chunk, h.stride(0), h.stride(1), partial.stride(0), partial.stride(1),
        1.0 / n_tokens, **common,
    )  # fmt: skip
    _sum_tokens_kernel[(n_batch, d_blocks, 1)](
        partial, out, n_chunks, dim, n_chunks, partial.stride(0), partial.stride(1), out.stride(0), 0, 1.0, **common
    )


class _MeanPool(torch.autograd.Function):
    # p = mean_n h  =>  dL/dh[b, n, :] = dL/dp[b, :] / N
    @staticmethod
    def forward(ctx, h):
        ctx.n_tokens, ctx.h_dtype = h.shape[1], h.dtype
        out = torch.empty(h.shape[0], h.shape[2], device=h.device, dtype=torch.float32)
        _mean_pool_launch(h, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_h = (grad_out.float() / ctx.n_tokens).to(ctx.h_dtype)
        return grad_h[:, None, :].expand(-1, ctx.n_tokens, -1)


def mean_pool(h: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Mean over tokens: ``h [B, N, D]`` (bf16/fp16/fp32) -> ``[B, D]`` float32, accumulated in fp32. Differentiable."""
    _check_tokens(h)
    if resolve(backend, h.device) == "torch":
        return mean_pool_ref(h, upcast=True)
    return _MeanPool.apply(h)


@torch.no_grad()
def mean_pool_into(h: torch.Tensor, out: torch.Tensor, slot: int, *, backend: str | None = None) -> None:
    """Write ``mean_n h[:, n, :]`` into ``out[:, slot, :]`` in place (inference path, no gradient).

    Args:
        h: hidden states ``[B, N, D]`` (bf16/fp16/fp32; the token dim may be strided, e.g. a slice of [image | text]).
        out: float32 feature buffer ``[B, L, D]`` (float64 for float64 h; its last dim contiguous); other slots are
            left untouched.
        slot: layer index in ``[0, L)``.
    """
    _check_tokens(h)
    accumulate = accumulation_dtype(h.dtype)
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.dtype != accumulate:
        raise TypeError(f"out must be a {accumulate} tensor [B, L, D] for {h.dtype} h, got {describe(out)}")
    if out.shape[0] != h.shape[0] or out.shape[2] != h.shape[2]:
        raise ValueError(f"out must be [B={h.shape[0]}, L, D={h.shape[2]}] to match h, got {tuple(out.shape)}")
    if out.device != h.device:
        raise ValueError(f"out must be on h's device {h.device}, got {out.device}")
    if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < out.shape[1]:
        raise ValueError(f"slot must be an int in [0, {out.shape[1]}), got {slot!r}")
    if resolve(backend, h.device) == "torch" or accumulate == torch.float64:  # (fp64: gradient checks, reference)
        out[:, slot] = mean_pool_ref(h, upcast=True)
        return
    if out.stride(2) != 1:
        raise ValueError("out's last dim must be contiguous (stride 1); allocate it with torch.empty(B, L, D)")
    _mean_pool_launch(h, out[:, slot])


def _check_tokens(h: torch.Tensor) -> None:
    if not isinstance(h, torch.Tensor) or h.dim() != 3 or not h.is_floating_point():
        raise TypeError(f"h must be a floating-point tensor [B, N, D], got {describe(h)}")
    if h.shape[1] == 0:
        raise ValueError("h must have at least one token (N >= 1) to take a mean over")


def mean_pool_ref(h: torch.Tensor, upcast: bool = False) -> torch.Tensor:
    """Token mean ``[B, N, D] -> [B, D]`` in float32 (float64 for float64 input): computed in h's dtype
    (``upcast=False``) or accumulated in at least fp32."""
    accumulate = accumulation_dtype(h.dtype)
    return (h.to(accumulate) if upcast else h).mean(dim=1).to(accumulate)
