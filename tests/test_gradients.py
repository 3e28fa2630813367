"""The differentiable latent reward: fp64 gradcheck, Triton backward == torch backward, gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
from conftest import random_inputs, rel_err

from engine import RewardEngine


@pytest.fixture(scope="module")
def engine64() -> RewardEngine:
    # an fp64 engine computes in fp64 end to end: the references' upcast is "at least fp32", head and features fp64
    return RewardEngine.from_preset("tiny", dtype=torch.float64, kernels_backend="torch")


def _reward64(engine: RewardEngine, latents: torch.Tensor, prompt_emb, noise: torch.Tensor) -> torch.Tensor:
    """Eq. 1-5 in fp64 through the public differentiable `score`."""
    reward = engine.score(latents, prompt_emb, noise=noise, grad=True)
    assert reward.dtype == torch.float64, "an op rounded to fp32: gradcheck would measure rounding"
    return reward


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradcheck_fp64(engine64: RewardEngine, checkpointing: bool) -> None:
    """Analytic vs finite-difference gradients of the reward w.r.t. latents, noise and both prompt embeddings.

    fast_mode checks one random projection of the Jacobian (seconds instead of minutes for 4 x 256 + text inputs);
    the full Jacobian is checked below on a 2x2 latent."""
    z0, pe, po, noise = (x.double() for x in random_inputs(batch=1, h=4, w=4, text_len=3, seed=5))
    inputs = tuple(x.clone().requires_grad_(True) for x in (z0, noise, pe, po))
    engine64.backbone.gradient_checkpointing = checkpointing
    try:
        assert torch.autograd.gradcheck(
            lambda z, eps, emb, pool: _reward64(engine64, z, (emb, pool), eps), inputs, fast_mode=True
        )
    finally:
        engine64.backbone.gradient_checkpointing = False


def test_gradcheck_fp64_full_jacobian(engine64: RewardEngine) -> None:
    z0, pe, po, noise = (x.double() for x in random_inputs(batch=1, h=2, w=2, text_len=3, seed=6))
    cond = engine64.condition(pe, po)  # prepared once, without grad, as an RL loop does
    z0.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: _reward64(engine64, z, cond, noise), (z0,))


def _latent_grads(engine: RewardEngine, z0, prompt_emb, noise=None, seed=None) -> tuple[torch.Tensor, ...]:
    """(reward, d reward.sum / d latents[, d / d noise]), fp32."""
    z = z0.clone().requires_grad_(True)
    inputs = [z]
    if noise is not None:
        noise = noise.clone().requires_grad_(True)
        inputs.append(noise)
    reward = engine.score(z, prompt_emb, noise=noise, seed=seed, grad=True)
    return (reward.detach(), *torch.autograd.grad(reward.sum(), inputs))


def test_triton_gradients_match_the_torch_reference() -> None:
    """The fused kernels' backward (Triton, interpreted on CPU) against the torch references, fp32, end to end:
    explicit noise (gradients to latents and noise), in-kernel Philox noise, and with gradient checkpointing."""
    reference = RewardEngine.from_preset("tiny", dtype=torch.float32, kernels_backend="torch")
    fast = RewardEngine.from_preset("tiny", dtype=torch.float32, kernels_backend="triton")
    z0, pe, po, noise = random_inputs(batch=2, h=4, w=6, text_len=3, seed=9)  # 2x3 patches: not a power of two
    cond_ref, cond_fast = reference.condition(pe, po), fast.condition(pe, po)

    expected = _latent_grads(reference, z0, cond_ref, noise=noise)
    got = _latent_grads(fast, z0, cond_fast, noise=noise)
    for name, a, b in zip(("reward", "d/dlatents", "d/dnoise"), got, expected, strict=True):
        assert rel_err(a, b) <= 1e-4, name
    assert got[1].abs().sum() > 0 and got[2].abs().sum() > 0

    fast.backbone.gradient_checkpointing = True
    checkpointed = _latent_grads(fast, z0, cond_fast, noise=noise)
    for a, b in zip(checkpointed, got, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)  # recompute runs the same kernels: same numbers

    seeded = _latent_grads(fast, z0, cond_fast, seed=1234)
    seeded_ref = _latent_grads(reference, z0, cond_ref, seed=1234)
    for a, b in zip(seeded, seeded_ref, strict=True):
        assert rel_err(a, b) <= 1e-4
