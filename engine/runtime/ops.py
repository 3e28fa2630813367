"""The fused-op seam of the backbone: each call goes to a Triton kernel or its pure-torch reference (`kernels/`).

`Ops` is built once per forward from the engine's `Backends` and handed to every block; the block code calls its
methods and never branches on the backend, and whether the forward is differentiable is decided here, once.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kernels
from engine.runtime.attention import attention
from engine.runtime.backends import Backends


@dataclass(frozen=True)
class Ops:
    """The fused ops of one forward, bound to concrete backends. `differentiable`: the forward records a graph
    (autograd-capable kernels, pooled features stacked) rather than writing into preallocated buffers."""

    kernels: str
    attention_backend: str
    differentiable: bool

    @classmethod
    def for_forward(cls, backends: Backends) -> Ops:
        """The ops a forward starting now runs: `backends`, and autograd on or off as torch says at this point."""
        return cls(backends.kernels, backends.attention, torch.is_grad_enabled())

    def near_clean(self, z0: torch.Tensor, t: float | torch.Tensor, **kw) -> torch.Tensor:
        """Eq. 1: (1 - t) z0 + t eps, t a float or a float32 [B] tensor (one per image); `kw`: noise | seed,
        image_offset (see `kernels.near_clean`)."""
        return kernels.near_clean(z0, t, backend=self.kernels, **kw)

    def layernorm_modulate(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """LN(x) * (1 + scale) + shift; x [B, N, D], shift/scale [B, D]."""
        return kernels.layernorm_modulate(x, shift, scale, backend=self.kernels)

    def gated_residual(self, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """x + gate * y; x, y [B, N, D], gate [B, D]."""
        return kernels.gated_residual(x, y, gate, backend=self.kernels)

    def gated_residual_layernorm_modulate(
        self, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + gate * y, LN(x + gate * y) * (1 + scale) + shift) in one pass."""
        return kernels.gated_residual_layernorm_modulate(x, y, gate, shift, scale, backend=self.kernels)

    def joint_qkv(self, img_qkv: torch.Tensor, txt_qkv: torch.Tensor | None, heads: int, norms: tuple | None):
        """Fused projections [B, N, 3D] of both streams -> q, k, v [B, N_img + N_txt, H, hd], qk-normed. Its Triton
        kernel has no backward: a differentiable forward runs the reference."""
        backend = "torch" if self.differentiable else self.kernels
        return kernels.joint_qkv(img_qkv, txt_qkv, heads, norms, backend=backend)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Softmax attention through the one seam (`engine.runtime.attention`). [B, N, H, hd] layout."""
        return attention(q, k, v, self.attention_backend)

    def mean_pool(self, h: torch.Tensor) -> torch.Tensor:
        """Eq. 3, differentiable: h [B, N, D] -> [B, D] fp32."""
        return kernels.mean_pool(h, backend=self.kernels)

    def mean_pool_into(self, h: torch.Tensor, out: torch.Tensor, slot: int) -> None:
        """Eq. 3-4 without autograd: the mean of h [B, N, D] written into out[:, slot]."""
        kernels.mean_pool_into(h, out, slot, backend=self.kernels)

    def linear_gelu(self, x: torch.Tensor, proj: torch.nn.Module) -> torch.Tensor:
        """tanh-GELU(proj(x)). Inference on CUDA uses cuBLASLt's GELU epilogue: the activation is applied to the
        fp32 accumulator inside the GEMM, saving a read and a write of the 4D-wide hidden state (the largest
        elementwise pass of a block). It has no backward, hence not when differentiable."""
        if isinstance(proj, torch.nn.Linear) and x.is_cuda and not self.differentiable and gelu_epilogue_ok(x.dtype):
            out = torch._addmm_activation(proj.bias, x.reshape(-1, x.shape[-1]), proj.weight.t(), use_gelu=True)
            return out.view(*x.shape[:-1], -1)
        return F.gelu(proj(x), approximate="tanh")


def gelu_epilogue_ok(dtype: torch.dtype) -> bool:
    """Whether `torch._addmm_activation(use_gelu=True)` computes SD3's tanh-GELU for `dtype` on this CUDA device."""
    return _gelu_epilogue_is_tanh() and dtype in (torch.bfloat16, torch.float16, torch.float32)


@functools.cache
def _gelu_epilogue_is_tanh() -> bool:
    """Checked once per process: in fp32 (no TF32) the epilogue's output must be 10x closer to tanh-GELU than to exact
    GELU (the CPU version is exact GELU; a CUDA build whose epilogue differed falls back to F.gelu with a warning)."""
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
    if err_tanh * 10 < err_exact:
        return True
    warnings.warn(
        f"torch._addmm_activation's GELU is not tanh-GELU here (errors vs tanh {err_tanh:.1e}, vs exact "
        f"{err_exact:.1e}); using F.gelu",
        RuntimeWarning,
        stacklevel=3,
    )
    return False
