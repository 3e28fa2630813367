"""Preference losses on pairs of rewards (DESIGN.md Eq. 6 and HPSv3's variants).

Every loss takes the rewards of the preferred image (`w`, HPSv3's path1) and the other one (`l`) for a batch of
pairs and returns the mean over pairs, in fp32:

- ``bt``: Bradley-Terry, -log sigmoid(r_w - r_l) (Eq. 6).
- ``uncertainty``: the head predicts a mean and a log-std per image; the reward margin is a Gaussian
  z ~ N(mu_w - mu_l, sigma_w^2 + sigma_l^2) and the loss is -E[log sigmoid(z)]. HPSv3 estimates the expectation with
  1000 fresh random samples per pair; here it is a fixed Gauss-Hermite quadrature, which is deterministic (a resumed
  run computes the same loss) and exact to ~1e-7 at the default 32 nodes for the margins a reward head produces.
- ``btt``: Bradley-Terry with ties (Rao-Kupper, as HPSv3's ``btt``): with k = 5, a decided pair costs
  -log sigmoid(d - log k) and a tie -log sigmoid(d - log k) - log sigmoid(-d - log k) - log(k^2 - 1), d = r_w - r_l.
  A pair is a tie when the annotators' choice distribution is balanced: |c1 - c2| / (c1 + c2) <= tied_threshold.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

LOSSES = ("bt", "uncertainty", "btt")
HEAD_OUTPUTS = {"bt": 1, "btt": 1, "uncertainty": 2}  # per image: reward, or (mean, log-std)
BTT_K = 5.0  # HPSv3's tie strength: P(tie | d = 0) = (k - 1) / (k + 1) = 2/3


def bt_loss(r_w: torch.Tensor, r_l: torch.Tensor) -> torch.Tensor:
    """Eq. 6: mean over pairs of -log sigmoid(r_w - r_l); r_w, r_l [B]."""
    return -F.logsigmoid(r_w - r_l).mean()


@functools.lru_cache(maxsize=8)
def _hermite_rule(nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes x_i and weights w_i with E[f(Z)] = sum_i w_i f(x_i) for Z ~ N(0, 1) (probabilists' Hermite), read-only:
    computed once per node count, not once per loss."""
    x, w = np.polynomial.hermite_e.hermegauss(nodes)
    w = w / w.sum()  # the weight function exp(-x^2/2) integrates to sqrt(2 pi)
    x.flags.writeable = w.flags.writeable = False
    return x, w


def _gauss_hermite(nodes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`_hermite_rule` as float64 tensors on `device`."""
    x, w = _hermite_rule(nodes)
    return torch.tensor(x, dtype=torch.float64, device=device), torch.tensor(w, dtype=torch.float64, device=device)


def uncertainty_loss(
    mu_w: torch.Tensor, log_std_w: torch.Tensor, mu_l: torch.Tensor, log_std_l: torch.Tensor, nodes: int = 32
) -> torch.Tensor:
    """HPSv3's uncertainty loss: mean over pairs of -E[log sigmoid(z)], z ~ N(mu_w - mu_l, exp(2 log_std_w) +
    exp(2 log_std_l)); all inputs [B]. The expectation is a `nodes`-point Gauss-Hermite quadrature."""
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes}")
    mean = mu_w - mu_l  # [B]
    std = torch.sqrt(torch.exp(2 * log_std_w) + torch.exp(2 * log_std_l))  # [B]
    x, w = _gauss_hermite(nodes, mean.device)
    z = mean.unsqueeze(-1) + std.unsqueeze(-1) * x.to(mean.dtype)  # [B, nodes]
    return -(F.logsigmoid(z) * w.to(mean.dtype)).sum(-1).mean()


def tied_mask(choice_dist: torch.Tensor, tied_threshold: float) -> torch.Tensor:
    """choice_dist [B, 2] (votes or shares for image 1 and 2) -> [B] bool, True where the pair is a tie:
    |c1 - c2| / (c1 + c2) <= tied_threshold."""
    if choice_dist.ndim != 2 or choice_dist.shape[1] != 2:
        raise ValueError(f"choice_dist must be [B, 2], got {list(choice_dist.shape)}")
    total = choice_dist.sum(-1)
    if not bool((total > 0).all()):
        raise ValueError("every choice_dist row needs a positive total (votes for image 1 + image 2)")
    return (choice_dist[:, 0] - choice_dist[:, 1]).abs() / total <= tied_threshold


def btt_loss(r_w: torch.Tensor, r_l: torch.Tensor, tie: torch.Tensor, k: float = BTT_K) -> torch.Tensor:
    """Bradley-Terry with ties (Rao-Kupper): r_w, r_l [B]; tie [B] bool. Mean over pairs."""
    if k <= 1:
        raise ValueError(f"k must be > 1 (k = 1 gives ties no probability), got {k}")
    d = r_w - r_l
    log_k = math.log(k)
    decided = -F.logsigmoid(d - log_k)
    tied = decided - F.logsigmoid(-d - log_k) - math.log(k * k - 1)
    return torch.where(tie, tied, decided).mean()


__all__ = ["BTT_K", "HEAD_OUTPUTS", "LOSSES", "bt_loss", "btt_loss", "tied_mask", "uncertainty_loss"]
