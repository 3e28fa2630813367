"""RL integration: Flow-GRPO-style reward fn, the latent reward with GRPO groups, group advantages, the example."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_inputs
from flow_grpo import build_score_fns, combine, per_prompt_advantages
from PIL import Image

from bench.tiny_base import default_tiny_base
from engine import RewardEngine
from engine.rl import dit_latent_reward_fn, dit_reward_factory, dit_reward_fn, group_advantages

PROMPTS = ["a photo of a cat", "two dogs running on the beach", "a red car at night"]


@pytest.fixture(scope="module")
def engine() -> RewardEngine:
    return RewardEngine.from_preset("tiny", dtype=torch.float32, kernels_backend="torch")


@pytest.fixture(scope="module")
def pixel_engine() -> RewardEngine:
    return RewardEngine.from_base(default_tiny_base(), dtype=torch.float32, kernels_backend="torch")


def _images(n: int, height: int = 32, width: int = 32) -> torch.Tensor:
    """Flow-GRPO's image batch: float NCHW in [0, 1]."""
    return torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(n))


# ------------------------------------------------------------------------------------------------ advantages


def test_group_advantages_match_flow_grpo() -> None:
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=12).astype(np.float32)
    labels = [7, 3, 7, 3, 9, 7, 3, 9, 9, 7, 3, 42]  # interleaved, non-contiguous labels, one group of size 1
    expected = per_prompt_advantages(labels, rewards)
    got = group_advantages(torch.from_numpy(rewards), torch.tensor(labels))
    assert got.dtype == torch.float32 and got.shape == (12,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-6)
    as_prompts = [f"prompt {label}" for label in labels]  # Flow-GRPO groups by the prompt string
    np.testing.assert_allclose(group_advantages(rewards, as_prompts).numpy(), expected, rtol=1e-6, atol=1e-6)
    assert got[-1] == 0  # a lone sample has no group to compare with
    assert torch.equal(group_advantages(torch.ones(4), torch.tensor([0, 0, 1, 1])), torch.zeros(4))
    # each group is normalised on its own: zero mean, unit (population) std up to eps
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 10.0, 30.0, 50.0]), torch.tensor([0, 0, 0, 1, 1, 1]))
    assert torch.allclose(adv[:3], adv[3:], atol=1e-3) and abs(float(adv[:3].std(unbiased=False)) - 1) < 1e-3


def test_group_advantages_bad_inputs() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        group_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="3 integer labels"):
        group_advantages(torch.zeros(3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer labels"):
        group_advantages(torch.zeros(2), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="eps"):
        group_advantages(torch.zeros(2), torch.tensor([0, 1]), eps=0)
    with pytest.raises(ValueError, match=r"rewards contain NaN or Inf at indices \[1\]"):
        group_advantages(torch.tensor([0.5, float("nan"), 0.2]), torch.tensor([0, 0, 1]))
    for eps in ("x", None, True, [1e-4]):
        with pytest.raises(TypeError, match="eps must be a positive float"):
            group_advantages(torch.zeros(2), torch.tensor([0, 1]), eps=eps)
    for eps in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps must be a finite float > 0"):
            group_advantages(torch.zeros(2), torch.tensor([0, 1]), eps=eps)


def test_latent_reward_group_index_must_match_its_rows(engine: RewardEngine) -> None:
    z0, pe, po, _ = random_inputs(batch=4, h=8, w=8, text_len=5, seed=4)
    fn = dit_latent_reward_fn(engine, seed=0)
    group = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"pooled needs one row per latent \(4\), got 2"):
        fn(z0, pe, po[:2], group_index=group)
    with pytest.raises(ValueError, match=r"prompt_embeds needs one row per latent \(4\), got 3"):
        fn(z0, pe[:3], po, group_index=group)
    with pytest.raises(TypeError, match="pooled must be a torch.Tensor"):
        fn(z0, pe, po.tolist(), group_index=group)
    with pytest.raises(TypeError, match="group_index must be 4 integers"):
        fn(z0, pe, po, group_index="0011")
    with pytest.raises(TypeError, match="group_index must be 4 integers"):
        fn(z0, pe, po, group_index=["a", "a", "b", "b"])
    with pytest.raises(ValueError, match="group_index is on meta but the latents are on cpu"):
        fn(z0, pe, po, group_index=group.to("meta"))


# ------------------------------------------------------------------------------------------------ latent form


def test_latent_reward_groups_share_one_conditioning(engine: RewardEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    z0, pe, po, _ = random_inputs(batch=6, h=8, w=8, text_len=7, seed=1)
    group = torch.tensor([2, 2, 0, 0, 2, 0])  # two GRPO groups of 3, interleaved
    row_of_latent = torch.where(group == 2, 4, 2)  # group 2 uses prompt row 4, group 0 row 2
    per_latent = (pe[row_of_latent], po[row_of_latent])  # Flow-GRPO's layout: one (repeated) row per sample
    expected = engine.score(z0, per_latent, seed=11)  # every row conditioned on its own

    conditioned: list[int] = []
    real_condition = engine.condition
    monkeypatch.setattr(
        engine, "condition", lambda emb, pool, **kw: conditioned.append(emb.shape[0]) or real_condition(emb, pool, **kw)
    )
    fn = dit_latent_reward_fn(engine, seed=11)
    by_group = fn(z0, *per_latent, group_index=group)
    assert conditioned == [2]  # once per group, not per latent
    assert by_group.shape == (6,) and by_group.dtype == torch.float32
    torch.testing.assert_close(by_group, expected, rtol=1e-5, atol=1e-6)
    for dtype in (torch.uint8, torch.int16, torch.int32):  # any integer labels, as group_advantages takes
        torch.testing.assert_close(fn(z0, *per_latent, group_index=group.to(dtype)), by_group, rtol=0, atol=0)
    by_prompt = fn(z0, *per_latent, prompts=["dog" if g == 2 else "cat" for g in group.tolist()])
    torch.testing.assert_close(by_prompt, expected, rtol=1e-5, atol=1e-6)
    # distinct rows + prompt_index (the engine's convention) gives the same rewards
    distinct = fn(z0, pe[[2, 4]], po[[2, 4]], prompt_index=(group == 2).long())
    torch.testing.assert_close(distinct, expected, rtol=1e-5, atol=1e-6)
    assert fn.engine is engine


def test_latent_reward_single_prompt_grad_and_normalize(engine: RewardEngine) -> None:
    z0, pe, po, _ = random_inputs(batch=3, h=8, w=8, text_len=5, seed=2)
    fn = dit_latent_reward_fn(engine, seed=0, grad=True)
    z = z0.clone().requires_grad_(True)
    reward = fn(z, pe[:1], po[:1])  # one prompt for the whole batch
    (grad,) = torch.autograd.grad(reward.sum(), z)
    assert grad.shape == z.shape and grad.abs().sum() > 0
    normalized = dit_latent_reward_fn(engine, seed=0, normalize=True)(z0, pe[:1], po[:1])
    cfg = engine.reward_config
    torch.testing.assert_close(normalized, (reward.detach() - cfg.reward_mean) / cfg.reward_std)


def test_latent_reward_bad_inputs(engine: RewardEngine) -> None:
    z0, pe, po, _ = random_inputs(batch=4, h=8, w=8, text_len=5, seed=3)
    fn = dit_latent_reward_fn(engine)
    with pytest.raises(ValueError, match="differ within a group"):
        fn(z0, pe, po, group_index=[0, 0, 1, 1])  # four different rows labelled as two groups
    with pytest.raises(ValueError, match="one row per latent"):
        fn(z0, pe[:2], po[:2], group_index=[0, 0, 1, 1])
    with pytest.raises(ValueError, match="pass one"):
        fn(z0, pe, po, [0, 1, 2, 3], group_index=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="not both"):
        fn(z0, pe, po, group_index=[0, 1, 2, 3], prompts=list("abcd"))
    with pytest.raises(ValueError, match="4 strings"):
        fn(z0, pe, po, prompts=["a", "b"])
    with pytest.raises(ValueError, match="4 integers"):
        fn(z0, pe, po, group_index=[0.5, 1, 2, 3])
    with pytest.raises(TypeError, match="latents"):
        fn(z0.numpy(), pe, po)
    with pytest.raises(TypeError, match="RewardEngine"):
        dit_latent_reward_fn("not an engine")


# ------------------------------------------------------------------------------------------------- pixel form


def test_flow_grpo_reward_fn_in_multi_score(pixel_engine: RewardEngine) -> None:
    images, prompts = _images(4), [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    fn = dit_reward_fn(pixel_engine, seed=5)
    scores, details = fn(images, tuple(prompts), {})  # Flow-GRPO's DataLoader hands over tuples
    assert details == {} and isinstance(scores, np.ndarray) and scores.dtype == np.float32 and scores.shape == (4,)
    np.testing.assert_array_equal(scores, pixel_engine.score_images(images, prompts, seed=5).numpy())
    # the same pixels as PIL images and as a uint8 NHWC array: Flow-GRPO's other image forms
    uint8 = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    from_pil, _ = fn([Image.fromarray(a) for a in uint8], prompts, None)
    from_array, _ = fn(uint8, np.array(prompts), None)
    np.testing.assert_array_equal(from_pil, from_array)
    np.testing.assert_allclose(from_pil, scores, atol=1e-2)  # 8-bit quantisation of the pixels

    def brightness(images, prompts, metadata):
        return images.mean(dim=(1, 2, 3)).numpy(), {}

    combined = combine({"dit_reward": fn, "brightness": brightness}, {"dit_reward": 1.0, "brightness": 0.5})
    details, _ = combined(images, prompts, {})
    total = np.asarray(details["avg"], dtype=np.float64)  # one float per image, as Flow-GRPO's trainer reads it
    np.testing.assert_allclose(total, scores + 0.5 * images.mean(dim=(1, 2, 3)).numpy(), rtol=1e-6)
    np.testing.assert_array_equal(details["dit_reward"], scores)


def test_flow_grpo_reward_fn_from_a_checkpoint(pixel_engine: RewardEngine, tmp_path: Path) -> None:
    checkpoint = pixel_engine.save_pretrained(tmp_path / "reward")
    fn = dit_reward_fn(
        checkpoint, base=default_tiny_base(), device="cpu", dtype=torch.float32, seed=3, kernels_backend="torch"
    )
    images, prompts = _images(2), PROMPTS[:2]
    expected = pixel_engine.score_images(images, prompts, seed=3, normalize=True)
    scores, _ = dit_reward_fn(fn.engine, seed=3, normalize=True)(images, prompts, None)
    np.testing.assert_array_equal(scores, expected.numpy())


def test_flow_grpo_factory_registers_in_multi_score(pixel_engine: RewardEngine, tmp_path: Path) -> None:
    checkpoint = pixel_engine.save_pretrained(tmp_path / "reward")
    images, prompts = _images(3), PROMPTS
    expected = pixel_engine.score_images(images, prompts, seed=2, normalize=True).numpy()
    registry = {
        "from_checkpoint": dit_reward_factory(
            checkpoint, base=default_tiny_base(), dtype=torch.float32, seed=2, normalize=True, kernels_backend="torch"
        ),
        "from_engine": dit_reward_factory(pixel_engine, seed=2, normalize=True),
    }
    score_dict = {"from_checkpoint": 1.0, "from_engine": 0.5}
    score_fns = build_score_fns(registry, score_dict, torch.device("cpu"))
    assert score_fns["from_engine"].engine is pixel_engine and score_fns["from_checkpoint"].engine.device.type == "cpu"
    details, _ = combine(score_fns, score_dict)(images, prompts, {})
    np.testing.assert_array_equal(details["from_engine"], expected)
    np.testing.assert_allclose(details["from_checkpoint"], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(details["avg"], 1.5 * expected, rtol=1e-6, atol=1e-6)
    # what the factory replaces: dit_reward_fn is handed the device as its checkpoint, a partial has no __code__
    with pytest.raises(TypeError, match="got device"):
        build_score_fns({"dit": dit_reward_fn}, {"dit": 1.0}, torch.device("cpu"))
    with pytest.raises(AttributeError, match="__code__"):
        build_score_fns({"dit": functools.partial(dit_reward_fn, checkpoint)}, {"dit": 1.0}, "cpu")


def test_flow_grpo_factory_bad_inputs(pixel_engine: RewardEngine, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="base="):
        dit_reward_factory(tmp_path / "reward")
    with pytest.raises(TypeError, match="RewardEngine or a reward checkpoint"):
        dit_reward_factory(42)
    with pytest.raises(TypeError, match="seed"):
        dit_reward_factory(pixel_engine, seed="1")
    with pytest.raises(ValueError, match="already built"):
        dit_reward_factory(pixel_engine, base=default_tiny_base())
    with pytest.raises(ValueError, match="'meta' holds shapes but no values"):
        dit_reward_factory(pixel_engine)("meta")


def test_flow_grpo_reward_fn_bad_inputs(pixel_engine: RewardEngine, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="base="):
        dit_reward_fn(tmp_path / "reward")
    with pytest.raises(ValueError, match="already has its base"):
        dit_reward_fn(pixel_engine, base=default_tiny_base())
    with pytest.raises(ValueError, match="already built"):
        dit_reward_fn(pixel_engine, check_finite=False)
    with pytest.raises(TypeError, match="RewardEngine or a reward checkpoint"):
        dit_reward_fn(42)
    with pytest.raises(TypeError, match="seed"):
        dit_reward_fn(pixel_engine, seed=1.5)
    with pytest.raises(ValueError, match="score_images needs"):
        dit_reward_fn(RewardEngine.from_preset("tiny", dtype=torch.float32, kernels_backend="torch"))
    fn = dit_reward_fn(pixel_engine)
    with pytest.raises(TypeError, match="one per image"):
        fn(_images(1), "a cat", None)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        fn(_images(2), ["a cat"], None)


# ---------------------------------------------------------------------------------------------------- example


def test_grpo_example_runs_and_raises_the_reward(capsys: pytest.CaptureFixture[str]) -> None:
    path = Path(__file__).resolve().parents[1] / "examples" / "grpo_loop.py"
    spec = importlib.util.spec_from_file_location("grpo_loop", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    history = module.main(["--steps", "4", "--group-size", "4"])
    assert len(history) == 4 and history[-1] > history[0]
    assert capsys.readouterr().out.count("reward") == 4
