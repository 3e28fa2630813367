"""The differentiable latent reward: fp64 gradcheck, Triton backward == torch backward, gradient checkpointing."""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil

import pytest
import torch
from conftest import random_inputs, rel_err

import kernels
from engine import RewardEngine


def _exact_in_fp64(reference):
    """A kernel reference that keeps fp64 inputs in fp64 (``upcast=False``); other dtypes pass through."""

    @functools.wraps(reference)
    def wrapper(*args, **kwargs):
        if any(isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in args):
            kwargs["upcast"] = False
        return reference(*args, **kwargs)

    return wrapper


def _mean_pool_fp64(reference):
    @functools.wraps(reference)
    def wrapper(h: torch.Tensor, upcast: bool = False) -> torch.Tensor:
        return h.mean(dim=1) if h.dtype == torch.float64 else reference(h, upcast)

    return wrapper


@pytest.fixture
def fp64_references(monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch backend calls every kernel reference with ``upcast=True``, i.e. fp32 arithmetic cast back: right for
    bf16 engines, but it rounds an fp64 engine to fp32 and finite differences would then measure rounding. Route fp64
    inputs to the same references in their own dtype. `mean_pool_ref` returns fp32 by contract (the feature buffer),
    so fp64 gets a plain mean. Every `*_ref` with an ``upcast`` argument in `kernels` is covered, new ones included."""
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"kernels.{info.name}")
        for name, fn in vars(module).items():
            if name.endswith("_ref") and inspect.isfunction(fn) and "upcast" in inspect.signature(fn).parameters:
                wrap = _mean_pool_fp64 if name == "mean_pool_ref" else _exact_in_fp64
                monkeypatch.setattr(module, name, wrap(fn))


@pytest.fixture(scope="module")
def engine64() -> RewardEngine:
    engine = RewardEngine.from_preset("tiny", dtype=torch.float64, kernels_backend="torch")
    engine.head.double()  # the engine keeps its head in fp32 (features arrive in fp32); fp64 here for gradcheck
    return engine


def _reward64(engine: RewardEngine, latents: torch.Tensor, prompt_emb, noise: torch.Tensor) -> torch.Tensor:
    """Eq. 1-5 in fp64: `engine.features` with the graph, then the head's MLP (its forward casts the result to fp32)."""
    features = engine.features(latents, prompt_emb, noise=noise, grad=True)
    assert features.dtype == torch.float64, "an op rounded to fp32: gradcheck would measure rounding"
    return engine.head.mlp(features.flatten(1)).squeeze(-1)


@pytest.mark.usefixtures("fp64_references")
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


@pytest.mark.usefixtures("fp64_references")
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
