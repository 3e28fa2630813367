"""FP8 (e4m3) weights for the per-block linear layers, rowwise scales, through `torch._scaled_mm`.

Checkpoints stay bf16; `quantize_fp8(backbone)` converts at load. Quantised: q/k/v, add_k/v (and add_q), the output
projections and both FFNs of every block. Kept bf16: embedders, adaLN linears (prompt-only work, once per prompt with
the conditioning cache; e4m3 weight-only with `adaln=True`), norms. Activations are quantised per token (row) by the
op that produces them (LayerNorm-modulate, GELU: `engine.ops`), else by `Float8Linear` in one pass that reads the rows
in place (the attention output). Inference only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import kernels
from engine import ops


def fp8_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def linear_fp8_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weight_only: bool = False
) -> torch.Tensor:
    """What `Float8Linear` computes, in plain fp32 torch: W rounded to e4m3 with rowwise scales, x too unless
    `weight_only`."""
    x2 = x.reshape(-1, x.shape[-1])
    if weight_only:
        xd = x2.float()
    else:
        xq, xs = kernels.quantize_rowwise(x2, backend="torch")
        xd = xq.float() * xs
    wq, ws = kernels.quantize_rowwise(weight, backend="torch")
    out = xd @ (wq.float() * ws).t()
    return (out + (bias.float() if bias is not None else 0)).to(x.dtype).reshape(*x.shape[:-1], -1)


class Float8Linear(nn.Module):
    """y = x W^T + b with W stored e4m3 [out, in] and scale [1, out]; x quantised per row (or given quantised)."""

    def __init__(self, linear: nn.Linear, weight_only: bool = False, fast_accum: bool = False):
        super().__init__()
        self.weight_only = weight_only  # e4m3 W, bf16 x and GEMM: for the tiny-M prompt-only layers (adaLN)
        # Hopper's fast FP8 accumulation: no periodic promotion of the partial sums to fp32 (torchao's inference
        # default). Faster, slightly less exact; `bench.gpu_check` measures both.
        self.fast_accum = fast_accum
        wq, ws = kernels.quantize_rowwise(linear.weight.detach(), backend="torch")  # once, at load
        self.register_buffer("weight_fp8", wq)
        self.register_buffer("weight_scale", ws.t().contiguous())  # [1, out], what _scaled_mm's scale_b wants
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @property
    def takes_fp8_input(self) -> bool:
        """Producers (`engine.ops`) hand this linear its input already quantised; weight-only layers take bf16."""
        return not self.weight_only

    def forward(self, x: torch.Tensor | ops.Float8Activation) -> torch.Tensor:
        if self.weight_only:
            # x (W_q * s)^T = (x W_q^T) * s: e4m3 -> bf16 is exact, so only the cast is materialised (2 B/weight, not
            # an fp32 dequantised copy) and the per-output scale is applied to the small [P, out] result.
            out = torch.nn.functional.linear(x, self.weight_fp8.to(x.dtype)) * self.weight_scale
            return (out if self.bias is None else out + self.bias).to(x.dtype)
        if isinstance(x, ops.Float8Activation):
            xq, xs, lead, dtype = x
        else:  # a [B, M, K] view (e.g. the image rows of the joint attention output) is quantised in place
            lead, dtype = x.shape[:-1], x.dtype
            x = x if x.ndim in (2, 3) else x.reshape(-1, x.shape[-1])
            xq, xs = kernels.quantize_rowwise(x, backend=ops.current())
        out = torch._scaled_mm(
            xq,
            self.weight_fp8.t(),
            scale_a=xs,
            scale_b=self.weight_scale,
            bias=self.bias,
            out_dtype=dtype,
            use_fast_accum=self.fast_accum,
        )
        return out.reshape(*lead, self.out_features)


def quantize_fp8(
    backbone: nn.Module,
    adaln: bool = False,
    require_fp8_gpu: bool = True,
    keep_bf16: Callable[[int, str], bool] | None = None,
    fast_accum: bool = False,
) -> nn.Module:
    """Swap every linear of every block for `Float8Linear`, in place. The adaLN linears (`norm1*.linear`, a third of
    SD3.5-L's weights but prompt-only work) stay bf16 unless `adaln=True` stores them e4m3 too (weight-only).
    `keep_bf16(block_index, linear_name)` leaves chosen linears in bf16 (fidelity/speed trade-offs, e.g. the first
    blocks or every `ff.net.2`). `fast_accum`: see `Float8Linear`."""
    device = next(backbone.parameters()).device
    if require_fp8_gpu and not fp8_supported(device):  # (tests run the CPU emulation of torch._scaled_mm)
        raise ValueError(
            f"dtype='fp8' needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9: Ada, Hopper "
            f"or newer); this engine is on {device}. Use dtype='bf16'."
        )
    for index, block in enumerate(backbone.transformer_blocks):
        linears = [name for name, m in block.named_modules() if isinstance(m, nn.Linear)]
        for name in linears:
            is_adaln = name.startswith("norm1")
            if (is_adaln and not adaln) or (keep_bf16 is not None and keep_bf16(index, name)):
                continue
            parent, _, child = name.rpartition(".")
            owner = block.get_submodule(parent)
            setattr(owner, child, Float8Linear(getattr(owner, child), weight_only=is_adaln, fast_accum=fast_accum))
    return backbone
