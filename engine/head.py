"""The reward head (DESIGN.md Eq. 5): pooled multi-layer features -> a reward per image (or, for HPSv3's uncertainty
head, the reward's mean and log-std)."""

from __future__ import annotations

import torch
from torch import nn

from kernels.backend import accumulation_dtype


class RewardHead(nn.Module):
    """MLP over concat_l p_l: Linear -> GELU -> ... -> Linear(., outputs). Runs in fp32 (about 10M parameters for
    SD3.5-Large's 4 x 2432 features: negligible next to the backbone, and the features arrive in fp32).

    `outputs=1`: a point reward (Bradley-Terry). `outputs=2`: HPSv3's uncertainty head, the reward's mean and the
    log of its standard deviation."""

    def __init__(self, n_layers: int, dim: int, hidden: tuple[int, ...] = (1024, 256), outputs: int = 1):
        super().__init__()
        if outputs not in (1, 2):
            raise ValueError(f"head outputs must be 1 (reward) or 2 (mean, log-std), got {outputs!r}")
        sizes = (n_layers * dim, *hidden)
        layers: list[nn.Module] = []
        for d_in, d_out in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(d_in, d_out), nn.GELU()]
        layers.append(nn.Linear(sizes[-1], outputs))
        self.mlp = nn.Sequential(*layers)
        self.n_layers, self.dim, self.outputs = n_layers, dim, outputs

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, n_layers, D] float32 -> [B, outputs] float32: the reward, or (mean, log-std)."""
        if features.shape[1:] != (self.n_layers, self.dim):
            raise ValueError(f"head expects features [B, {self.n_layers}, {self.dim}], got {list(features.shape)}")
        out = self.mlp(features.flatten(1).to(self.mlp[0].weight.dtype))
        return out.to(accumulation_dtype(out.dtype))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, n_layers, D] float32 -> reward [B] float32 (the mean, for an uncertainty head)."""
        return self.predict(features)[:, 0]
