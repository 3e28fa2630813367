"""The latent path under the caller's torch.autocast (Flow-GRPO samples under fp16 autocast): score, condition and
features run in the engine's own dtype, and the README's train_sd3.py edit runs on the tiny base."""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import random_inputs
from flow_grpo import combine

from bench.tiny_base import default_tiny_base
from engine import RewardEngine
from engine.rl import dit_latent_reward_fn
from engine.shared import shared_engine

AUTOCAST_DTYPES = (torch.float16, torch.bfloat16)


@pytest.mark.parametrize("engine_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES)
def test_engine_computes_in_its_own_dtype_under_autocast(engine_dtype, autocast_dtype) -> None:
    engine = RewardEngine.from_preset("tiny", dtype=engine_dtype, kernels_backend="torch")
    z, pe, po, eps = random_inputs(batch=3, h=8, w=8, text_len=9, seed=2)
    fn = dit_latent_reward_fn(engine)
    expected = fn(z, pe, po)
    expected_features = engine.features(z, (pe, po), eps)
    with torch.autocast("cpu", dtype=autocast_dtype):
        got = fn(z, pe, po)
        features = engine.features(z, (pe, po), eps)
        cond = engine.condition(pe, po)
        assert torch.is_autocast_enabled("cpu")  # the caller's autocast is left as it was
    # identical computation: autocast changed nothing
    assert torch.equal(got, expected) and got.dtype == torch.float32
    assert torch.equal(features, expected_features)
    assert cond.modulation.dtype == engine_dtype and cond.context.dtype == engine_dtype
    assert torch.equal(engine.score(z, cond, engine.common_noise(z)), expected)  # made under autocast, accepted


@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES)
def test_train_sd3_latent_wiring_on_the_tiny_base(autocast_dtype, tmp_path) -> None:
    """The README's edit of Flow-GRPO's scripts/train_sd3.py, restated on the tiny base: the sampler's stacked
    trajectory (batch, steps + 1, C, H, W) under autocast, the final latents submitted to the trainer's executor
    beside the image rewards, the future's ({"dit_reward": r, "avg": r}, {}) mixed into "avg"."""
    base = default_tiny_base()
    trained = RewardEngine.from_base(base, dtype=torch.float32, kernels_backend="torch")
    checkpoint = trained.save_pretrained(tmp_path / "reward", training={"max_sequence_length": 16})
    dit_weight = 0.5

    # --- the README's additions to train_sd3.py
    engine = shared_engine(checkpoint, base=base, device="cpu", dtype=torch.float32, kernels_backend="torch")
    dit_latent = dit_latent_reward_fn(engine, normalize=True)

    def dit_reward(final_latents, prompt_embeds, pooled_prompt_embeds, prompts):
        r = dit_latent(final_latents, prompt_embeds, pooled_prompt_embeds).cpu().numpy()
        return {"dit_reward": r, "avg": r}, {}

    # --- the trainer's own pieces: its image reward fn (multi_score), executor, sampling loop
    def brightness(images, prompts, metadata):
        return images.float().mean(dim=(1, 2, 3)).numpy(), {}

    reward_fn = combine({"brightness": brightness}, {"brightness": 1.0})
    front = engine.pixel_front_end()  # the trainer's pipeline: its text encoders and VAE
    executor = ThreadPoolExecutor(max_workers=8)
    gen = torch.Generator().manual_seed(3)
    samples, finals = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # prompts at the checkpoint's length: no prompt-length warning
        for _ in range(2):  # config.sample.num_batches_per_epoch
            prompts = ("a red car", "a red car", "a cat", "a cat")  # k repeats per prompt
            prompt_embeds, pooled_prompt_embeds = front.encode_prompts(list(prompts))  # 77 + 16 tokens
            with torch.autocast("cpu", dtype=autocast_dtype):
                trajectory = [torch.randn(4, 16, 4, 4, generator=gen)]
                for _step in range(3):  # the sampler's steps, in autocast's dtype
                    trajectory.append((0.7 * trajectory[-1] + 0.3 * torch.randn(4, 16, 4, 4, generator=gen)).half())
                latents = torch.stack([x.float() for x in trajectory], dim=1)  # (batch, steps + 1, 16, h, w)
                images = front.vae_decode(latents[:, -1])  # the pipeline's output_type="pt"
                rewards = executor.submit(reward_fn, images, prompts, {}, only_strict=True)
                dit_rewards = executor.submit(dit_reward, latents[:, -1], prompt_embeds, pooled_prompt_embeds, prompts)
                # autocast is thread-local: the executor's threads do not see it, an inline call does
                inline, _ = dit_reward(latents[:, -1], prompt_embeds, pooled_prompt_embeds, prompts)
            samples.append({"latents": latents[:, :-1], "rewards": rewards, "dit_rewards": dit_rewards})
            finals.append((latents[:, -1], prompt_embeds, pooled_prompt_embeds, images, inline))
        for sample in samples:  # "Waiting for rewards"
            rewards, _ = sample["rewards"].result()
            dit, _ = sample.pop("dit_rewards").result()
            avg = np.asarray(rewards["avg"]) + dit_weight * dit["avg"]
            rewards = {**rewards, "dit_reward": dit["dit_reward"], "avg": avg}
            sample["rewards"] = {key: torch.as_tensor(value).float() for key, value in rewards.items()}
    executor.shutdown()

    assert set(samples[0]) == {"latents", "rewards"}  # what the trainer collates with torch.cat
    for sample, (final, embeds, pooled, images, inline) in zip(samples, finals, strict=True):
        expected = engine.score(final, (embeds, pooled), engine.common_noise(final), normalize=True)
        assert torch.equal(sample["rewards"]["dit_reward"], expected)
        assert torch.equal(torch.from_numpy(inline["dit_reward"]), expected)  # under autocast, the same
        torch.testing.assert_close(
            sample["rewards"]["avg"], images.mean(dim=(1, 2, 3)) + dit_weight * expected, rtol=1e-6, atol=1e-6
        )
