"""The reward head (DESIGN.md Eq. 5): pooled multi-layer features -> one scalar per image."""

from __future__ import annotations

import torch
from torch import nn

from kernels.backend import accumulation_dtype


class RewardHead(nn.Module):
    """MLP over concat_l p_l: Linear -> GELU -> ... -> Linear(., 1). Runs in fp32 (about 10M parameters for
    SD3.5-Large's 4 x 2432 features: negligible next to the backbone, and the features arrive in fp32)."""

    def __init__(self, n_layers: int, dim: int, hidden: tuple[int, ...] = (1024, 256)):
        super().__init__()
        sizes = (n_layers * dim, *hidden)
        layers: list[nn.Module] = []
        for d_in, d_out in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(d_in, d_out), nn.GELU()]
        layers.append(nn.Linear(sizes[-1], 1))
        self.mlp = nn.Sequential(*layers)
        self.n_layers, self.dim = n_layers, dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, n_layers, D] float32 -> reward [B] float32."""
        if features.shape[1:] != (self.n_layers, self.dim):
            raise ValueError(f"head expects features [B, {self.n_layers}, {self.dim}], got {list(features.shape)}")
        reward = self.mlp(features.flatten(1).to(self.mlp[0].weight.dtype)).squeeze(-1)
        return reward.to(accumulation_dtype(reward.dtype))
