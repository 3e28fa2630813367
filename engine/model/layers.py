"""The layers of an MMDiT block: joint attention, the tanh-GELU FFN, the adaLN modulation linear, and the modules that
produce a linear's input (LayerNorm-modulate, the attention output's rows). Parameter names equal diffusers'.

Every module that runs a fused op takes the forward's `Ops` (`engine.runtime.ops`) as its last argument. A producer
module (`ModulatedNorm`, `ResidualModulatedNorm`, `GELUProjection`, `LinearInput`) has a `quantized()` twin that
returns its output already in FP8 for an FP8 consumer: `engine.runtime.fp8.quantize_fp8` installs the pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import BackboneConfig
from engine.runtime.fp8 import GELUProjectionFP8, ModulatedNormFP8, QuantizeRows, ResidualModulatedNormFP8
from engine.runtime.ops import Ops

# ------------------------------------------------------------------------------------------------------ producers


class ModulatedNorm(nn.Module):
    """modulate(norm(x)) = LN(x) * (1 + scale) + shift: LayerNorm eps 1e-6 without affine, then the adaLN shift and
    scale of `mod` ([B, D] each). x [B, N, D]."""

    def forward(self, x: torch.Tensor, mod, ops: Ops) -> torch.Tensor:
        return ops.layernorm_modulate(x, mod.shift, mod.scale)

    def quantized(self) -> nn.Module:
        return ModulatedNormFP8()


class ResidualModulatedNorm(nn.Module):
    """x = x + gate * y, and modulate(norm(x)) with `mod`'s shift and scale, in one pass: the residual of one sublayer
    and the input of the next. Returns (x, modulated)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, mod, ops: Ops):
        return ops.gated_residual_layernorm_modulate(x, y, gate, mod.shift, mod.scale)

    def quantized(self) -> nn.Module:
        return ResidualModulatedNormFP8()


class LinearInput(nn.Module):
    """The input of an output projection as attention left it (rows of one stream, a strided view); FP8 quantises
    the rows in place."""

    def forward(self, x: torch.Tensor, ops: Ops) -> torch.Tensor:
        return x

    def quantized(self) -> nn.Module:
        return QuantizeRows()


# ------------------------------------------------------------------------------------------------------ attention


class RMSNorm(nn.Module):
    """The qk-norm weight [head_dim] (diffusers `RMSNorm`, eps 1e-6); applied by `Ops.joint_qkv`."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


# diffusers stores q, k, v projections separately; we run each stream's as one GEMM (fused by a load hook, split
# back by `engine.model.mmdit.diffusers_state_dict` when saving).
FUSED_PROJECTIONS = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "add_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
    "add_kv": ("add_k_proj", "add_v_proj"),
}


class Attention(nn.Module):
    """Image self-attention, optionally joint with the text stream ([image ‖ text] keys; SD3's joint attention).

    `text_queries=False` (the deepest block) computes only the image rows: no text queries, no text output."""

    def __init__(self, cfg: BackboneConfig, joint: bool, text_queries: bool = True):
        super().__init__()
        dim, qk_norm = cfg.hidden_size, cfg.qk_norm == "rms_norm"
        self.heads = cfg.num_attention_heads
        self.text_queries = joint and text_queries
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.norm_q = RMSNorm(cfg.attention_head_dim) if qk_norm else None
        self.norm_k = RMSNorm(cfg.attention_head_dim) if qk_norm else None
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.out_input = LinearInput()
        self.context = None
        if joint:
            self.context = "add_qkv" if text_queries else "add_kv"
            setattr(self, self.context, nn.Linear(dim, (3 if text_queries else 2) * dim))
            self.norm_added_k = RMSNorm(cfg.attention_head_dim) if qk_norm else None
            if text_queries:
                self.to_add_out = nn.Linear(dim, dim)
                self.add_out_input = LinearInput()
                self.norm_added_q = RMSNorm(cfg.attention_head_dim) if qk_norm else None
        self.register_load_state_dict_pre_hook(_fuse_projection_keys)

    def _norm_weights(self) -> tuple | None:
        if self.norm_q is None:
            return None
        added_q = getattr(self, "norm_added_q", None)
        added_k = getattr(self, "norm_added_k", None)
        return (self.norm_q.weight, self.norm_k.weight, added_q and added_q.weight, added_k and added_k.weight)

    @property
    def context_projection(self) -> nn.Module | None:
        """The text stream's fused projection (`add_qkv`, or `add_kv` without text queries)."""
        return None if self.context is None else getattr(self, self.context)

    def input_producers(self) -> dict[str, str]:
        """Output projection -> the module producing its input (see `JointBlock.input_producers`)."""
        pairs = {"to_out.0": "out_input"}
        if self.text_queries:
            pairs["to_add_out"] = "add_out_input"
        return pairs

    def forward(self, x, c, ops: Ops) -> tuple[torch.Tensor, torch.Tensor | None]:
        # x [B, N_img, D], c [B, N_txt, D] or None: the modulated streams (FP8 activations in an FP8 model)
        img = self.to_qkv(x)  # [B, N_img, 3D]
        txt = None if c is None else self.context_projection(c)
        q, k, v = ops.joint_qkv(img, txt, self.heads, self._norm_weights())  # [B, N, H, hd]
        out = ops.attention(q, k, v).flatten(2)  # [B, Nq, D]
        n_img = img.shape[1]
        x_out = self.to_out[0](self.out_input(out[:, :n_img], ops))
        c_out = None
        if self.text_queries and c is not None:
            c_out = self.to_add_out(self.add_out_input(out[:, n_img:], ops))
        return x_out, c_out


def _fuse_projection_keys(module: Attention, state: dict, prefix: str, *args) -> None:
    """Load hook: diffusers' separate q/k/v keys -> one fused projection (concatenated along the output dim)."""
    for fused in ("to_qkv", module.context):
        if fused is None:
            continue
        for leaf in ("weight", "bias"):
            parts = [f"{prefix}{name}.{leaf}" for name in FUSED_PROJECTIONS[fused]]
            if all(p in state for p in parts):
                state[f"{prefix}{fused}.{leaf}"] = torch.cat([state.pop(p) for p in parts], dim=0)


# ------------------------------------------------------------------------------------------------------------ FFN


class GELUProjection(nn.Module):
    """tanh-GELU(proj(x)); holds the FFN's first linear as `proj` (diffusers' `GELU(approximate="tanh")` module, key
    `net.0.proj`). The producer of the FFN's second linear's input."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor, ops: Ops) -> torch.Tensor:
        return ops.linear_gelu(x, self.proj)

    def quantized(self) -> nn.Module:
        return GELUProjectionFP8(self.proj)


class FeedForward(nn.Module):
    """Linear(D, 4D) -> tanh-GELU -> Linear(4D, D); keys `net.0.proj`, `net.2` as in diffusers (net.1 is dropout)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([GELUProjection(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def input_producers(self) -> dict[str, str]:
        """The out-projection's input comes from the GELU (see `JointBlock.input_producers`)."""
        return {"net.2": "net.0"}

    def forward(self, x: torch.Tensor, ops: Ops) -> torch.Tensor:
        return self.net[2](self.net[0](x, ops))


# -------------------------------------------------------------------------------------------------------- adaLN


class AdaLN(nn.Module):
    """The modulation linear (`norm1.linear`, `norm1_context.linear`): temb -> n_out vectors Linear(SiLU(temb)). The
    norm itself is `ModulatedNorm`.

    These linears hold a third of SD3.5-L's weights, yet with the prompt-conditioning cache they serve only
    `condition()`, once per prompt. `on_host()` keeps them in host memory (pinned when CUDA is present): each call
    then copies them to the input's device, uses them and lets the copy go, so the device holds one block's at most.
    They stay on the host through `.to()` / `.cuda()` of the model; their floating-point parameters are cast to the
    input's dtype as they are copied."""

    def __init__(self, dim: int, n_out: int):
        super().__init__()
        self.linear = nn.Linear(dim, n_out * dim)
        self.host_resident = False

    def on_host(self) -> int:
        """Move the weights to (pinned) host memory for good; returns the bytes moved off their device."""
        tensors = [*self.linear.parameters(), *self.linear.buffers()]
        moved = sum(t.numel() * t.element_size() for t in tensors if t.device.type != "cpu")
        pin = torch.cuda.is_available()
        for t in tensors:  # in place: the module keeps its parameters (names, requires_grad, state_dict)
            host = t.data.cpu()
            t.data = host.pin_memory() if pin else host
        self.host_resident = True
        return moved

    def _apply(self, fn, recurse=True):
        return self if self.host_resident else super()._apply(fn, recurse)

    def forward(self, temb: torch.Tensor) -> torch.Tensor:  # [P, D] -> [P, n_out, D]
        x = F.silu(temb)
        if self.host_resident:  # (a CPU engine goes through the same path: copies to the same device are no-ops)
            # parameters follow x's dtype; buffers (e4m3 weights and their fp32 scales) keep theirs
            stream = {n: t.to(x.device, x.dtype, non_blocking=True) for n, t in self.linear.named_parameters()}
            stream |= {n: t.to(x.device, non_blocking=True) for n, t in self.linear.named_buffers()}
            y = torch.func.functional_call(self.linear, stream, (x,))
        else:
            y = self.linear(x)
        return y.unflatten(1, (-1, temb.shape[-1]))
