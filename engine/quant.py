"""FP8 (e4m3) weights for the per-block linear layers, rowwise scales, through `torch._scaled_mm`.

Checkpoints stay bf16; `quantize_fp8(backbone)` converts at load. Quantised: q/k/v, add_k/v (and add_q), the output
projections and both FFNs of every block. Kept bf16: embedders, adaLN linears (prompt-only work, once per prompt with
the conditioning cache), norms. Activations are quantised per token (row) on the fly.
"""

from __future__ import annotations

import torch
from torch import nn

E4M3_MAX = 448.0


def fp8_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x_fp8 [M, K] e4m3, scale [M, 1] fp32) with x ≈ x_fp8 * scale."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) / E4M3_MAX
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


def linear_fp8_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What `Float8Linear` computes, in plain torch: both operands rounded to e4m3 with rowwise scales."""
    xq, xs = quantize_rowwise(x.reshape(-1, x.shape[-1]))
    wq, ws = quantize_rowwise(weight)
    out = (xq.float() * xs) @ (wq.float() * ws).t()
    return (out + (bias.float() if bias is not None else 0)).to(x.dtype).reshape(*x.shape[:-1], -1)


_fused_quantize = None


def _quantize_fused(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rowwise` compiled into one row-reduction + cast kernel on CUDA. Eager it is five passes over the
    activation (abs, amax, upcast, divide, cast), which made fp8 slower than bf16 (bench/results run 1)."""
    global _fused_quantize
    if x.device.type != "cuda":
        return quantize_rowwise(x)
    if _fused_quantize is None:
        _fused_quantize = torch.compile(quantize_rowwise, dynamic=True, fullgraph=True)
    return _fused_quantize(x)


class Float8Linear(nn.Module):
    """y = x W^T + b with W stored e4m3 [out, in] and scale [1, out]; x quantised per row; bf16 out."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        wq, ws = quantize_rowwise(linear.weight.detach())
        self.register_buffer("weight_fp8", wq)
        self.register_buffer("weight_scale", ws.t().contiguous())  # [1, out], what _scaled_mm's scale_b wants
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xq, xs = _quantize_fused(x.reshape(-1, shape[-1]))
        out = torch._scaled_mm(
            xq, self.weight_fp8.t(), scale_a=xs, scale_b=self.weight_scale, bias=self.bias, out_dtype=x.dtype
        )
        return out.reshape(*shape[:-1], self.out_features)


def quantize_fp8(backbone: nn.Module) -> nn.Module:
    """Swap every linear of every block except the adaLN ones (`norm1*.linear`) for `Float8Linear`, in place."""
    device = next(backbone.parameters()).device
    if not fp8_supported(device):
        raise ValueError(
            f"dtype='fp8' needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9: Ada, Hopper "
            f"or newer); this engine is on {device}. Use dtype='bf16'."
        )
    for block in backbone.transformer_blocks:
        linears = [name for name, m in block.named_modules() if isinstance(m, nn.Linear)]
        for name in linears:
            if name.startswith("norm1"):
                continue
            parent, _, child = name.rpartition(".")
            owner = block.get_submodule(parent)
            setattr(owner, child, Float8Linear(getattr(owner, child)))
    return backbone
