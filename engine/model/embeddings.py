"""The inputs of the MMDiT: the timestep/pooled-text embedding (temb) and the patchified latent with its 2-D
positions. Parameter names equal diffusers' `SD3Transformer2DModel`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import BackboneConfig


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
