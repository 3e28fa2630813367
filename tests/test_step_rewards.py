"""Rewards while sampling (engine.steps.StepRewards) inside a real diffusers StableDiffusion3Pipeline built from the
tiny base: the trace against the intermediate latents scored separately, and reward guidance."""

from __future__ import annotations

import pytest
import torch

from engine import RewardEngine
from engine.rl import StepRewards

PROMPTS = ["a red cat", "a blue dog on a beach"]
STEPS = 6


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusion3Pipeline

    from bench.tiny_base import default_tiny_base

    pipe = StableDiffusion3Pipeline.from_pretrained(default_tiny_base(), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def engine():
    from bench.tiny_base import default_tiny_base

    return RewardEngine.from_base(default_tiny_base(), dtype=torch.float32, kernels_backend="torch")


def sample(pipe, callback=None, seed: int = 0) -> torch.Tensor:
    """The pipeline's final latents (CFG on: guidance_scale 7) for PROMPTS, 64x64 pixels = 8x8 latents."""
    extra = {"callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": StepRewards.tensor_inputs}
    return pipe(
        PROMPTS, height=64, width=64, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed),
        output_type="latent", max_sequence_length=32, **(extra if callback else {}),
    ).images  # fmt: skip


class Recorder:
    """A callback that keeps every state the pipeline hands it."""

    def __init__(self):
        self.latents: list[torch.Tensor] = []

    def __call__(self, pipe, step, timestep, kwargs):
        self.latents.append(kwargs["latents"].clone())
        return kwargs


def test_trace_equals_scoring_the_saved_intermediate_latents(pipe, engine):
    """Every 2nd step and the last: the trace row of step i is engine.score of the state after step i at sigma_{i+1}
    of the run's table (on x_t, no noise), with the conditional prompt embeddings encoded separately; the last
    state (sigma 0) is scored as the final latents are, at the checkpoint's t with the common noise. Sampling is
    unchanged by the callback."""
    recorder = Recorder()
    plain = sample(pipe, recorder)
    steps = StepRewards(engine, every=2)
    assert torch.equal(sample(pipe, steps), plain)
    assert steps.steps == [1, 3, 5] and steps.trace.shape == (3, 2)
    table = pipe.scheduler.sigmas  # [STEPS + 1], ending in 0: x after step i is at table[i + 1]
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=32)  # fmt: skip
    for row, i in enumerate(steps.steps):
        x, sigma = recorder.latents[i], float(table[i + 1])
        assert steps.sigmas[row] == sigma
        if sigma == 0.0:
            assert torch.equal(x, plain)
            expected = engine.score(x, (embeds, pooled), engine.common_noise(x))
        else:
            expected = engine.score(x, (embeds, pooled), t=sigma, add_noise=False)
        torch.testing.assert_close(steps.trace[row], expected, rtol=1e-6, atol=0)
    assert len(set(steps.trace[:, 0].tolist())) == 3  # the rows differ (the comparison can fail)
    assert steps.cond.misses == 2  # one per new noise level; the clean row is the conditioning's own t


def test_reward_guidance_raises_the_reward_and_zero_changes_nothing(pipe, engine):
    """guidance=lam adds lam * grad r to each scored state: the final latent of the guided trajectory (before its
    own last guidance step) scores higher than the unguided one's for every prompt; with lam = 0 the gradient path
    runs and the samples and rewards are those of the unguided run."""
    plain = sample(pipe)
    unguided = StepRewards(engine, every=1)
    sample(pipe, unguided)
    zero = StepRewards(engine, every=1, guidance=0.0)
    assert torch.equal(sample(pipe, zero), plain)
    torch.testing.assert_close(zero.trace, unguided.trace, rtol=1e-6, atol=0)
    guided = StepRewards(engine, every=1, guidance=10.0)
    out = sample(pipe, guided)
    gain = guided.trace[-1] - unguided.trace[-1]  # the clean latents' rewards
    print(f"final reward unguided {unguided.trace[-1].tolist()}, guided (lam 10) {guided.trace[-1].tolist()}")
    assert (gain > 0).all() and (out - plain).abs().max() > 1e-3


def test_step_rewards_refuses_what_it_cannot_use(pipe, engine):
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs=StepRewards.tensor_inputs"):
        pipe(PROMPTS, height=64, width=64, num_inference_steps=2, output_type="latent", max_sequence_length=32,
             callback_on_step_end=StepRewards(engine))  # fmt: skip
    for bad in ({"every": 0}, {"every": 1.5}, {"guidance": -1.0}, {"guidance": float("nan")}):
        with pytest.raises(ValueError, match="every must be|guidance must be"):
            StepRewards(engine, **bad)
