"""The slimmed SD3/SD3.5 MMDiT that DiT-Reward reads features from (DESIGN.md Eq. 1-4).

    z_t  = (1 - t) z0 + t eps                      Eq. 1   near-clean latent
    h_l  = image-token output of MMDiT block l     Eq. 2   joint attention over [image ‖ text]
    p_l  = mean over image tokens of h_l (fp32)    Eq. 3
    f    = concat_l p_l  -> [B, n_layers, D]       Eq. 4   (the head, Eq. 5, lives in head.py)

Parameter names equal diffusers' `SD3Transformer2DModel`, so its state dict loads as is. What a generator needs and
the reward does not is never built: blocks after the deepest pooled one, `norm_out`/`proj_out`/unpatchify, and in the
deepest block the text queries, the text output projection and the text FFN (only the image rows of its attention
are computed).

With t fixed, temb and every block's adaLN modulation depend on the prompt alone: `condition()` computes them once
per prompt (a `Conditioning`), and `forward()` reuses them for every latent scored against that prompt. `forward` is
the one block loop: scoring, CUDA graphs and the trainer all run it, under the `Backends` they are given.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine.config import BackboneConfig
from engine.model.block import JointBlock
from engine.model.conditioning import Conditioning
from engine.model.embeddings import PatchEmbed, TimeTextEmbed
from engine.model.layers import FUSED_PROJECTIONS, AdaLN, Attention
from engine.runtime.backends import Backends
from engine.runtime.ops import Ops
from kernels.backend import accumulation_dtype


class MMDiTReward(nn.Module):
    """Blocks 0..max(layers) of an SD3/SD3.5 MMDiT, returning mean-pooled image features of `layers`."""

    def __init__(self, cfg: BackboneConfig, layers: tuple[int, ...]):
        super().__init__()
        self.cfg, self.layers = cfg, tuple(layers)
        depth = self.layers[-1] + 1
        self.pos_embed = PatchEmbed(cfg)
        self.time_text_embed = TimeTextEmbed(cfg.hidden_size, cfg.pooled_projection_dim)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, cfg.hidden_size)
        self.transformer_blocks = nn.ModuleList(JointBlock(cfg, i, deepest=i == depth - 1) for i in range(depth))
        # Recompute each block in backward instead of storing its activations (reward backprop, full fine-tuning).
        self.gradient_checkpointing = False

    @property
    def modulation_sizes(self) -> list[int]:
        """Vectors per block in `Conditioning.modulation` (packed block after block)."""
        return [block.num_modulation_vectors for block in self.transformer_blocks]

    def adaln_on_host(self) -> int:
        """Every block's adaLN linears to (pinned) host memory (see `AdaLN`); returns the bytes freed on the device."""
        return sum(m.on_host() for m in self.modules() if isinstance(m, AdaLN))

    def embed_prompt(self, prompt_embeds: torch.Tensor, pooled: torch.Tensor, t: float):
        """(context [P, L, D] = context_embedder(prompt_embeds), temb [P, D] = temb(1000 t, pooled))."""
        timesteps = torch.full((pooled.shape[0],), 1000.0 * t, dtype=torch.float32, device=pooled.device)
        return self.context_embedder(prompt_embeds), self.time_text_embed(timesteps, pooled)

    def condition(self, prompt_embeds: torch.Tensor, pooled: torch.Tensor, t: float) -> Conditioning:
        """Prompt-only work: projected text tokens and every block's modulation from temb(1000 t, pooled)."""
        context, temb = self.embed_prompt(prompt_embeds, pooled, t)
        modulation = torch.cat([block.modulation(temb) for block in self.transformer_blocks], dim=1)
        return Conditioning(context=context, modulation=modulation, t=t)

    def forward(
        self,
        z0: torch.Tensor,
        context: torch.Tensor,
        modulation: torch.Tensor,
        t: float,
        backends: Backends,
        noise: torch.Tensor | None = None,
        seed: int | None = None,
        image_offset: int = 0,
    ) -> torch.Tensor:
        """z0 [B, C, H, W] transformer-space latents, context [B, L, D], t -> features [B, n_layers, D] float32.

        `modulation`: every block's adaLN vectors packed [B, M, D] (`Conditioning.modulation`), or temb [B, D], from
        which each block computes its own inside its forward (training). Noise: explicit [B, C, H, W], or `seed` and
        `image_offset` (image b uses stream b + image_offset), or neither (fresh)."""
        ops = Ops.for_forward(backends)  # the one decision on autograd, for the whole forward
        z_t = ops.near_clean(z0, t, noise=noise, seed=seed, image_offset=image_offset)  # Eq. 1
        x, c = self.pos_embed(z_t.to(self.pos_embed.proj.weight.dtype)), context  # [B, N_img, D], [B, L, D]
        if modulation.ndim == 3:
            per_block = modulation.split(self.modulation_sizes, 1)
        else:
            per_block = [modulation] * len(self.transformer_blocks)
        checkpointed = self.gradient_checkpointing and ops.differentiable
        # fp32 accumulation (fp64 for an fp64 model: gradient checks)
        features = x.new_empty(x.shape[0], len(self.layers), x.shape[-1], dtype=accumulation_dtype(x.dtype))
        pooled = []
        for index, (block, emb) in enumerate(zip(self.transformer_blocks, per_block, strict=True)):
            if checkpointed:  # recomputed in backward with the same `ops`: the engine's own backends
                x, c = checkpoint(block, x, c, emb, ops, use_reentrant=False)
            else:
                x, c = block(x, c, emb, ops)  # Eq. 2
            if index in self.layers:
                if ops.differentiable:  # small [B, D] vectors, stacked below
                    pooled.append(ops.mean_pool(x))
                else:  # Eq. 3-4 written straight into the feature buffer
                    ops.mean_pool_into(x, features, self.layers.index(index))
        return torch.stack(pooled, dim=1) if pooled else features


def diffusers_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` under diffusers' names: fused projections split back into q/k/v (views, no copies)."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if not isinstance(module, Attention):
            continue
        for fused in ("to_qkv", module.context):
            for leaf in ("weight", "bias") if fused else ():
                tensor = state.pop(f"{name}.{fused}.{leaf}")
                parts = FUSED_PROJECTIONS[fused]
                for part_name, part in zip(parts, tensor.chunk(len(parts)), strict=True):
                    state[f"{name}.{part_name}.{leaf}"] = part
    return state
