"""FP8 (e4m3) as a model transformation: `quantize_fp8(backbone)` swaps the per-block linears for `Float8Linear`
(rowwise scales, `torch._scaled_mm`) and, in front of each, installs the FP8 twin of the module that produces its
input, so the quantisation of an activation is fused into the op that makes it and the block's code reads the same in
bf16 and FP8.

Checkpoints stay bf16; the pass runs at load. Quantised: q/k/v, add_k/v (and add_q), the output projections and both
FFNs of every block. Kept bf16: embedders, adaLN linears (prompt-only work, once per prompt with the conditioning cache;
e4m3 weight-only with `adaln=True`), norms. The producer pairs (`JointBlock.input_producers`):
    LayerNorm-modulate            -> q/k/v projections        `ModulatedNormFP8`
    gated residual + LN-modulate  -> FFN in-projection        `ResidualModulatedNormFP8`
    FFN in-projection + tanh-GELU -> FFN out-projection       `GELUProjectionFP8`
    attention output rows         -> output projections       `QuantizeRows` (reads the rows in place)
Inference only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

import kernels


def fp8_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Float8Activation(NamedTuple):
    """An activation quantised by the module that produced it, for a `Float8Linear`: rows [M, K] e4m3, scales
    [M, 1], the leading shape to restore and the dtype to compute the output in."""

    data: torch.Tensor
    scale: torch.Tensor
    lead_shape: torch.Size
    dtype: torch.dtype


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


def _rows(x: torch.Tensor, kernels_backend: str) -> Float8Activation:
    """x [B, M, K] or [M, K] (a strided view is read in place) quantised per row."""
    lead, dtype = x.shape[:-1], x.dtype
    x = x if x.ndim in (2, 3) else x.reshape(-1, x.shape[-1])
    q, scale = kernels.quantize_rowwise(x, backend=kernels_backend)
    return Float8Activation(q, scale, lead, dtype)


class Float8Linear(nn.Module):
    """y = x W^T + b with W stored e4m3 [out, in] and scale [1, out]; x arrives quantised (`Float8Activation`) from
    the producer `quantize_fp8` installed. A plain tensor (standalone use) is quantised by the torch reference."""

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

    def forward(self, x: torch.Tensor | Float8Activation) -> torch.Tensor:
        if self.weight_only:
            # x (W_q * s)^T = (x W_q^T) * s: e4m3 -> bf16 is exact, so only the cast is materialised (2 B/weight, not
            # an fp32 dequantised copy) and the per-output scale is applied to the small [P, out] result.
            out = torch.nn.functional.linear(x, self.weight_fp8.to(x.dtype)) * self.weight_scale
            return (out if self.bias is None else out + self.bias).to(x.dtype)
        xq, xs, lead, dtype = x if isinstance(x, Float8Activation) else _rows(x, "torch")
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


# ------------------------------------------------------------------------------ producers with quantisation fused in
# Each takes the arguments of its bf16 twin in `engine.model.layers` and returns a `Float8Activation` where the twin
# returns the bf16 tensor.


class ModulatedNormFP8(nn.Module):
    """LN(x) * (1 + scale) + shift, quantised per token in the same pass (never written in bf16)."""

    def forward(self, x: torch.Tensor, mod, ops) -> Float8Activation:
        q, scale = kernels.layernorm_modulate_fp8(x, mod.shift, mod.scale, backend=ops.kernels)
        return Float8Activation(q, scale, x.shape[:-1], x.dtype)


class ResidualModulatedNormFP8(nn.Module):
    """(x + gate * y, LN(x + gate * y) * (1 + scale) + shift quantised per token) in one pass."""

    def forward(self, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, mod, ops):
        x_new, q, scale = kernels.gated_residual_layernorm_modulate_fp8(
            x, y, gate, mod.shift, mod.scale, backend=ops.kernels
        )
        return x_new, Float8Activation(q, scale, x.shape[:-1], x.dtype)


class GELUProjectionFP8(nn.Module):
    """proj(x), then tanh-GELU fused into the per-row quantisation of the result. Keeps `proj` (key `net.0.proj`)."""

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x, ops) -> Float8Activation:
        h = self.proj(x)
        q, scale = kernels.quantize_rowwise(h.reshape(-1, h.shape[-1]), gelu=True, backend=ops.kernels)
        return Float8Activation(q, scale, h.shape[:-1], h.dtype)


class QuantizeRows(nn.Module):
    """The attention output's rows of one stream, quantised per row where they lie (no copy of the slice)."""

    def forward(self, x: torch.Tensor, ops) -> Float8Activation:
        return _rows(x, ops.kernels)


# ----------------------------------------------------------------------------------------------------- the pass


def quantize_fp8(
    backbone: nn.Module,
    adaln: bool = False,
    require_fp8_gpu: bool = True,
    keep_bf16: Callable[[int, str], bool] | None = None,
    fast_accum: bool = False,
) -> nn.Module:
    """Swap every linear of every block for `Float8Linear`, in place, and the producer of each FP8 linear's input for
    its quantising twin (`block.input_producers()`: linear name -> producer name; producer`.quantized()`: the twin).
    The adaLN linears (`norm1*.linear`, a third of SD3.5-L's weights but prompt-only work) stay bf16 unless
    `adaln=True` stores them e4m3 too (weight-only). `keep_bf16(block_index, linear_name)` leaves chosen linears in
    bf16 (fidelity/speed trade-offs, e.g. the first blocks or every `ff.net.2`); their producers stay bf16 too.
    `fast_accum`: see `Float8Linear`."""
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
            _replace(block, name, Float8Linear(block.get_submodule(name), weight_only=is_adaln, fast_accum=fast_accum))
        for linear, producer in block.input_producers().items():
            consumer = block.get_submodule(linear)
            if isinstance(consumer, Float8Linear) and not consumer.weight_only:
                _replace(block, producer, block.get_submodule(producer).quantized())
    return backbone


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent), child, module)
