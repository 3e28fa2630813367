"""Every bad input a user can cause raises ValueError/TypeError whose message names the problem."""

from __future__ import annotations

import pytest
import torch
from conftest import FP32_REL_TOL, random_inputs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import BackboneConfig, Conditioning, RewardConfig, RewardEngine
from engine.checks import resolve_device


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


@pytest.mark.parametrize(
    "prompt_index, exc, pattern",
    [
        ([0, 2], ValueError, r"prompt_index must be 2 integers in \[0, 1\].*got 2"),
        ([0, -1], ValueError, "prompt_index must be .*got -1"),
        (torch.tensor([-1, 0]), ValueError, "prompt_index must be .*got -1"),
        ([0, 2**70], ValueError, "prompt_index must be .*got 1180591620717411303424"),
        ([0], ValueError, r"prompt_index must be .*got shape \[1\]"),
        ([0.5, 1.0], TypeError, "prompt_index must be .*got an element 0.5"),
        (torch.tensor([0.0, 1.0]), TypeError, "prompt_index must be .*torch.float32 tensor"),
        ([True, False], TypeError, "prompt_index must be .*got an element True"),
        ("01", TypeError, "prompt_index must be .*got str"),
        (["0", "1"], TypeError, "prompt_index must be .*got an element '0'"),
        (1.0, TypeError, "prompt_index must be .*got float"),
        (torch.tensor([0, 1], device="meta"), ValueError, "prompt_index is on meta but the engine is on cpu"),
    ],
)
def test_bad_prompt_index(engine, good, prompt_index, exc, pattern):
    z0, emb, _ = good
    with pytest.raises(exc, match=pattern):
        engine.score(z0, emb, prompt_index=prompt_index)
    with pytest.raises(exc, match=pattern):
        engine.features(z0, engine.condition(*emb), prompt_index=prompt_index)


_ANY_INDEX = st.one_of(
    st.lists(st.integers(-3, 4), min_size=0, max_size=4),
    st.lists(st.one_of(st.integers(-3, 4), st.floats(allow_nan=True), st.text(max_size=2), st.booleans()), max_size=4),
    st.integers(),
    st.floats(),
    st.text(max_size=3),
    st.lists(st.integers(0, 1), min_size=2, max_size=2).map(torch.tensor),
    st.lists(st.floats(-2, 2), min_size=2, max_size=2).map(torch.tensor),
)


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt_index=_ANY_INDEX)
def test_prompt_index_property(engine, good, prompt_index):
    """Any prompt_index scores iff it is 2 ints in [0, 2); otherwise a ValueError/TypeError that names it."""
    z0, emb, noise = good
    valid = (
        isinstance(prompt_index, (list, torch.Tensor))
        and len(prompt_index) == 2
        and all(not isinstance(v, (bool, float, str)) for v in list(prompt_index))
        and not (isinstance(prompt_index, torch.Tensor) and prompt_index.is_floating_point())
        and all(0 <= int(v) < 2 for v in prompt_index)
    )
    if valid:
        rewards = engine.score(z0, emb, noise=noise, prompt_index=prompt_index)
        rows = torch.as_tensor(prompt_index).long()
        expected = engine.score(z0, (emb[0][rows], emb[1][rows]), noise=noise)
        torch.testing.assert_close(rewards, expected, rtol=FP32_REL_TOL, atol=FP32_REL_TOL)
    else:
        with pytest.raises((ValueError, TypeError), match="prompt_index"):
            engine.score(z0, emb, noise=noise, prompt_index=prompt_index)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(t=0.0), r"RewardConfig: t: got 0.0, expected a value > 0.0"),
        (dict(t=1.5), r"RewardConfig: t: got 1.5, expected a value < 1.0"),
        (dict(layers=(2, 1)), r"layers: got \[2, 1\], expected .*strictly increasing without duplicates"),
        (dict(layers=(1, 1)), "strictly increasing without duplicates"),
        (dict(layers=(-1, 1)), "block indices >= 0"),
        (dict(layers=()), r"layers: got \[\], expected at least 1 item"),
        (dict(head_hidden=(0,)), r"head_hidden: got \[0\], expected sizes in \[1, 65536\]"),
        (dict(head_hidden=(10**8,)), r"head_hidden: got \[100000000\], expected sizes in \[1, 65536\]"),
        (dict(head_hidden="64"), "head_hidden: got '64', expected a list"),
        (dict(layers=(1.5, 2)), r"layers\[0\]: got 1.5, expected an integer"),
        (dict(t="0.1"), "t: got '0.1', expected a number"),
        (dict(reward_mean=float("nan")), "reward_mean: got nan, expected a finite number"),
        (dict(reward_std=float("inf")), "reward_std: got inf, expected a finite number"),
        (dict(head_outputs=True), "head_outputs: got True, expected an integer"),
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
    with pytest.raises(ValueError, match="BackboneConfig: qk_norm: got 'layer_norm', expected one of 'rms_norm'"):
        BackboneConfig(qk_norm="layer_norm")
    with pytest.raises(ValueError, match=r"dual_attention_layers: got \[40\], expected block indices in \[0, 37\]"):
        BackboneConfig(dual_attention_layers=(40,))
    with pytest.raises(ValueError, match=r"num_layers: got 1000000000, expected a value <= 256"):
        BackboneConfig(num_layers=10**9)


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


# ------------------------------------------------------------------------------------------------- devices


def test_device_names_are_checked(monkeypatch, tiny_transformer, tmp_path):
    checkpoint = RewardEngine.from_preset("tiny", dtype=torch.float32).save_pretrained(
        tmp_path / "ckpt", include_backbone=True
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for make in (
        lambda: RewardEngine.from_preset("tiny", device="cuda"),
        lambda: RewardEngine.from_pretrained(checkpoint, dtype=torch.float32, device="cuda"),
        lambda: RewardEngine.from_diffusers(tiny_transformer, device="cuda:0"),
        lambda: resolve_device("cuda"),
    ):
        with pytest.raises(ValueError, match="CUDA is not available here.*pass device='cpu'"):
            make()
    with pytest.raises(ValueError, match="device 'gpu' is not a device name"):
        RewardEngine.from_preset("tiny", device="gpu")
    with pytest.raises(TypeError, match="device must be a torch.device"):
        RewardEngine.from_preset("tiny", device=1.5)
    assert resolve_device(None) == torch.device("cpu")


# -------------------------------------------------------------------------------------------- conditionings


def test_conditioning_from_an_engine_with_other_weights_is_refused(engine, good):
    """Same preset, same shapes, dtype and t, other weights: only the tag tells them apart."""
    z0, (pe, po), noise = good
    twin = RewardEngine.from_preset("tiny", dtype=torch.float32, kernels_backend="torch", seed=1)
    with pytest.raises(ValueError, match="made by another RewardEngine"):
        engine.score(z0, twin.condition(pe, po), noise=noise)
    with pytest.raises(ValueError, match="made by another RewardEngine"):  # select() keeps the tag
        engine.score(z0, twin.condition(pe, po).select(torch.tensor([0, 0])), noise=noise)
    engine.score(z0, engine.condition(pe, po), noise=noise)  # its own conditioning is accepted


def test_conditioning_made_before_a_weight_update_is_refused(good):
    z0, (pe, po), noise = good
    engine = RewardEngine.from_preset("tiny", dtype=torch.float32, kernels_backend="torch")
    cond = engine.condition(pe, po)
    engine.score(z0, cond, noise=noise)  # scoring itself changes nothing
    with torch.no_grad():
        engine.backbone.transformer_blocks[2].norm1.linear.weight.mul_(1.01)  # what an optimizer step does
    with pytest.raises(ValueError, match="made before the engine's prompt-path weights changed"):
        engine.score(z0, cond, noise=noise)
    engine.score(z0, engine.condition(pe, po), noise=noise)


def test_hand_made_conditioning(engine, good):
    """Built by hand from fitting tensors: accepted when finite, refused with NaN/Inf anywhere."""
    z0, (pe, po), noise = good
    made = engine.condition(pe, po)
    by_hand = Conditioning(context=made.context.clone(), modulation=made.modulation.clone(), t=made.t)
    torch.testing.assert_close(engine.score(z0, by_hand, noise=noise), engine.score(z0, made, noise=noise))
    for field in ("context", "modulation"):
        bad = by_hand.select(torch.tensor([0, 1]))
        getattr(bad, field)[1, 0, 3] = float("nan")
        with pytest.raises(ValueError, match=f"Conditioning.{field} contains NaN or Inf"):
            engine.score(z0, bad, noise=noise)


@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(exponent=st.integers(0, 38), which=st.sampled_from(["pooled", "prompt_embeds", "latents"]))
def test_huge_finite_inputs_never_give_nan_rewards(engine, good, exponent, which):
    """Finite inputs scaled up to 1e38: finite rewards, or a ValueError saying what overflowed; never NaN."""
    z0, (pe, po), noise = good
    inputs = {"latents": z0, "prompt_embeds": pe, "pooled": po}
    inputs[which] = inputs[which] * 10.0**exponent
    z0, pe, po = inputs.values()
    try:
        rewards = engine.score(z0, (pe, po), noise=noise)
    except ValueError as err:
        assert "NaN or Inf" in str(err) or "overflowed" in str(err)
    else:
        assert torch.isfinite(rewards).all()
