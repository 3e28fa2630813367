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
per prompt (a `Conditioning`), and `forward()` reuses them for every latent scored against that prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine import ops
from engine.attention import attention
from engine.config import BackboneConfig
from kernels.backend import accumulation_dtype

# ---------------------------------------------------------------------------------------------------------- embeds


def timestep_embedding(timesteps: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding in [cos | sin] order, as diffusers `Timesteps(flip_sin_to_cos=True)`. [B] -> [B, dim]"""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    angles = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear (diffusers `TimestepEmbedding` / `PixArtAlphaTextProjection`)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    """temb = MLP_t(sinusoid(1000 t)) + MLP_y(pooled)."""

    def __init__(self, dim: int, pooled_dim: int):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim)
        self.text_embedder = MLPEmbedder(pooled_dim, dim)

    def forward(self, timesteps: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return self.timestep_embedder(timestep_embedding(timesteps).to(pooled.dtype)) + self.text_embedder(pooled)


class PatchEmbed(nn.Module):
    """Patchify conv + the centre crop of SD3's fixed 2-D sincos table (`pos_embed_max_size`² positions)."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.patch_size, self.max_size = cfg.patch_size, cfg.pos_embed_max_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.register_buffer("pos_embed", torch.empty(1, cfg.pos_embed_max_size**2, cfg.hidden_size))

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, H/p * W/p, D]
        h, w = z.shape[-2] // self.patch_size, z.shape[-1] // self.patch_size
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
        table = self.pos_embed.view(self.max_size, self.max_size, -1)[top : top + h, left : left + w]
        x = self.proj(z).flatten(2).transpose(1, 2)
        return (x + table.reshape(1, h * w, -1)).to(x.dtype).contiguous()


# ----------------------------------------------------------------------------------------------------- modulation


@dataclass
class Modulation:
    """One adaLN output: `x * (1 + scale) + shift`, and the gate of the residual it feeds. Each [B, D]."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor | None = None


@dataclass
class Conditioning:
    """Everything that depends on the prompt alone (t fixed): projected text tokens and every block's adaLN vectors.

    Built by `MMDiTReward.condition`; leading dimension P = number of prompts. `select(index)` maps it onto a batch of
    latents (one prompt serving a GRPO group): two gathers, whatever the depth, because the vectors are packed."""

    context: torch.Tensor  # [P, L, D] context_embedder(prompt_embeds)
    modulation: torch.Tensor  # [P, M, D] all blocks' (shift, scale, gate) vectors, block after block
    t: float
    # Who made it: (the engine's identity token, the version of its prompt-path weights then). None for one built
    # by hand, which the engine accepts after checking it is finite; a Conditioning from another engine, or from
    # this one before its weights changed, is refused (same shapes, different numbers).
    origin: tuple[object, int] | None = None

    @property
    def num_prompts(self) -> int:
        return self.context.shape[0]

    def check_finite(self) -> None:
        """ValueError if any vector is NaN/Inf (one device sync). Not run on construction: CUDA graph capture builds
        Conditionings of static buffers, where a sync is not allowed."""
        for name, x in (("context", self.context), ("modulation", self.modulation)):
            if not bool(torch.isfinite(x).all()):
                raise ValueError(
                    f"Conditioning.{name} contains NaN or Inf values: made by hand with them, or the prompt "
                    "embeddings overflowed the prompt path (check prompt_embeds/pooled for huge values)"
                )

    def select(self, index: torch.Tensor) -> Conditioning:
        return replace(
            self, context=self.context.index_select(0, index), modulation=self.modulation.index_select(0, index)
        )


# ------------------------------------------------------------------------------------------------------ attention


class RMSNorm(nn.Module):
    """The qk-norm weight [head_dim] (diffusers `RMSNorm`, eps 1e-6); applied by `ops.joint_qkv`."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


# diffusers stores q, k, v projections separately; we run each stream's as one GEMM (fused by a load hook, split
# back by `diffusers_state_dict` when saving).
_FUSED = {
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
        self.heads, self.backend = cfg.num_attention_heads, "sdpa"
        self.text_queries = joint and text_queries
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.norm_q = RMSNorm(cfg.attention_head_dim) if qk_norm else None
        self.norm_k = RMSNorm(cfg.attention_head_dim) if qk_norm else None
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.context = None
        if joint:
            self.context = "add_qkv" if text_queries else "add_kv"
            setattr(self, self.context, nn.Linear(dim, (3 if text_queries else 2) * dim))
            self.norm_added_k = RMSNorm(cfg.attention_head_dim) if qk_norm else None
            if text_queries:
                self.to_add_out = nn.Linear(dim, dim)
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

    def forward(self, x, c=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        # x [B, N_img, D], c [B, N_txt, D] (or their FP8 quantisations, made by the adaLN op that produced them)
        img = self.to_qkv(x)  # [B, N_img, 3D]
        txt = None if c is None else self.context_projection(c)
        q, k, v = ops.joint_qkv(img, txt, self.heads, self._norm_weights())  # [B, N, H, hd]
        out = attention(q, k, v, self.backend).flatten(2)  # [B, Nq, D]
        n_img = img.shape[1]
        x_out = self.to_out[0](out[:, :n_img])
        c_out = self.to_add_out(out[:, n_img:]) if self.text_queries and c is not None else None
        return x_out, c_out


def _fuse_projection_keys(module: Attention, state: dict, prefix: str, *args) -> None:
    """Load hook: diffusers' separate q/k/v keys -> one fused projection (concatenated along the output dim)."""
    for fused in ("to_qkv", module.context):
        if fused is None:
            continue
        for leaf in ("weight", "bias"):
            parts = [f"{prefix}{name}.{leaf}" for name in _FUSED[fused]]
            if all(p in state for p in parts):
                state[f"{prefix}{fused}.{leaf}"] = torch.cat([state.pop(p) for p in parts], dim=0)


def diffusers_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` under diffusers' names: fused projections split back into q/k/v (views, no copies)."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if not isinstance(module, Attention):
            continue
        for fused in ("to_qkv", module.context):
            for leaf in ("weight", "bias") if fused else ():
                tensor = state.pop(f"{name}.{fused}.{leaf}")
                for part_name, part in zip(_FUSED[fused], tensor.chunk(len(_FUSED[fused])), strict=True):
                    state[f"{name}.{part_name}.{leaf}"] = part
    return state


class GELUProjection(nn.Module):
    """Holds the FFN's first linear as `proj` (diffusers' `GELU(approximate="tanh")` module, key `net.0.proj`)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)


class FeedForward(nn.Module):
    """Linear(D, 4D) -> tanh-GELU -> Linear(4D, D); keys `net.0.proj`, `net.2` as in diffusers (net.1 is dropout)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([GELUProjection(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    @property
    def proj_in(self) -> nn.Module:
        return self.net[0].proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](ops.linear_gelu(x, self.proj_in, into=self.net[2]))


class AdaLN(nn.Module):
    """The modulation linear (`norm1.linear`, `norm1_context.linear`): temb -> n_out vectors Linear(SiLU(temb)). The
    norm itself is in `engine.ops`.

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


# ---------------------------------------------------------------------------------------------------------- block


class JointBlock(nn.Module):
    """One MMDiT block (diffusers `JointTransformerBlock`).

    `context_pre_only`: the model's final block, whose text stream has a 2-chunk continuous adaLN and no output.
    `deepest`: the last block the reward runs; only its image stream is updated."""

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

    @property
    def num_modulation_vectors(self) -> int:
        return (9 if self.dual else 6) + (2 if self.deepest else 6)

    def modulation(self, temb: torch.Tensor) -> torch.Tensor:
        """adaLN-Zero vectors Linear(SiLU(temb)) of both streams, [P, n, D]: image (shift, scale, gate) for attn, mlp
        [, attn2], then text (shift, scale[, gate]) for attn [and (shift, scale, gate) for mlp]."""
        x, c = self.norm1(temb), self.norm1_context(temb)
        if self.context_pre_only:  # continuous adaLN stores (scale, shift)
            c = c.flip(1)
        elif self.deepest:  # the deepest block only needs the text stream's pre-attention shift and scale
            c = c[:, :2]
        return torch.cat([x, c], dim=1)

    def _unpack(
        self, m: torch.Tensor
    ) -> tuple[Modulation, Modulation, Modulation | None, Modulation, Modulation | None]:
        # [B, n, D] -> [n, B, D] in one copy (none at B = 1): each vector is then a contiguous [B, D], which the
        # kernels read as it is; a strided m[:, i] would cost each op a copy of its own (12 launches per block)
        m = m.transpose(0, 1).contiguous()

        def mod(i: int, gate: bool = True) -> Modulation:
            return Modulation(m[i], m[i + 1], m[i + 2] if gate else None)

        c = 9 if self.dual else 6
        attn2 = mod(6) if self.dual else None
        if self.deepest:
            return mod(0), mod(3), attn2, mod(c, gate=False), None
        return mod(0), mod(3), attn2, mod(c), mod(c + 3)

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, modulation: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # x [B, N_img, D], c [B, N_txt, D], modulation [B, n, D] from `modulation()`. Each adaLN op is told the linear
        # it feeds (`into`): an FP8 linear gets its input quantised by that op.
        attn, mlp, attn2, c_attn, c_mlp = self._unpack(modulation)
        a, c_a = self.attn(
            ops.layernorm_modulate(x, attn.shift, attn.scale, into=self.attn.to_qkv),
            ops.layernorm_modulate(c, c_attn.shift, c_attn.scale, into=self.attn.context_projection),
        )
        if self.dual:  # SD3.5-M: a second image-only attention on the block input, modulated separately
            a2, _ = self.attn2(ops.layernorm_modulate(x, attn2.shift, attn2.scale, into=self.attn2.to_qkv))
            x = ops.gated_residual(x, a, attn.gate)
            a, gate = a2, attn2.gate
        else:
            gate = attn.gate
        x, x_mlp_in = ops.gated_residual_layernorm_modulate(x, a, gate, mlp.shift, mlp.scale, into=self.ff.proj_in)
        x = ops.gated_residual(x, self.ff(x_mlp_in), mlp.gate)
        if self.deepest:
            return x, None
        c, c_mlp_in = ops.gated_residual_layernorm_modulate(
            c, c_a, c_attn.gate, c_mlp.shift, c_mlp.scale, into=self.ff_context.proj_in
        )
        return x, ops.gated_residual(c, self.ff_context(c_mlp_in), c_mlp.gate)


# ---------------------------------------------------------------------------------------------------------- model


def _run_block(block: JointBlock, backend: str, x, c, modulation):
    """A block call that re-enters the kernel backend: checkpoint recomputation runs outside `ops.use`."""
    with ops.use(backend):
        return block(x, c, modulation)


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

    def set_attention_backend(self, backend: str) -> None:
        for m in self.modules():
            if isinstance(m, Attention):
                m.backend = backend

    def condition(self, prompt_embeds: torch.Tensor, pooled: torch.Tensor, t: float) -> Conditioning:
        """Prompt-only work: temb(1000 t, pooled), every block's modulation, projected text tokens."""
        timesteps = torch.full((pooled.shape[0],), 1000.0 * t, dtype=torch.float32, device=pooled.device)
        temb = self.time_text_embed(timesteps, pooled)  # [P, D]
        modulation = torch.cat([block.modulation(temb) for block in self.transformer_blocks], dim=1)
        return Conditioning(context=self.context_embedder(prompt_embeds), modulation=modulation, t=t)

    def forward(
        self,
        z0: torch.Tensor,
        cond: Conditioning,
        noise: torch.Tensor | None = None,
        seed: int | None = None,
        image_offset: int = 0,
    ) -> torch.Tensor:
        """z0 [B, C, H, W] transformer-space latents, `cond` for the same B -> features [B, n_layers, D] float32."""
        z_t = ops.near_clean(z0, cond.t, noise=noise, seed=seed, image_offset=image_offset)  # Eq. 1
        x, c = self.pos_embed(z_t.to(self.pos_embed.proj.weight.dtype)), cond.context
        # fp32 accumulation (fp64 for an fp64 model: gradient checks)
        features = x.new_empty(x.shape[0], len(self.layers), x.shape[-1], dtype=accumulation_dtype(x.dtype))
        pooled = []
        for index, (block, mod) in enumerate(
            zip(self.transformer_blocks, cond.modulation.split(self.modulation_sizes, 1), strict=True)
        ):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, c = checkpoint(_run_block, block, ops.current(), x, c, mod, use_reentrant=False)
            else:
                x, c = block(x, c, mod)  # Eq. 2
            if index in self.layers:
                if torch.is_grad_enabled():  # autograd path: small [B, D] vectors, stacked below
                    pooled.append(ops.mean_pool(x))
                else:  # Eq. 3-4 written straight into the feature buffer
                    ops.mean_pool_into(x, features, self.layers.index(index))
        return torch.stack(pooled, dim=1) if pooled else features
