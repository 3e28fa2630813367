"""Rewards handed to an RL loop are deterministic by default: one common near-clean draw per latent shape, so an
image's reward depends on the image and its prompt only (not the call, the thread, or its batch position).

Bit-equality is asserted where the computation is identical by construction (the same batch scored again, from
any thread). A permuted batch or an image scored alone runs matmuls whose row blocking depends on the batch's
layout and size, which may move a reward in its last bits; those compare at 1e-7 absolute, against differences of
~1e-4 that fresh noise makes on the same inputs (checked in the same tests, so they can fail)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import random_inputs
from flow_grpo import combine

from bench.tiny_base import default_tiny_base
from engine import RewardEngine
from engine.reward_noise import COMMON_NOISE_SEED, CommonNoise
from engine.rl import dit_latent_reward_fn, dit_reward_factory, dit_reward_fn
from kernels.noise import noise_ref

PROMPTS = ["a photo of a cat", "two dogs running on the beach"]
# Batch-layout-dependent matmul blocking moves features by ~1e-7 relative; the head's last layer sums terms of
# both signs, so a reward of ~0.03 moves by up to ~4e-8 absolute.
TIGHT = dict(rtol=1e-6, atol=1e-7)
NOISE_MATTERS = 1e-5  # fresh noise moves these rewards by ~1e-4 (tiny random model, t = 0.1)


@pytest.fixture(scope="module")
def engine() -> RewardEngine:
    return RewardEngine.from_preset("tiny", dtype=torch.float32, kernels_backend="torch")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    pixel = RewardEngine.from_base(default_tiny_base(), dtype=torch.float32, kernels_backend="torch")
    return pixel.save_pretrained(tmp_path_factory.mktemp("rl-noise") / "reward")


def _in_threads(fn, calls: int = 8):
    """`fn()` from a pool of 4 threads, as Flow-GRPO's trainer calls reward fns through its executor."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return [f.result() for f in [pool.submit(fn) for _ in range(calls)]]


# ----------------------------------------------------------------------------------------------- the draw itself


def test_common_noise_is_one_documented_draw_per_shape(engine: RewardEngine) -> None:
    z = torch.randn(3, 16, 8, 12, dtype=torch.bfloat16)
    eps = engine.common_noise(z)
    expected = noise_ref((1, 16, 8, 12), COMMON_NOISE_SEED)[0]  # Philox key COMMON_NOISE_SEED, stream 0
    assert eps.shape == z.shape and eps.dtype == torch.float32 and eps.device == z.device
    assert all(torch.equal(row, expected) for row in eps)
    assert engine.common_noise(z[:1]).data_ptr() == eps.data_ptr()  # cached: drawn once per shape
    assert engine.common_noise(z.double()).dtype == torch.float64  # the near-clean step's precision
    other = engine.common_noise(torch.zeros(2, 16, 8, 8))
    assert torch.equal(other[1], noise_ref((1, 16, 8, 8), COMMON_NOISE_SEED)[0])
    # the draw is image 0 of a seeded call: the engine's own seeded path gives the same reward
    _, pe, po, _ = random_inputs(batch=1, h=8, w=12, text_len=7, seed=3)
    one = z[:1].float()
    assert torch.equal(engine.score(one, (pe, po), engine.common_noise(one)), engine.score(one, (pe, po), seed=0))
    # an edit through the shared view is detected: the cache serves the documented draw again
    eps[0].mul_(2)
    assert torch.equal(engine.common_noise(z)[0], expected)
    with pytest.raises(TypeError, match=r"floating-point torch.Tensor \[B, C, H, W\]"):
        engine.common_noise(torch.zeros(2, 16, 8))


def test_common_noise_cache_is_bounded_and_thread_safe() -> None:
    shapes = [(16, 8, 8 + 2 * k) for k in range(6)]
    one = 4 * 16 * 8 * 12  # bytes of the middle shape's draw
    noise = CommonNoise(cache_bytes=2 * one)
    start = threading.Barrier(4)

    def draw_all(_):
        start.wait()
        return [noise.draw(torch.zeros(2, *shape)) for shape in shapes for _ in range(3)]

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(draw_all, range(4)))
    for drawn in results:
        for eps, shape in zip(drawn[::3], shapes, strict=True):
            assert torch.equal(eps[1], noise_ref((1, *shape), COMMON_NOISE_SEED)[0])
    assert 1 <= len(noise) <= 2 and noise._cache.total_cost <= 2 * one


# ----------------------------------------------------------------------------------------------- latent path


def test_latent_rewards_are_deterministic_by_default(engine: RewardEngine) -> None:
    z, pe, po, _ = random_inputs(batch=8, h=8, w=12, text_len=9, seed=5)
    group = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])  # two GRPO groups, Flow-GRPO's per-sample rows
    z, pe, po = z, pe[group], po[group]
    fn = dit_latent_reward_fn(engine)
    rewards = fn(z, pe, po, group_index=group)
    assert torch.equal(fn(z, pe, po, group_index=group), rewards)  # scored again
    assert all(torch.equal(r, rewards) for r in _in_threads(lambda: fn(z, pe, po, group_index=group)))
    perm = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])
    torch.testing.assert_close(fn(z[perm], pe[perm], po[perm], group_index=group[perm]), rewards[perm], **TIGHT)
    alone = torch.cat([fn(z[i : i + 1], pe[i : i + 1], po[i : i + 1]) for i in range(8)])
    torch.testing.assert_close(alone, rewards, **TIGHT)
    # what the default replaces: fresh noise moves the same latents' rewards between calls
    fresh = dit_latent_reward_fn(engine, noise="fresh")
    assert (fresh(z, pe, po) - fresh(z, pe, po)).abs().max() > NOISE_MATTERS
    # an explicit seed keeps per-stream noise: latent b uses stream b, so its reward depends on its position
    seeded = dit_latent_reward_fn(engine, seed=3)(z, pe, po)
    assert torch.equal(seeded, engine.score(z, (pe, po), seed=3))
    with pytest.raises(ValueError, match="pass one of them"):
        dit_latent_reward_fn(engine, noise="fresh", seed=3)
    with pytest.raises(ValueError, match="noise must be 'common'"):
        dit_latent_reward_fn(engine, noise="same")


# ------------------------------------------------------------------------------------------------ pixel path


def test_image_rewards_are_deterministic_by_default(checkpoint) -> None:
    """The README's Flow-GRPO registration, dit_reward_factory(ckpt, base=..., normalize=True), through multi_score
    and the trainer's executor: the same 8 images score the same every time, in any order."""
    make = dit_reward_factory(
        checkpoint, base=default_tiny_base(), dtype=torch.float32, normalize=True, kernels_backend="torch"
    )
    reward_fn = combine({"dit_reward": make("cpu")}, {"dit_reward": 1.0})
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # Flow-GRPO: float NCHW in [0, 1]
    prompts = [PROMPTS[i % 2] for i in range(8)]

    def score(order=range(8)):
        order = list(order)
        details, _ = reward_fn(images[order], tuple(prompts[i] for i in order), {}, only_strict=True)
        return np.asarray(details["avg"], dtype=np.float32)

    first = score()
    np.testing.assert_array_equal(score(), first)
    for again in _in_threads(score):
        np.testing.assert_array_equal(again, first)
    perm = [3, 6, 0, 7, 5, 1, 4, 2]
    np.testing.assert_allclose(score(perm), first[perm], **TIGHT)
    np.testing.assert_allclose(np.concatenate([score([i]) for i in range(8)]), first, **TIGHT)
    fresh = dit_reward_fn(make("cpu").engine, noise="fresh", normalize=True)
    assert np.abs(fresh(images, prompts)[0] - fresh(images, prompts)[0]).max() > NOISE_MATTERS


def test_score_images_gives_each_size_group_its_shapes_draw(checkpoint) -> None:
    fn = dit_reward_fn(checkpoint, base=default_tiny_base(), dtype=torch.float32, kernels_backend="torch")
    engine = fn.engine
    gen = torch.Generator().manual_seed(1)
    sizes = [(32, 32), (48, 32), (32, 32), (48, 32), (32, 48)]
    images = [torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy() for h, w in sizes]
    prompts = [PROMPTS[i % 2] for i in range(len(images))]
    scores, _ = fn(images, prompts)
    np.testing.assert_array_equal(scores, engine.score_images(images, prompts, noise="common").numpy())
    # independently: each image's latents scored against the documented draw for its latent shape
    front = engine.pixel_front_end()
    for image, prompt, got in zip(images, prompts, scores, strict=True):
        ((_, latents),) = front.encode_images([image])
        eps = noise_ref((1, *latents.shape[1:]), COMMON_NOISE_SEED)
        expected = engine.score(latents, front.encode_prompts([prompt]), noise=eps)
        np.testing.assert_allclose(got, expected.numpy()[0], **TIGHT)
    with pytest.raises(ValueError, match="pass one of them"):
        engine.score_images(images, prompts, noise="common", seed=1)
