"""The slimmed SD3/SD3.5 MMDiT that DiT-Reward reads features from (DESIGN.md Eq. 1-4).

    z_t  = (1 - t) z0 + t eps                      Eq. 1   noised latent at noise level t (sigma)
    h_l  = image-token output of MMDiT block l     Eq. 2   joint attention over [image ‖ text]
    p_l  = mean over image tokens of h_l (fp32)    Eq. 3
    f    = concat_l p_l  -> [B, n_layers, D]       Eq. 4   (the heads, Eq. 5, live in engine/heads/)

Parameter names equal diffusers' `SD3Transformer2DModel`, so its state dict loads as is. What the head reads is a
`Readout` (pooled image layers, full image tokens, full text tokens), and the forward returns exactly that
(`BackboneOutputs`). What a generator needs and the reward does not is never built: blocks after the deepest block
read, `norm_out`/`proj_out`/unpatchify, and, unless the head reads its text tokens, the deepest block's text queries,
text output projection and text FFN (only the image rows of its attention are computed).

temb and every block's adaLN modulation depend on (prompt, t) alone: `condition()` computes them once per prompt
and noise level (a `Conditioning`), and `forward()` reuses them for every latent scored against it. `forward` is the
one block loop: scoring, CUDA graphs and the trainer all run it, under the `Backends` they are given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine.checks import check_finite, first_nonfinite
from engine.config import BackboneConfig
from engine.model.block import JointBlock
from engine.model.conditioning import Conditioning, MakeLevel
from engine.model.embeddings import PatchEmbed, TimeTextEmbed
from engine.model.layers import FUSED_PROJECTIONS, AdaLN, Attention
from engine.runtime.backends import Backends
from engine.runtime.ops import Ops
from engine.schedule import TimeSchedule
from kernels.backend import accumulation_dtype

# The noise level (sigma) of a forward: one for every row, or one per row ([R] float32). R = B, or K B for an
# ensemble: every latent scored at K levels, rows view-major, the K views of a latent sharing its eps.
NoiseLevel = float | torch.Tensor


@dataclass(frozen=True)
class Readout:
    """What a head reads from the backbone (0-based block indices, increasing)."""

    pooled: tuple[int, ...] = ()  # image tokens mean-pooled in fp32 (Eq. 3-4): the mean-pool head
    image: tuple[int, ...] = ()  # full image tokens [B, N_img, D]
    text: tuple[int, ...] = ()  # full text tokens [B, N_txt, D]
    temb: bool = False  # the head also reads temb (the FiLM input of the query-attention head)

    @property
    def blocks(self) -> tuple[int, ...]:
        """Every block read, increasing."""
        return tuple(sorted({*self.pooled, *self.image, *self.text}))

    @property
    def depth(self) -> int:
        """Blocks the backbone runs: up to the deepest block read."""
        return self.blocks[-1] + 1


@dataclass
class BackboneOutputs:
    """One forward's readout (see `Readout`); token lists follow the readout's block order."""

    pooled: torch.Tensor | None  # [B, n_pooled, D] float32
    image: list[torch.Tensor]  # each [B, N_img, D], engine dtype
    text: list[torch.Tensor]  # each [B, N_txt, D]
    temb: torch.Tensor | None  # [B, D]


def check_outputs_finite(outputs: BackboneOutputs, latents: torch.Tensor, modulation: torch.Tensor) -> None:
    """ValueError when a forward of finite inputs overflowed (its pooled features, or the deepest image tokens read)."""
    checked = {"features": outputs.pooled} if outputs.pooled is not None else {"tokens": outputs.image[-1]}
    if first_nonfinite(checked) is not None:
        raise ValueError(
            f"the {next(iter(checked))} overflowed to NaN/Inf although latents and prompt embeddings are finite: an "
            f"input is too large for {modulation.dtype} (largest |latent| {float(latents.abs().max()):.3g}, largest "
            f"adaLN |modulation| {float(modulation.abs().max()):.3g}); check the latents' and prompts' scale"
        )


class MMDiTReward(nn.Module):
    """Blocks 0..depth-1 of an SD3/SD3.5 MMDiT, returning what `readout` asks for (a tuple of block indices: their
    mean-pooled image features)."""

    def __init__(self, cfg: BackboneConfig, readout: Readout | tuple[int, ...]):
        super().__init__()
        readout = readout if isinstance(readout, Readout) else Readout(pooled=tuple(readout))
        self.cfg, self.readout = cfg, readout
        self.schedule = TimeSchedule()  # the time convention of the reward it serves (set by the engine)
        self.merged_adapter: str | None = None  # a LoRA merged into the weights at load (what it was)
        depth = readout.depth
        self.pos_embed = PatchEmbed(cfg)
        self.time_text_embed = TimeTextEmbed(cfg.hidden_size, cfg.pooled_projection_dim)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, cfg.hidden_size)
        deepest = depth - 1 if depth - 1 not in readout.text else None  # its text stream ends at attention
        self.transformer_blocks = nn.ModuleList(JointBlock(cfg, i, deepest=i == deepest) for i in range(depth))
        # Recompute each block in backward instead of storing its activations (reward backprop, full fine-tuning).
        self.gradient_checkpointing = False

    @property
    def layers(self) -> tuple[int, ...]:
        """The mean-pooled blocks (Eq. 3-4)."""
        return self.readout.pooled

    @property
    def modulation_sizes(self) -> list[int]:
        """Vectors per block in `Conditioning.modulation` (packed block after block)."""
        return [block.num_modulation_vectors for block in self.transformer_blocks]

    def adaln_on_host(self) -> int:
        """Every block's adaLN linears to (pinned) host memory (see `AdaLN`); returns the bytes freed on the device."""
        return sum(m.on_host() for m in self.modules() if isinstance(m, AdaLN))

    def embed_prompt(self, prompt_embeds: torch.Tensor, pooled: torch.Tensor, t: float):
        """(context [P, L, D] = context_embedder(prompt_embeds), temb [P, D] = temb(1000 t, pooled))."""
        return self.context_embedder(prompt_embeds), self.embed_time(pooled, t)

    def embed_time(self, pooled: torch.Tensor, t: float) -> torch.Tensor:
        """temb [P, D] = MLP_t(sinusoid(timestep)) + MLP_y(pooled) at noise level (sigma) t; the timestep is the
        schedule's (`engine.schedule`: 1000 t for DiT-Reward checkpoints)."""
        timestep = self.schedule.timestep(t)
        timesteps = torch.full((pooled.shape[0],), timestep, dtype=torch.float32, device=pooled.device)
        return self.time_text_embed(timesteps, pooled)

    def modulation(self, temb: torch.Tensor) -> torch.Tensor:
        """Every block's adaLN vectors Linear(SiLU(temb)), packed block after block: [P, M, D]."""
        return torch.cat([block.modulation(temb) for block in self.transformer_blocks], dim=1)

    def condition(self, prompt_embeds: torch.Tensor, pooled: torch.Tensor, t: float) -> Conditioning:
        """The prompt-only work (projected text tokens) and the (prompt, t) work: temb and every block's modulation.
        More noise levels of the same prompts: `Conditioning.at(t, self.embed_level)`."""
        context, temb = self.embed_prompt(prompt_embeds, pooled, t)
        return Conditioning(context=context, modulation=self.modulation(temb), t=t, temb=temb, pooled=pooled)

    def embed_level(self, pooled: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(modulation [P, M, D], temb [P, D]) of `pooled`'s prompts at noise level t."""
        temb = self.embed_time(pooled, t)
        return self.modulation(temb), temb

    def level_maker(self, grad: bool, finite: bool) -> MakeLevel:
        """What a Conditioning calls to make its prompts' (modulation, temb) at a new noise level: `embed_level` with
        autograd as `grad` says, checked finite (one sync) when `finite`."""

        def make(pooled: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.enable_grad() if grad else torch.no_grad():
                modulation, temb = self.embed_level(pooled, t)
            if finite:
                check_finite({"Conditioning.modulation": modulation, "Conditioning.temb": temb})
            return modulation, temb

        return make

    @staticmethod
    def noised(
        z0: torch.Tensor, t: NoiseLevel, views: int, ops: Ops, noise: torch.Tensor | None, seed: int | None, offset: int
    ) -> torch.Tensor:
        """Eq. 1 for each row of the forward: z0 [B, C, H, W] -> z_t [R, C, H, W]. R = K B (`views` K > 1, an
        ensemble): each latent at K levels, view-major, the K views sharing the latent's eps (fresh noise: one seed
        for all). `t`: a float, or float32 [R] on z0's device (each row's own level)."""
        if not isinstance(t, torch.Tensor):
            z_t = ops.near_clean(z0, t, noise=noise, seed=seed, image_offset=offset)
            return z_t if views == 1 else z_t.repeat(views, 1, 1, 1)
        if views == 1:  # one launch, each image at its own level
            return ops.near_clean(z0, t, noise=noise, seed=seed, image_offset=offset)
        if noise is None and seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        levels = t.view(views, -1)  # one launch per view, the same eps (noise or seed) for every view
        return torch.cat([ops.near_clean(z0, level, noise=noise, seed=seed, image_offset=offset) for level in levels])

    def forward(
        self,
        z0: torch.Tensor,
        context: torch.Tensor,
        modulation: torch.Tensor,
        t: NoiseLevel,
        backends: Backends,
        noise: torch.Tensor | None = None,
        seed: int | None = None,
        image_offset: int = 0,
        *,
        add_noise: bool = True,
        temb: torch.Tensor | None = None,
    ) -> BackboneOutputs:
        """z0 [B, C, H, W] transformer-space latents, context [R, L, D], noise level t -> `BackboneOutputs` (R = B, or
        K B for the K levels of an ensemble).

        `modulation`: every block's adaLN vectors packed [R, M, D] (`Conditioning.modulation`), with `temb` [R, D] when
        the head reads it, or temb [R, D] itself, from which each block computes its own inside its forward
        (training). Noise: explicit [B, C, H, W], or `seed` and `image_offset` (image b uses stream b +
        image_offset), or neither (fresh). `add_noise=False`: z0 already is z_t (a sampler's state at t)."""
        ops = Ops.for_forward(backends)  # the one decision on autograd, for the whole forward
        views = context.shape[0] // z0.shape[0] if z0.shape[0] else 1  # (an empty batch: an idle FSDP rank)
        z_t = self.noised(z0, t, views, ops, noise, seed, image_offset) if add_noise else z0  # Eq. 1
        x, c = self.pos_embed(z_t.to(self.pos_embed.proj.weight.dtype)), context  # [R, N_img, D], [R, L, D]
        if modulation.ndim == 3:
            per_block = modulation.split(self.modulation_sizes, 1)
        else:
            per_block = [modulation] * len(self.transformer_blocks)
            temb = modulation
        read = self.readout
        checkpointed = self.gradient_checkpointing and ops.differentiable
        features = None
        if read.pooled and not ops.differentiable:  # fp32 accumulation (fp64 for an fp64 model: gradient checks)
            features = x.new_empty(x.shape[0], len(read.pooled), x.shape[-1], dtype=accumulation_dtype(x.dtype))
        pooled, image, text = [], [], []
        for index, (block, emb) in enumerate(zip(self.transformer_blocks, per_block, strict=True)):
            if checkpointed:  # recomputed in backward with the same `ops`: the engine's own backends
                x, c = checkpoint(block, x, c, emb, ops, use_reentrant=False)
            else:
                x, c = block(x, c, emb, ops)  # Eq. 2
            if index in read.pooled:
                if features is None:  # differentiable: small [R, D] vectors, stacked below
                    pooled.append(ops.mean_pool(x))
                else:  # Eq. 3-4 written straight into the feature buffer
                    ops.mean_pool_into(x, features, read.pooled.index(index))
            if index in read.image:
                image.append(x)
            if index in read.text:
                text.append(c)
        if pooled:
            features = torch.stack(pooled, dim=1)
        return BackboneOutputs(pooled=features, image=image, text=text, temb=temb)


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
