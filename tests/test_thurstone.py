"""DiNa-LRM's Thurstone losses against a scalar reference written from their formula with math.erf, and their
gradients against finite differences."""

from __future__ import annotations

import math

import pytest
import torch

from training.losses import HEAD_OUTPUTS, LOSSES, thurstone_loss
from training.train import preference_loss


def reference(d: float, sigma: float, nll: bool) -> float:
    """One pair: v = 2 sigma^2 + 0.05, z = d / sqrt(v + v + 1e-6), p = Phi(z) = (1 + erf(z / sqrt 2)) / 2; fidelity
    1 - sqrt(p + 1e-6), NLL -log(p + 1e-6)."""
    v = 2 * sigma * sigma + 0.05
    p = 0.5 * (1 + math.erf(d / math.sqrt(v + v + 1e-6) / math.sqrt(2)))
    return -math.log(p + 1e-6) if nll else 1 - math.sqrt(p + 1e-6)


@pytest.mark.parametrize("nll", [False, True])
def test_thurstone_equals_the_scalar_reference(nll: bool) -> None:
    g = torch.Generator().manual_seed(0)
    n = 257  # margins from -12 to 12: deep in both tails, where p + 1e-6 takes over
    r_w, r_l = torch.randn(n, generator=g, dtype=torch.float64) * 4, torch.randn(n, generator=g, dtype=torch.float64)
    sigma = torch.rand(n, generator=g, dtype=torch.float64)
    d, s = (r_w - r_l).tolist(), sigma.tolist()
    expected = sum(reference(a, b, nll) for a, b in zip(d, s, strict=True)) / n
    assert thurstone_loss(r_w, r_l, sigma, nll=nll).item() == pytest.approx(expected, rel=1e-12, abs=1e-14)
    # fp32, as the trainer computes it
    got = thurstone_loss(r_w.float(), r_l.float(), sigma.float(), nll=nll).item()
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # the noise level matters: the same margins at sigma 0 and 0.9 differ
    assert thurstone_loss(r_w, r_l, sigma * 0, nll=nll) != thurstone_loss(r_w, r_l, sigma * 0 + 0.9, nll=nll)


@pytest.mark.parametrize("nll", [False, True])
def test_thurstone_gradients_equal_finite_differences(nll: bool) -> None:
    g = torch.Generator().manual_seed(1)
    r_w = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    r_l = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    sigma = (torch.rand(7, generator=g, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, s: thurstone_loss(a, b, s, nll=nll), (r_w, r_l, sigma))
    # and d loss / d r_w against the scalar reference's central difference
    d, s, h = 0.3, 0.4, 1e-6
    numeric = (reference(d + h, s, nll) - reference(d - h, s, nll)) / (2 * h)
    x = torch.tensor([d], dtype=torch.float64, requires_grad=True)
    thurstone_loss(x, torch.zeros(1, dtype=torch.float64), torch.tensor([s], dtype=torch.float64), nll=nll).backward()
    assert x.grad.item() == pytest.approx(numeric, rel=1e-6)
    assert x.grad.item() < 0  # a larger margin for the preferred image lowers the loss


def test_the_trainer_routes_thurstone_with_each_pairs_sigma() -> None:
    assert {"thurstone", "thurstone_nll"} <= set(LOSSES) and HEAD_OUTPUTS["thurstone"] == 1
    w, lo = torch.randn(5, 1), torch.randn(5, 1)
    ties, sigma = torch.zeros(5, dtype=torch.bool), torch.rand(5)
    for name, nll in (("thurstone", False), ("thurstone_nll", True)):
        got = preference_loss(name, w, lo, ties, sigma)
        torch.testing.assert_close(got, thurstone_loss(w[:, 0], lo[:, 0], sigma, nll=nll))
    with pytest.raises(ValueError, match="noise level"):
        preference_loss("thurstone", w, lo, ties)
