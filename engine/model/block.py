"""One MMDiT block (diffusers `JointTransformerBlock`), written as the paper's adaLN-Zero transformer:

    shift, scale, gate = adaLN(temb)                                  per stream and sublayer
    x = x + gate * attn(modulate(norm(x), shift, scale))             jointly over [image ‖ text]
    x = x + gate * ffn(modulate(norm(x), shift, scale))

Where a residual meets the next sublayer's norm, one fused op computes both (`ResidualModulatedNorm`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.config import BackboneConfig
from engine.model.layers import AdaLN, Attention, FeedForward, ModulatedNorm, ResidualModulatedNorm
from engine.runtime.ops import Ops


@dataclass
class Modulation:
    """One adaLN output: `modulate(x) = x * (1 + scale) + shift`, and the gate of the residual it feeds. Each [B, D]."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor | None = None


@dataclass
class StreamModulation:
    """One stream's modulations in a block: before attention, before the FFN (None: the deepest block's text stream,
    which ends at attention), before the second attention (SD3.5-M's image stream)."""

    attn: Modulation
    ff: Modulation | None = None
    attn2: Modulation | None = None


class JointBlock(nn.Module):
    """One MMDiT block.

    `context_pre_only`: the model's final block, whose text stream has a 2-chunk continuous adaLN and no output.
    `deepest`: the last block the reward runs when no head reads its text tokens; only its image stream is
    updated."""

    def __init__(self, cfg: BackboneConfig, index: int, deepest: bool):
        super().__init__()
        dim = cfg.hidden_size
        self.dual = index in cfg.dual_attention_layers
        self.context_pre_only = index == cfg.num_layers - 1
        self.deepest = deepest
        self.norm1 = AdaLN(dim, 9 if self.dual else 6)
        self.norm1_context = AdaLN(dim, 2 if self.context_pre_only else 6)
        self.attn = Attention(cfg, joint=True, text_queries=not deepest)
        self.attn2 = Attention(cfg, joint=False) if self.dual else None
        self.ff = FeedForward(dim)
        if not deepest:
            self.ff_context = FeedForward(dim)
        # modulate(norm(.)) in front of each sublayer (no parameters: the adaLN vectors come from `modulation`)
        self.attn_norm, self.attn_norm_context = ModulatedNorm(), ModulatedNorm()
        self.attn2_norm = ModulatedNorm() if self.dual else None
        self.ff_norm = ResidualModulatedNorm()
        self.ff_norm_context = None if deepest else ResidualModulatedNorm()

    @property
    def num_modulation_vectors(self) -> int:
        return (9 if self.dual else 6) + (2 if self.deepest else 6)

    def modulation(self, temb: torch.Tensor) -> torch.Tensor:
        """adaLN-Zero vectors Linear(SiLU(temb)) of both streams, [P, n, D]: image (shift, scale, gate) for attn, ff
        [, attn2], then text (shift, scale[, gate]) for attn [and (shift, scale, gate) for ff]."""
        x, c = self.norm1(temb), self.norm1_context(temb)
        if self.context_pre_only:  # continuous adaLN stores (scale, shift)
            c = c.flip(1)
        elif self.deepest:  # the deepest block only needs the text stream's pre-attention shift and scale
            c = c[:, :2]
        return torch.cat([x, c], dim=1)

    def split_modulation(self, m: torch.Tensor) -> tuple[StreamModulation, StreamModulation]:
        """[B, n, D] from `modulation` -> (image, text) named vectors."""
        # [B, n, D] -> [n, B, D] in one copy (none at B = 1): each vector is then a contiguous [B, D], which the
        # kernels read as it is; a strided m[:, i] would cost each op a copy of its own (12 launches per block)
        m = m.transpose(0, 1).contiguous()

        def mod(i: int, gate: bool = True) -> Modulation:
            return Modulation(m[i], m[i + 1], m[i + 2] if gate else None)

        img = StreamModulation(attn=mod(0), ff=mod(3), attn2=mod(6) if self.dual else None)
        c = 9 if self.dual else 6
        txt = StreamModulation(attn=mod(c, gate=False)) if self.deepest else StreamModulation(mod(c), mod(c + 3))
        return img, txt

    def input_producers(self) -> dict[str, str]:
        """Each linear that reads a produced activation -> the module that produces it (names relative to the block):
        the producer -> consumer pairs `engine.runtime.fp8.quantize_fp8` fuses."""
        pairs = {"attn.to_qkv": "attn_norm", f"attn.{self.attn.context}": "attn_norm_context"}
        pairs["ff.net.0.proj"] = "ff_norm"
        if self.dual:
            pairs["attn2.to_qkv"] = "attn2_norm"
        if not self.deepest:
            pairs["ff_context.net.0.proj"] = "ff_norm_context"
        for name in ("attn", "attn2", "ff", "ff_context"):
            sublayer = getattr(self, name, None)
            if sublayer is not None:
                pairs |= {f"{name}.{linear}": f"{name}.{p}" for linear, p in sublayer.input_producers().items()}
        return pairs

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, emb: torch.Tensor, ops: Ops
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, N_img, D], c [B, N_txt, D]. `emb`: this block's modulation [B, n, D] from `modulation()` (computed
        once per prompt), or temb [B, D] to compute it here (training: FSDP2 gathers the adaLN weights with the
        block, checkpointing recomputes them). Returns the new (x, c); c is None after the deepest block."""
        img, txt = self.split_modulation(emb if emb.ndim == 3 else self.modulation(emb))

        # x = x + gate * attn(modulate(norm(x))), the text stream likewise, attention joint over both
        a, c_a = self.attn(self.attn_norm(x, img.attn, ops), self.attn_norm_context(c, txt.attn, ops), ops)
        gate = img.attn.gate
        if self.dual:  # SD3.5-M: a second image-only attention on the block input, modulated separately
            a2, _ = self.attn2(self.attn2_norm(x, img.attn2, ops), None, ops)
            x = ops.gated_residual(x, a, gate)
            a, gate = a2, img.attn2.gate

        # x = x + gate * ffn(modulate(norm(x))); the residual and the next norm are one fused op
        x, h = self.ff_norm(x, a, gate, img.ff, ops)
        x = ops.gated_residual(x, self.ff(h, ops), img.ff.gate)
        if self.deepest:
            return x, None
        c, h_c = self.ff_norm_context(c, c_a, txt.attn.gate, txt.ff, ops)
        return x, ops.gated_residual(c, self.ff_context(h_c, ops), txt.ff.gate)
