"""The one head interface: what a head reads from the backbone (its `Readout`) and `predict(outputs)`."""

from __future__ import annotations

import torch
from torch import nn

from engine.model.mmdit import BackboneOutputs, Readout


class RewardHead(nn.Module):
    """A reward head (DESIGN.md Eq. 5). Runs in fp32 (fp64 for an fp64 backbone: gradient checks), whatever the
    backbone's dtype: its inputs are cast on entry.

    `readout`: the backbone outputs it reads (the backbone is built from it). `outputs`: 1 (a point reward) or 2
    (HPSv3's uncertainty head: the reward's mean and the log of its standard deviation)."""

    readout: Readout
    outputs: int

    def predict(self, outputs: BackboneOutputs, views: int = 1) -> torch.Tensor:
        """The backbone's outputs for R = K B rows (`views` K: the ensemble of K noise levels, rows view-major) ->
        [B, outputs] in the head's dtype."""
        raise NotImplementedError

    def forward(self, outputs: BackboneOutputs, views: int = 1) -> torch.Tensor:
        """The reward [B] (the mean, for an uncertainty head)."""
        return self.predict(outputs, views)[:, 0]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype
