"""DiT-Reward's head (DESIGN.md Eq. 5): image tokens of chosen blocks mean-pooled -> an MLP -> a reward per image
(or, for HPSv3's uncertainty head, the reward's mean and log-std)."""

from __future__ import annotations

import torch
from torch import nn

from engine.heads.base import RewardHead
from engine.model.mmdit import BackboneOutputs, Readout
from kernels.backend import accumulation_dtype


class MeanPoolHead(RewardHead):
    """MLP over concat_l p_l: Linear -> GELU -> ... -> Linear(., outputs). Runs in fp32 (about 10M parameters for
    SD3.5-Large's 4 x 2432 features: negligible next to the backbone, and the features arrive in fp32).

    `layers`: the pooled blocks (0-based). `outputs=1`: a point reward (Bradley-Terry). `outputs=2`: HPSv3's
    uncertainty head, the reward's mean and the log of its standard deviation. An ensemble over K noise levels
    averages the K predictions."""

    def __init__(self, layers: tuple[int, ...], dim: int, hidden: tuple[int, ...] = (1024, 256), outputs: int = 1):
        super().__init__()
        if outputs not in (1, 2):
            raise ValueError(f"head outputs must be 1 (reward) or 2 (mean, log-std), got {outputs!r}")
        self.readout = Readout(pooled=tuple(layers))
        sizes = (len(layers) * dim, *hidden)
        mlp: list[nn.Module] = []
        for d_in, d_out in zip(sizes[:-1], sizes[1:], strict=True):
            mlp += [nn.Linear(d_in, d_out), nn.GELU()]
        mlp.append(nn.Linear(sizes[-1], outputs))
        self.mlp = nn.Sequential(*mlp)
        self.n_layers, self.dim, self.outputs = len(layers), dim, outputs

    def predict(self, outputs: BackboneOutputs | torch.Tensor, views: int = 1) -> torch.Tensor:
        """The backbone's outputs, or their pooled features [R, n_layers, D] float32 (what the trainer caches) ->
        [B, outputs] float32: the reward, or (mean, log-std); R = `views` B, the mean over the K views."""
        features = outputs.pooled if isinstance(outputs, BackboneOutputs) else outputs
        if features is None or features.shape[1:] != (self.n_layers, self.dim):
            shape = None if features is None else list(features.shape)
            raise ValueError(f"head expects features [B, {self.n_layers}, {self.dim}], got {shape}")
        out = self.mlp(features.flatten(1).to(self.mlp[0].weight.dtype))
        out = out.to(accumulation_dtype(out.dtype))
        return out if views == 1 else out.view(views, -1, self.outputs).mean(0)
