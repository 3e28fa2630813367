"""Every bad input a user can cause raises ValueError/TypeError whose message names the problem."""

from __future__ import annotations

import pytest
import torch
from conftest import random_inputs

from engine import BackboneConfig, RewardConfig, RewardEngine


@pytest.fixture(scope="module")
def engine():
    return RewardEngine.from_preset("tiny", dtype=torch.float32, kernels_backend="torch")


@pytest.fixture(scope="module")
def good():
    z0, pe, po, noise = random_inputs(batch=2, h=8, w=8, text_len=5, seed=1)
    return z0, (pe, po), noise


def test_good_inputs_score(engine, good):
    z0, emb, noise = good
    r = engine.score(z0, emb, noise=noise)
    assert r.shape == (2,) and r.dtype == torch.float32 and torch.isfinite(r).all()


BAD = {
    "latents not a tensor": (lambda z, e, n: ([1.0], e, None), TypeError, "latents must be a torch.Tensor"),
    "integer latents": (lambda z, e, n: (z.long(), e, None), TypeError, "floating-point"),
    "wrong rank": (lambda z, e, n: (z[0], e, None), ValueError, r"latents must be \[B, 16, H, W\]"),
    "wrong channels": (lambda z, e, n: (z[:, :4], e, None), ValueError, r"\[B, 16, H, W\]"),
    "odd size": (lambda z, e, n: (z[..., :7], e, None), ValueError, "multiples of the patch size 2"),
    "too large": (lambda z, e, n: (torch.randn(2, 16, 8, 66), e, None), ValueError, "exceeds this model's positional"),
    "empty batch": (lambda z, e, n: (z[:0], e, None), ValueError, "empty batch"),
    "no pixels": (lambda z, e, n: (z[..., :0], e, None), ValueError, "latents have no pixels: 8x0"),
    "NaN latents": (
        lambda z, e, n: (z.clone().index_fill_(0, torch.tensor([1]), float("nan")), e, None),
        ValueError,
        "latents contains NaN",
    ),
    "Inf prompt": (
        lambda z, e, n: (z, (e[0].clone().fill_(float("inf")), e[1]), None),
        ValueError,
        "prompt_embeds contains NaN or Inf",
    ),
    "batch mismatch": (
        lambda z, e, n: (z, (torch.cat([e[0]] * 3)[:3], torch.cat([e[1]] * 3)[:3]), None),
        ValueError,
        "batch sizes disagree: 2 latents but 3 prompts",
    ),
    "embeds vs pooled batch": (
        lambda z, e, n: (z, (e[0], e[1][:1]), None),
        ValueError,
        "prompt_embeds and pooled batch sizes differ",
    ),
    "embedding width": (
        lambda z, e, n: (z, (e[0][..., :64], e[1]), None),
        ValueError,
        r"prompt_embeds must be \[B, L, 96\]",
    ),
    "pooled width": (lambda z, e, n: (z, (e[0], e[1][:, :10]), None), ValueError, r"pooled must be \[B, 80\]"),
    "prompt_emb type": (lambda z, e, n: (z, e[0], None), TypeError, "prompt_emb must be the SD3 pair"),
    "noise shape": (lambda z, e, n: (z, e, n[:1]), ValueError, "noise must have the latents' shape"),
    "NaN noise": (lambda z, e, n: (z, e, torch.full_like(n, float("nan"))), ValueError, "noise contains NaN"),
    "device": (lambda z, e, n: (z.to("meta"), e, None), ValueError, "is on meta but the engine is on cpu"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(engine, good, case):
    make, exc, pattern = BAD[case]
    z, emb, noise = make(*good)
    with pytest.raises(exc, match=pattern):
        engine.score(z, emb, noise=noise)


def test_bad_prompt_index(engine, good):
    z0, emb, _ = good
    with pytest.raises(ValueError, match=r"prompt_index values must lie in \[0, 1\]"):
        engine.score(z0, emb, prompt_index=[0, 2])
    with pytest.raises(ValueError, match="prompt_index must be 2 integers"):
        engine.score(z0, emb, prompt_index=[0.5, 1.0])


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(t=0.0), r"t must lie in \(0, 1\)"),
        (dict(t=1.5), r"t must lie in \(0, 1\)"),
        (dict(layers=(2, 1)), "strictly increasing without duplicates"),
        (dict(layers=(1, 1)), "strictly increasing without duplicates"),
        (dict(layers=()), "at least one block"),
        (dict(head_hidden=(0,)), "head_hidden sizes must be positive"),
        (dict(head_hidden="64"), "head_hidden must be a sequence of ints"),
        (dict(layers=(1.5, 2)), "layers must be a sequence of ints"),
        (dict(t="0.1"), "t must be a finite number"),
        (dict(reward_mean=float("nan")), "reward_mean must be a finite number"),
        (dict(reward_std=float("inf")), "reward_std must be a finite number"),
    ],
)
def test_bad_reward_config(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        RewardConfig(**kwargs)


def test_layers_out_of_range():
    with pytest.raises(ValueError, match=r"out of range: this backbone has blocks 0..3"):
        RewardEngine.from_preset("tiny", layers=(1, 4))


def test_bad_backbone_config_and_preset():
    with pytest.raises(ValueError, match="unknown backbone preset 'sd4'"):
        BackboneConfig.from_name("sd4")
    with pytest.raises(ValueError, match="qk_norm must be None or 'rms_norm'"):
        BackboneConfig(qk_norm="layer_norm")
    with pytest.raises(ValueError, match=r"dual_attention_layers \[40\] outside \[0, 37\]"):
        BackboneConfig(dual_attention_layers=(40,))


def test_bad_dtype_and_backends():
    with pytest.raises(ValueError, match="dtype must be one of"):
        RewardEngine.from_preset("tiny", dtype="int8")
    with pytest.raises(ValueError, match="kernel backend must be one of"):
        RewardEngine.from_preset("tiny", kernels_backend="cuda")
    with pytest.raises(ValueError, match="attention backend must be one of"):
        RewardEngine.from_preset("tiny", attention="xformers")


def test_fp8_options_need_fp8():
    with pytest.raises(ValueError, match="refine dtype='fp8'"):
        RewardEngine.from_preset("tiny", dtype="bf16", fp8_adaln=True)
    with pytest.raises(ValueError, match="refine dtype='fp8'"):
        RewardEngine.from_preset("tiny", dtype="bf16", fp8_fast_accum=True)


def test_conditioning_from_another_engine_is_refused(engine, good):
    z0, (pe, po), _ = good
    bf16 = RewardEngine.from_preset("tiny", dtype="bf16", kernels_backend="torch")
    with pytest.raises(ValueError, match="Conditioning is torch.bfloat16, the engine computes in torch.float32"):
        engine.score(z0, bf16.condition(pe, po))
    shallow = RewardEngine.from_preset("tiny", layers=(0, 1), dtype=torch.float32, kernels_backend="torch")
    with pytest.raises(ValueError, match="does not fit the engine"):
        engine.score(z0, shallow.condition(pe, po))
    other_t = RewardEngine.from_preset("tiny", t=0.2, dtype=torch.float32, kernels_backend="torch")
    with pytest.raises(ValueError, match="made at t=0.2"):
        engine.score(z0, other_t.condition(pe, po))


def test_outputs_are_ordinary_tensors(engine, good):
    """Rewards and features come out of inference mode as normal tensors: editable in place, usable in autograd."""
    z0, emb, noise = good
    r = engine.score(z0, emb, noise=noise)
    r -= r.mean()
    f = engine.features(z0, emb, noise=noise)
    f[0] = 0
    probe = torch.nn.Linear(f[0].numel(), 1)
    probe(f.flatten(1)).sum().backward()
    assert probe.weight.grad is not None


def test_fp64_engine_uses_the_torch_kernels():
    assert RewardEngine.from_preset("tiny", dtype="fp64", kernels_backend="triton").kernels_backend == "torch"
