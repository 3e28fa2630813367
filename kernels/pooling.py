"""Mean pooling of image-token hidden states (Eq. 3): ``p[b, :] = mean_n h[b, n, :]``, accumulated in fp32.

The Triton path is one launch: each program sums all N tokens of a ``BLOCK_D``-wide column strip of one image, in a
fixed order, and writes its strip of the destination (``out`` or ``out[:, slot]``) itself: no partial sums, no second
launch, no atomics, so results are bitwise reproducible. The strip is as wide as keeps at least ``_MIN_PROGRAMS``
programs (two waves of an H100/H200's 132 SMs) and at least 8 columns (16 bytes of bf16 per token row: one 128-bit
load per thread): at SD3.5-L's D = 2432, 304 strips of 8 at batch 1, 304 of 64 at batch 8.
"""

from __future__ import annotations

import torch

from kernels.backend import accumulation_dtype, cdiv, describe, needs_grad, resolve, triton_kernel

try:
    import triton.language as tl
except ImportError:  # the torch backend needs no triton
    tl = None

_TILE = 4096  # elements of x a program loads per iteration: BLOCK_N tokens x BLOCK_D columns (32 fp32 per thread)
_MIN_PROGRAMS = 2 * 132  # two waves of 132 SMs
_MIN_BLOCK_D, _MAX_BLOCK_D = 8, 128


@triton_kernel
def _sum_tokens_kernel(
    x_ptr, out_ptr, n_tokens, dim, stride_xb, stride_xn, stride_ob, scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # out[b, d] = scale * sum_n x[b, n, d]   (fp32 accumulation, tokens in a fixed order; x's last dim contiguous)
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < dim
    x_row = x_ptr + b.to(tl.int64) * stride_xb
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, n_tokens, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mask = (n < n_tokens)[:, None] & d_mask[None, :]
        ptrs = x_row + n.to(tl.int64)[:, None] * stride_xn + d[None, :]
        acc += tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    total = tl.sum(acc, axis=0) * scale
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + d, total, mask=d_mask)


def _strip_width(n_batch: int, dim: int) -> int:
    # the widest power-of-two strip in [8, 128] columns that keeps >= _MIN_PROGRAMS programs (8 when none does)
    block_d = _MAX_BLOCK_D
    while block_d > _MIN_BLOCK_D and n_batch * cdiv(dim, block_d) < _MIN_PROGRAMS:
        block_d //= 2
    return block_d


def _mean_pool(h: torch.Tensor) -> torch.Tensor:
    out = torch.empty(h.shape[0], h.shape[2], device=h.device, dtype=torch.float32)
    _mean_pool_launch(h, out)
    return out


def _mean_pool_launch(h: torch.Tensor, out: torch.Tensor) -> None:
    """Write ``mean_n h[:, n, :]`` into ``out`` (fp32 ``[B, D]``, any strides with a contiguous last dim)."""
    n_batch, n_tokens, dim = h.shape
    if out.numel() == 0:
        return
    if h.stride(2) != 1:
        h = h.contiguous()  # slices along N (e.g. the image part of [image | text]) keep stride 1 and are not copied
    block_d = _strip_width(n_batch, dim)
    _sum_tokens_kernel[(n_batch, cdiv(dim, block_d))](
        h, out, n_tokens, dim, h.stride(0), h.stride(1), out.stride(0), 1.0 / n_tokens,
        BLOCK_N=_TILE // block_d, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip


class _MeanPool(torch.autograd.Function):
    # p = mean_n h  =>  dL/dh[b, n, :] = dL/dp[b, :] / N
    @staticmethod
    def forward(ctx, h):
        ctx.n_tokens, ctx.h_dtype = h.shape[1], h.dtype
        return _mean_pool(h)

    @staticmethod
    def backward(ctx, grad_out):
        grad_h = (grad_out.float() / ctx.n_tokens).to(ctx.h_dtype)
        return grad_h[:, None, :].expand(-1, ctx.n_tokens, -1)


def mean_pool(h: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Mean over tokens: ``h [B, N, D]`` (bf16/fp16/fp32) -> ``[B, D]`` float32, accumulated in fp32. Differentiable."""
    _check_tokens(h)
    if resolve(backend, h.device) == "torch":
        return mean_pool_ref(h, upcast=True)
    if needs_grad(h):
        return _MeanPool.apply(h)
    return _mean_pool(h)


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
