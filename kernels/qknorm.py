"""Joint-attention operands in one pass: split fused qkv projections, RMS-normalise q and k per head, and write the
image and text tokens straight into the [image ‖ text] buffers attention reads.

    q_img, k_img, v_img = split(img_qkv);  q_txt, k_txt, v_txt = split(txt_qkv)   (txt may lack q)
    q = [rms(q_img) * w_q ‖ rms(q_txt) * w_added_q]
    k = [rms(k_img) * w_k ‖ rms(k_txt) * w_added_k],  v = [v_img ‖ v_txt]
    rms(x) = x / sqrt(mean_hd(x²) + eps)   (per head, fp32)

Eager this is three chunk views, four RMSNorms (each upcast, square, mean, rsqrt, scale) and three concatenations:
~10 passes over the projections; here one read and one write. Inference only: the kernel has no backward, so a
differentiable forward runs the reference (`engine.runtime.ops.Ops` chooses; training is not bound by this op).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.backend import resolve, triton_kernel

try:
    import triton.language as tl
except ImportError:  # the torch backend needs no triton
    tl = None


@triton_kernel
def _split_norm_kernel(
    x_ptr, q_ptr, k_ptr, v_ptr, wq_ptr, wk_ptr, n_tokens, heads, eps,
    stride_xb, stride_xn, stride_qb, stride_qn, stride_kb, stride_kn,
    HAS_Q: tl.constexpr, NORM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    # one program = one token: x[b, n] = [q | k | v] (or [k | v]), each [heads, HEAD_DIM]
    pid = tl.program_id(0).to(tl.int64)
    b, n = pid // n_tokens, pid % n_tokens
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, HEAD_DIM)[None, :]
    mask = h < heads
    offs = h * HEAD_DIM + d
    row = x_ptr + b * stride_xb + n * stride_xn
    dim = heads * HEAD_DIM
    k_col = dim if HAS_Q else 0
    k = tl.load(row + k_col + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(row + k_col + dim + offs, mask=mask, other=0.0)
    if NORM:
        wk = tl.load(wk_ptr + d).to(tl.float32)
        k = k * tl.rsqrt(tl.sum(k * k, axis=1)[:, None] / HEAD_DIM + eps) * wk
    tl.store(k_ptr + b * stride_kb + n * stride_kn + offs, k.to(k_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + b * stride_kb + n * stride_kn + offs, v, mask=mask)
    if HAS_Q:
        q = tl.load(row + offs, mask=mask, other=0.0).to(tl.float32)
        if NORM:
            wq = tl.load(wq_ptr + d).to(tl.float32)
            q = q * tl.rsqrt(tl.sum(q * q, axis=1)[:, None] / HEAD_DIM + eps) * wq
        tl.store(q_ptr + b * stride_qb + n * stride_qn + offs, q.to(q_ptr.dtype.element_ty), mask=mask)


def _launch(x, q, k, v, wq, wk, heads: int, eps: float, has_q: bool) -> None:
    batch, n_tokens, _ = x.shape
    if batch * n_tokens == 0:
        return
    head_dim = k.shape[-1]
    norm = wk is not None
    dummy = k  # unused pointer when a flag is off
    _split_norm_kernel[(batch * n_tokens,)](
        x, q if has_q else dummy, k, v, wq if (norm and has_q) else dummy, wk if norm else dummy, n_tokens, heads,
        eps, x.stride(0), x.stride(1), q.stride(0) if has_q else 0, q.stride(1) if has_q else 0, k.stride(0),
        k.stride(1), HAS_Q=has_q, NORM=norm, HEAD_DIM=head_dim, BLOCK_H=1 << math.ceil(math.log2(heads)),
        num_warps=8 if (1 << math.ceil(math.log2(heads))) * head_dim >= 2048 else 4,
    )  # fmt: skip


def joint_qkv(
    img_qkv: torch.Tensor,
    txt_qkv: torch.Tensor | None,
    heads: int,
    norms: tuple | None,
    eps: float = 1e-6,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """img_qkv [B, Ni, 3D]; txt_qkv [B, Nt, 3D] (text queries too) or [B, Nt, 2D] (keys/values only) or None;
    norms = (w_q, w_k, w_added_q, w_added_k) [head_dim] each (w_added_q may be None) or None for no qk-norm.
    Returns q [B, Nq, H, hd], k and v [B, Ni+Nt, H, hd], contiguous, image tokens first."""
    dim = img_qkv.shape[-1] // 3
    if img_qkv.ndim != 3 or img_qkv.shape[-1] != 3 * dim or dim % heads:
        raise ValueError(f"img_qkv must be [B, N, 3 * heads * head_dim], got {list(img_qkv.shape)} for {heads} heads")
    txt_has_q = txt_qkv is not None and txt_qkv.shape[-1] == 3 * dim
    if txt_qkv is not None and not (txt_has_q or txt_qkv.shape[-1] == 2 * dim):
        raise ValueError(f"txt_qkv must be [B, N, 3D] or [B, N, 2D] with D = {dim}, got {list(txt_qkv.shape)}")
    head_dim = dim // heads
    pow2 = head_dim & (head_dim - 1) == 0  # the kernel's head axis is one power-of-two block (every SD3 model: 64)
    if not pow2 or resolve(backend, img_qkv.device) == "torch":
        return joint_qkv_ref(img_qkv, txt_qkv, heads, norms, eps)
    if torch.is_grad_enabled():  # under no_grad no input can need a backward
        inputs = {"img_qkv": img_qkv, "txt_qkv": txt_qkv, **{f"norms[{i}]": w for i, w in enumerate(norms or ())}}
        graded = [name for name, t in inputs.items() if t is not None and t.requires_grad]
        if graded:
            raise ValueError(
                f"the Triton joint_qkv has no backward, but {', '.join(graded)} require grad: pass backend='torch' "
                f"under autograd (the engine's Ops does for a differentiable forward), or run under torch.no_grad()"
            )
    batch, n_img, _ = img_qkv.shape
    n_txt = 0 if txt_qkv is None else txt_qkv.shape[1]
    q = img_qkv.new_empty(batch, n_img + (n_txt if txt_has_q else 0), heads, head_dim)
    k = img_qkv.new_empty(batch, n_img + n_txt, heads, head_dim)
    v = torch.empty_like(k)
    wq, wk, wq_txt, wk_txt = norms if norms is not None else (None,) * 4
    _launch(img_qkv.contiguous(), q, k, v, wq, wk, heads, eps, has_q=True)
    if txt_qkv is not None:
        _launch(
            txt_qkv.contiguous(), q[:, n_img:], k[:, n_img:], v[:, n_img:], wq_txt, wk_txt, heads, eps, has_q=txt_has_q
        )
    return q, k, v


def joint_qkv_ref(
    img_qkv: torch.Tensor, txt_qkv: torch.Tensor | None, heads: int, norms: tuple | None, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-torch reference: chunk, `F.rms_norm` per head (fp32 statistics), concatenate."""
    wq, wk, wq_txt, wk_txt = norms if norms is not None else (None,) * 4

    def heads_of(x: torch.Tensor, n: int) -> list[torch.Tensor]:
        return list(x.unflatten(-1, (n, heads, -1)).unbind(2))

    def norm(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        return x if w is None else F.rms_norm(x, (x.shape[-1],), w, eps)

    q, k, v = heads_of(img_qkv, 3)
    q, k = norm(q, wq), norm(k, wk)
    if txt_qkv is None:
        return q, k, v
    if txt_qkv.shape[-1] == img_qkv.shape[-1]:
        q_txt, k_txt, v_txt = heads_of(txt_qkv, 3)
        q = torch.cat([q, norm(q_txt, wq_txt)], dim=1)
    else:
        k_txt, v_txt = heads_of(txt_qkv, 2)
    return q, torch.cat([k, norm(k_txt, wk_txt)], dim=1), torch.cat([v, v_txt], dim=1)
