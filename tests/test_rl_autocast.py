"""The latent path under the caller's torch.autocast (Flow-GRPO samples under fp16 autocast): score, condition and
features run in the engine's own dtype."""

from __future__ import annotations

import pytest
import torch
from conftest import random_inputs

from engine import RewardEngine
from engine.rl import dit_latent_reward_fn

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
