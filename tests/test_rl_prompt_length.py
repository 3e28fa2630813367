"""The checkpoint's prompt length (the T5 tokens its cache was encoded at) is the default of every text-encoding
path; latent-path callers with another prompt_embeds length are warned once per engine, or refused when strict."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import random_inputs

from bench.tiny_base import default_tiny_base
from engine import RewardEngine
from engine.pixel import PixelFrontEnd
from engine.rl import dit_latent_reward_fn, dit_reward_fn

TRAINED_T5 = 16  # what training.cache --max-sequence-length 16 records (README's tiny walkthrough)
PROMPTS = ["a photo of a cat", "two dogs running on the beach", "a red car at night"]


@pytest.fixture(scope="module")
def fresh_head() -> RewardEngine:
    return RewardEngine.from_base(default_tiny_base(), dtype=torch.float32, kernels_backend="torch")


@pytest.fixture(scope="module")
def checkpoint(fresh_head: RewardEngine, tmp_path_factory: pytest.TempPathFactory):
    """A checkpoint as the trainer exports it: `training.max_sequence_length` in its metadata."""
    directory = tmp_path_factory.mktemp("prompt-length") / "reward"
    return fresh_head.save_pretrained(directory, training={"max_sequence_length": TRAINED_T5, "mode": "frozen"})


def _load(checkpoint, **kw) -> RewardEngine:
    return RewardEngine.from_pretrained(checkpoint, base=default_tiny_base(), dtype=torch.float32,
                                        kernels_backend="torch", **kw)  # fmt: skip


def test_text_paths_encode_at_the_checkpoints_prompt_length(checkpoint, fresh_head, tmp_path) -> None:
    fn = dit_reward_fn(checkpoint, base=default_tiny_base(), dtype=torch.float32, kernels_backend="torch")
    engine = fn.engine
    assert engine.prompt_length.t5_tokens == TRAINED_T5
    assert engine.pixel.prompt_encoder.max_sequence_length == TRAINED_T5
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    scores, _ = fn(images, PROMPTS)
    # independently: the same latents and the prompts encoded by a front end built at the trained length
    front = PixelFrontEnd.from_pretrained(default_tiny_base(), device="cpu", max_sequence_length=TRAINED_T5)
    ((_, latents),) = front.encode_images(images)
    embeds = front.encode_prompts(PROMPTS)
    assert embeds[0].shape[1] == 77 + TRAINED_T5
    expected = engine.score(latents, embeds, noise=engine.common_noise(latents))
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-6, atol=1e-7)
    # what the default prevents: the same images with SD3's 256-token prompts score differently
    long = PixelFrontEnd.from_pretrained(default_tiny_base(), device="cpu").encode_prompts(PROMPTS)
    with pytest.warns(RuntimeWarning, match="333 tokens"):
        other = engine.score(latents, long, noise=engine.common_noise(latents))
    assert (other - expected).abs().max() > 1e-5
    # a checkpoint that records no length: SD3's 256
    bare = fresh_head.save_pretrained(tmp_path / "bare")
    assert _load(bare).prompt_length.t5_tokens == 256
    assert json.loads((bare / "reward_config.json").read_text())["metadata"] == {}


def test_latent_callers_are_warned_once_per_engine(checkpoint) -> None:
    engine = _load(checkpoint)
    z, pe, po, _ = random_inputs(batch=2, h=8, w=8, text_len=77 + 128, seed=1)  # Flow-GRPO's 128 T5 tokens
    fn = dit_latent_reward_fn(engine)
    with pytest.warns(
        RuntimeWarning, match=r"have 205 tokens but the reward was trained at 93 \(77 CLIP \+ 16 T5"
    ) as w:
        fn(z, pe, po)
    assert len(w) == 1 and w[0].filename == __file__  # points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn(z, pe, po)  # once per engine
        engine.condition(pe[:, :93], po)  # the trained length never warns
        RewardEngine.from_preset("tiny", dtype=torch.float32, kernels_backend="torch").score(
            z, (pe, po)
        )  # random weights: no length
    with pytest.warns(RuntimeWarning, match="205 tokens"):
        dit_latent_reward_fn(_load(checkpoint))(z, pe, po)  # another engine warns on its own


def test_strict_prompt_length_raises(checkpoint) -> None:
    engine = _load(checkpoint, strict_prompt_length=True)
    z, pe, po, _ = random_inputs(batch=2, h=8, w=8, text_len=77 + 128, seed=1)
    with pytest.raises(ValueError, match=r"205 tokens .* max_sequence_length=16 .*strict_prompt_length=True"):
        dit_latent_reward_fn(engine)(z, pe, po)
    assert dit_latent_reward_fn(engine)(z, pe[:, :93], po).shape == (2,)
    strict = RewardEngine.from_preset("tiny", dtype=torch.float32, strict_prompt_length=True)  # SD3's 256
    with pytest.raises(ValueError, match="trained at 333"):
        strict.condition(pe, po)


def test_prompt_length_survives_a_resave_and_bad_records_are_named(checkpoint, tmp_path) -> None:
    again = _load(checkpoint).save_pretrained(tmp_path / "again")  # no metadata passed
    assert _load(again).prompt_length.t5_tokens == TRAINED_T5
    doc = json.loads((again / "reward_config.json").read_text())
    doc["metadata"]["training"]["max_sequence_length"] = "128"
    (again / "reward_config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"reward_config.json: field 'metadata.training.max_sequence_length' is '128'"):
        _load(again)
    for bad in (0, 513, True, 16.0):
        with pytest.raises(ValueError, match="max_sequence_length must be an int in"):
            RewardEngine.from_preset("tiny", max_sequence_length=bad)


def test_latency_bench_defaults_to_the_checkpoints_prompt_length(checkpoint) -> None:
    from bench.latency import parse_args

    assert parse_args(["--interface", "pixel", "--checkpoint", str(checkpoint)]).text_len == 77 + TRAINED_T5
    assert parse_args(["--interface", "pixel"]).text_len == 333  # no checkpoint: SD3's 256 T5 tokens
    assert parse_args(["--checkpoint", str(checkpoint), "--text-len", "205"]).text_len == 205
