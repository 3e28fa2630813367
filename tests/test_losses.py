"""Preference losses against hand-computed values and independent numerical references."""

from __future__ import annotations

import math

import pytest
import torch

from training.losses import bt_loss, btt_loss, tied_mask, uncertainty_loss


def test_bt_loss_hand_values():
    r_w, r_l = torch.tensor([1.0, 0.0, -2.0]), torch.tensor([0.0, 0.0, 1.0])
    expected = (math.log1p(math.exp(-1.0)) + math.log(2.0) + math.log1p(math.exp(3.0))) / 3
    assert float(bt_loss(r_w, r_l)) == pytest.approx(expected, rel=1e-6)


def _uncertainty_by_integration(mean: float, std: float) -> float:
    """-E[log sigmoid(z)], z ~ N(mean, std^2), by the trapezoid rule on a fine float64 grid over +-12 std."""
    z = torch.linspace(mean - 12 * std, mean + 12 * std, 200_001, dtype=torch.float64)
    density = torch.exp(-0.5 * ((z - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
    return float(torch.trapezoid(torch.nn.functional.softplus(-z) * density, z))


@pytest.mark.parametrize(
    ("mu_w", "s_w", "mu_l", "s_l"), [(0.0, 1.0, 0.0, 1.0), (2.0, 0.3, -1.0, 0.7), (-1.5, 2.0, 0.5, 0.1)]
)
def test_uncertainty_loss_matches_numerical_integration(mu_w, s_w, mu_l, s_l):
    loss = uncertainty_loss(
        torch.tensor([mu_w], dtype=torch.float64),
        torch.tensor([math.log(s_w)], dtype=torch.float64),
        torch.tensor([mu_l], dtype=torch.float64),
        torch.tensor([math.log(s_l)], dtype=torch.float64),
    )
    expected = _uncertainty_by_integration(mu_w - mu_l, math.hypot(s_w, s_l))
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_uncertainty_loss_tends_to_bt_as_std_vanishes():
    g = torch.Generator().manual_seed(0)
    mu_w, mu_l = torch.randn(16, generator=g), torch.randn(16, generator=g)
    tiny = torch.full((16,), -20.0)
    assert float(uncertainty_loss(mu_w, tiny, mu_l, tiny)) == pytest.approx(float(bt_loss(mu_w, mu_l)), rel=1e-5)


def test_uncertainty_loss_is_deterministic_and_differentiable():
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(8, generator=g, requires_grad=True) for _ in range(4)]
    first = uncertainty_loss(*params)
    assert torch.equal(first, uncertainty_loss(*params))  # same nodes, same arithmetic: no sampling
    first.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    # more uncertainty about a correctly ordered pair costs more (the margin is less sure)
    mu_w, mu_l = torch.tensor([2.0]), torch.tensor([0.0])
    low, high = torch.tensor([math.log(0.1)]), torch.tensor([math.log(3.0)])
    assert float(uncertainty_loss(mu_w, low, mu_l, low)) < float(uncertainty_loss(mu_w, high, mu_l, high))


def _uncertainty_by_mpmath(mean: float, std: float) -> float:
    """-E[log sigmoid(z)], z ~ N(mean, std^2), by mpmath's adaptive quadrature at 30 digits, split where the
    integrand bends (near 0 and at the mean) and at +-12 std."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(30):
        f = lambda z: mpmath.log1p(mpmath.exp(-z)) * mpmath.npdf(z, mean, std)
        bends = {min(0.0, mean), max(0.0, mean), -40.0, 40.0}  # softplus bends within a few units of 0
        points = sorted({-mpmath.inf, mean - 12 * std, *bends, mean + 12 * std, mpmath.inf})
        return float(mpmath.quad(f, points))


@pytest.mark.parametrize("std", [0.01, 0.1, 0.7, 1.5, 1.6, 3.0, 8.0, 16.0, 31.0, 64.0, 1000.0, 31_000.0])
def test_uncertainty_loss_is_accurate_at_every_std(std: float) -> None:
    """Within 1e-9 of a 30-digit reference at every combined std from 0.01 to 31,000 (the docstring's claim; the cap
    of each log-std allows at most e^10 sqrt 2); the 32-node Gauss-Hermite rule alone errs 5.6e-3 at std 8."""
    means = [-40.0, -6.0, -1.0, 0.0, 0.4, 2.5, 9.0, 50.0]
    log_std = torch.full((len(means),), math.log(std / math.sqrt(2)), dtype=torch.float64)  # two equal stds
    mu_w, mu_l = torch.tensor(means, dtype=torch.float64), torch.zeros(len(means), dtype=torch.float64)
    for i, mean in enumerate(means):
        got = float(uncertainty_loss(mu_w[i : i + 1], log_std[i : i + 1], mu_l[i : i + 1], log_std[i : i + 1]))
        assert abs(got - _uncertainty_by_mpmath(mean, std)) <= 1e-9, (mean, std)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uncertainty_loss_and_gradient_stay_finite_at_any_log_std(dtype: torch.dtype) -> None:
    big = torch.finfo(torch.float32).max
    log_std = torch.tensor([-big, -1e4, -80.0, 0.0, 20.0, 88.0, 1e4, big], dtype=dtype, requires_grad=True)
    mu = torch.linspace(-3, 3, len(log_std), dtype=dtype, requires_grad=True)
    loss = uncertainty_loss(mu, log_std, torch.zeros_like(mu), log_std.flip(0))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(mu.grad).all() and torch.isfinite(log_std.grad).all()
    # above LOG_STD_MAX a log-std counts as LOG_STD_MAX: the loss is that of the cap, not inf
    from training.losses import LOG_STD_MAX

    capped = uncertainty_loss(mu.detach()[:1], torch.tensor([LOG_STD_MAX], dtype=dtype), mu.detach()[:1] * 0,
                              torch.tensor([LOG_STD_MAX], dtype=dtype))  # fmt: skip
    wild = uncertainty_loss(mu.detach()[:1], torch.tensor([1e4], dtype=dtype), mu.detach()[:1] * 0,
                            torch.tensor([big], dtype=dtype))  # fmt: skip
    assert torch.equal(capped, wild)


def test_uncertainty_loss_gradients_match_finite_differences() -> None:
    """Both rules (narrow std: Gauss-Hermite; wide: closed form plus a remainder) give exact gradients."""
    mu_w = torch.tensor([0.3, -2.0, 5.0, 1.0], dtype=torch.float64, requires_grad=True)
    log_std_w = torch.tensor([-1.0, 0.0, 1.5, 3.0], dtype=torch.float64, requires_grad=True)
    mu_l = torch.tensor([0.0, 1.0, -1.0, 0.5], dtype=torch.float64, requires_grad=True)
    log_std_l = torch.tensor([-2.0, 0.2, 1.0, 2.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(uncertainty_loss, (mu_w, log_std_w, mu_l, log_std_l))


def test_btt_hand_values():
    zero = torch.zeros(2)
    tie = torch.tensor([True, False])
    # d = 0: a tie has probability (k - 1) / (k + 1) = 2/3, a decided pair 1 / (1 + k) = 1/6
    per_pair = [math.log(1.5), math.log(6.0)]
    assert float(btt_loss(zero, zero, tie)) == pytest.approx(sum(per_pair) / 2, rel=1e-6)
    d = 1.3
    r_w, r_l = torch.tensor([d]), torch.tensor([0.0])
    p_win = 1 / (1 + 5 * math.exp(-d))
    p_lose = 1 / (1 + 5 * math.exp(d))
    assert float(btt_loss(r_w, r_l, torch.tensor([False]))) == pytest.approx(-math.log(p_win), rel=1e-6)
    p_tie = 1 - p_win - p_lose  # the three outcomes of Rao-Kupper sum to one
    assert float(btt_loss(r_w, r_l, torch.tensor([True]))) == pytest.approx(-math.log(p_tie), rel=1e-5)


def test_tied_mask_and_its_errors():
    votes = torch.tensor([[3.0, 2.0], [5.0, 0.0], [0.5, 0.5], [0.61, 0.39]])
    assert tied_mask(votes, 0.2).tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        tied_mask(torch.ones(3), 0.2)
    with pytest.raises(ValueError, match="positive total"):
        tied_mask(torch.zeros(1, 2), 0.2)
    with pytest.raises(ValueError, match="k must be > 1"):
        btt_loss(torch.zeros(1), torch.zeros(1), torch.tensor([True]), k=1.0)
