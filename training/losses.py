"""Preference losses on pairs of rewards (DESIGN.md Eq. 6 and HPSv3's variants).

Every loss takes the rewards of the preferred image (`w`, HPSv3's path1) and the other one (`l`) for a batch of
pairs and returns the mean over pairs, in fp32:

- ``bt``: Bradley-Terry, -log sigmoid(r_w - r_l) (Eq. 6).
- ``uncertainty``: the head predicts a mean and a log-std per image; the reward margin is a Gaussian
  z ~ N(mu_w - mu_l, sigma_w^2 + sigma_l^2) and the loss is -E[log sigmoid(z)]. HPSv3 estimates the expectation with
  1000 fresh random samples per pair; here it is a deterministic quadrature (a resumed run computes the same loss),
  within 1e-9 of the exact expectation at every std (`expected_softplus`), and finite for every log-std a head can
  output (`LOG_STD_MAX`).
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


# The uncertainty loss's expectation, E[softplus(-Z)] with Z ~ N(m, s^2), by one of two rules chosen per pair:
# - s <= _NARROW: Gauss-Hermite with _NODES nodes. softplus is analytic in the strip |Im z| < pi, so the rule's error
#   falls like exp(-2 pi sqrt(2 n) / s): 2e-10 at s = 1.5, but 5.6e-3 at s = 8 (hence the second rule).
# - s > _NARROW: softplus(-z) = A(z) + r(z), with A the ramp max(-z, 0) smoothed by a Gaussian of std _SMOOTHING, whose
#   expectation under N(m, s^2) is the closed form `_smoothed_ramp(m, sqrt(s^2 + c^2))`, and r a smooth remainder that
#   decays like exp(-|z|); E[r(Z)] is a trapezoid sum on a fixed grid over z in [-40, 40], where the density is smooth
#   (s > 1.5), with an error far below float64 rounding.
# Against mpmath at 30 digits the result is within 1e-9 of the exact value at every std from 0 to the largest the cap
# below allows (e^10 sqrt 2 ~ 31,000): the worst error, 1.8e-10, is at s = 1.5 (tests/test_losses.py, std 0.01-31,000).
_NODES = 32
_NARROW = 1.5
_SMOOTHING = math.pi / math.sqrt(3)  # the logistic distribution's std: A then follows softplus closely, r stays small
_GRID_STEP, _GRID_HALF_WIDTH = 0.5, 40.0
# An image's log-std above this counts as this: e^10 ~ 22,000 reward units says only "no idea" (the loss is then
# linear in the std, its gradient pushing the std down), and any larger value would overflow. So the loss and its
# gradient are finite for every log-std a head can output, +-3.4e38 included.
LOG_STD_MAX = 10.0


@functools.lru_cache(maxsize=1)
def _rules() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Gauss-Hermite nodes and weights (E[f(X)] = sum_i w_i f(x_i), X ~ N(0, 1)), the remainder grid z_j and r(z_j),
    computed once, read-only."""
    x, w = np.polynomial.hermite_e.hermegauss(_NODES)
    w = w / w.sum()  # the weight function exp(-x^2/2) integrates to sqrt(2 pi)
    z = torch.arange(-_GRID_HALF_WIDTH, _GRID_HALF_WIDTH + _GRID_STEP / 2, _GRID_STEP, dtype=torch.float64)
    remainder = (F.softplus(-z) - _smoothed_ramp(z, torch.tensor(_SMOOTHING, dtype=torch.float64))).numpy()
    rules = (x, w, z.numpy(), remainder)
    for a in rules:
        a.flags.writeable = False
    return rules


def _smoothed_ramp(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """E[max(-W, 0)] for W ~ N(m, s^2), s > 0: s phi(m / s) - m Phi(-m / s)."""
    u = m / s
    return s * torch.exp(-0.5 * u * u) / math.sqrt(2 * math.pi) - m * 0.5 * torch.erfc(u / math.sqrt(2))


def expected_softplus(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """E[softplus(-Z)] = -E[log sigmoid(Z)] for Z ~ N(m, s^2), elementwise; m, s float64 tensors, s >= 0 finite."""
    x, w, z, remainder = (torch.tensor(a, dtype=torch.float64, device=m.device) for a in _rules())
    narrow = (F.softplus(-(m.unsqueeze(-1) + s.unsqueeze(-1) * x)) * w).sum(-1)
    wide_s = s.clamp_min(_NARROW)  # the rule of the other branch must stay finite too: where() passes its gradient
    density = torch.exp(-0.5 * ((z - m.unsqueeze(-1)) / wide_s.unsqueeze(-1)) ** 2) / (
        wide_s.unsqueeze(-1) * math.sqrt(2 * math.pi)
    )
    wide = _smoothed_ramp(m, torch.sqrt(wide_s**2 + _SMOOTHING**2)) + (remainder * density).sum(-1) * _GRID_STEP
    return torch.where(s <= _NARROW, narrow, wide)


def uncertainty_loss(
    mu_w: torch.Tensor, log_std_w: torch.Tensor, mu_l: torch.Tensor, log_std_l: torch.Tensor
) -> torch.Tensor:
    """HPSv3's uncertainty loss: mean over pairs of -E[log sigmoid(z)], z ~ N(mu_w - mu_l, exp(2 log_std_w) +
    exp(2 log_std_l)); all inputs [B]. Each log-std is read as at most `LOG_STD_MAX`. Computed in float64 to within
    1e-9 of the exact expectation (see `expected_softplus`), returned in mu_w's dtype."""
    mean = mu_w.double() - mu_l.double()  # [B]
    log_std = 0.5 * torch.logaddexp(
        2 * log_std_w.double().clamp(max=LOG_STD_MAX), 2 * log_std_l.double().clamp(max=LOG_STD_MAX)
    )
    return expected_softplus(mean, torch.exp(log_std)).mean().to(mu_w.dtype)


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


__all__ = [
    "BTT_K",
    "HEAD_OUTPUTS",
    "LOG_STD_MAX",
    "LOSSES",
    "bt_loss",
    "btt_loss",
    "expected_softplus",
    "tied_mask",
    "uncertainty_loss",
]
