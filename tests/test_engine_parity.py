"""The engine's features equal diffusers' SD3Transformer2DModel (hooked) on tiny random configs of every variant."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_VARIANTS, make_diffusers_transformer, random_inputs, reference_features, rel_err
from torch.utils.flop_counter import FlopCounterMode

from engine import RewardEngine


@pytest.fixture(scope="module", params=sorted(TINY_VARIANTS))
def variant(request):
    return request.param, make_diffusers_transformer(seed=1, **TINY_VARIANTS[request.param])


@pytest.mark.parametrize("layers", [(1, 3), (0, 2)], ids=["deepest=last", "deepest<last"])
@pytest.mark.parametrize("text_len", [11, 23])
def test_fp32_parity_with_diffusers(variant, layers, text_len):
    _, model = variant
    engine = RewardEngine.from_diffusers(model, layers=layers, t=0.1, kernels_backend="torch")
    z0, prompt_embeds, pooled, noise = random_inputs(batch=3, h=12, w=8, text_len=text_len, seed=text_len)
    ours = engine.features(z0, (prompt_embeds, pooled), noise=noise)
    ref = reference_features(model, z0, prompt_embeds, pooled, noise, 0.1, layers)
    assert ours.dtype == torch.float32 and ours.shape == (3, len(layers), 32)
    assert rel_err(ours, ref) <= 1e-4


def test_bf16_within_twice_diffusers_bf16_error(variant):
    _, model = variant
    layers = (1, 3)
    z0, prompt_embeds, pooled, noise = random_inputs(batch=3, h=12, w=8, text_len=11, seed=5)
    ref32 = reference_features(model, z0, prompt_embeds, pooled, noise, 0.1, layers)
    model_bf16 = make_diffusers_transformer(seed=1, dtype=torch.bfloat16, **TINY_VARIANTS[variant[0]])
    ref16 = reference_features(model_bf16, z0, prompt_embeds, pooled, noise, 0.1, layers, dtype=torch.bfloat16)
    engine = RewardEngine.from_diffusers(model, layers=layers, dtype=torch.bfloat16, kernels_backend="torch")
    ours = engine.features(z0, (prompt_embeds, pooled), noise=noise)
    err_ref, err_ours = rel_err(ref16, ref32), rel_err(ours, ref32)
    print(f"\nbf16 error vs fp32 reference: diffusers {err_ref:.2e}, engine {err_ours:.2e}")
    assert 0 < err_ref < 0.1
    assert err_ours <= 2 * err_ref + 1e-6


def test_t_and_layers_are_respected(tiny_transformer):
    z0, prompt_embeds, pooled, noise = random_inputs(seed=3)
    engine = RewardEngine.from_diffusers(tiny_transformer, layers=(0, 2), t=0.3, kernels_backend="torch")
    ref = reference_features(tiny_transformer, z0, prompt_embeds, pooled, noise, 0.3, (0, 2))
    assert rel_err(engine.features(z0, (prompt_embeds, pooled), noise=noise), ref) <= 1e-4
    wrong_t = reference_features(tiny_transformer, z0, prompt_embeds, pooled, noise, 0.1, (0, 2))
    assert rel_err(engine.features(z0, (prompt_embeds, pooled), noise=noise), wrong_t) > 1e-3


def test_noise_seed_and_fresh_noise(tiny_transformer):
    engine = RewardEngine.from_diffusers(tiny_transformer, layers=(1, 3), kernels_backend="torch")
    z0, prompt_embeds, pooled, _ = random_inputs(seed=4)
    a = engine.score(z0, (prompt_embeds, pooled), seed=7)
    b = engine.score(z0, (prompt_embeds, pooled), seed=7)
    c = engine.score(z0, (prompt_embeds, pooled), seed=8)
    d = engine.score(z0, (prompt_embeds, pooled))
    e = engine.score(z0, (prompt_embeds, pooled))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(d, e)
    # An image scored alone (with its index as offset) sees the same noise as inside the batch.
    alone = engine.score(z0[2:3], (prompt_embeds[2:3], pooled[2:3]), seed=7, image_offset=2)
    torch.testing.assert_close(alone, a[2:3], rtol=1e-5, atol=1e-6)


def test_engine_does_less_work_than_the_full_model(capsys):
    model = make_diffusers_transformer(seed=2, num_layers=8, dual_attention_layers=())
    layers = (1, 3)
    engine = RewardEngine.from_diffusers(model, layers=layers, kernels_backend="torch")
    full_params = sum(p.numel() for p in model.parameters())
    ours_params = sum(p.numel() for p in engine.backbone.parameters())
    z0, prompt_embeds, pooled, noise = random_inputs(batch=2, h=16, w=16, text_len=20, seed=9)
    with FlopCounterMode(display=False) as ours:
        engine.features(z0, (prompt_embeds, pooled), noise=noise)
    with FlopCounterMode(display=False) as full, torch.no_grad():
        model(
            hidden_states=z0,
            encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled,
            timestep=torch.full((2,), 100.0),
        )
    param_ratio = ours_params / full_params
    flop_ratio = ours.get_total_flops() / full.get_total_flops()
    with capsys.disabled():
        print(f"\nengine/full: parameters {param_ratio:.3f}, forward FLOPs {flop_ratio:.3f} (deepest block 3 of 8)")
    # Blocks 4..7, norm_out and proj_out are gone, and block 3 lacks its text query/output/FFN weights.
    first_four = sum(
        p.numel()
        for name, p in model.named_parameters()
        if not name.startswith(
            (
                "transformer_blocks.4",
                "transformer_blocks.5",
                "transformer_blocks.6",
                "transformer_blocks.7",
                "norm_out",
                "proj_out",
            )
        )
    )
    block3_text = sum(
        p.numel()
        for name, p in model.named_parameters()
        if name.startswith(
            (
                "transformer_blocks.3.ff_context",
                "transformer_blocks.3.attn.add_q_proj",
                "transformer_blocks.3.attn.to_add_out",
                "transformer_blocks.3.attn.norm_added_q",
            )
        )
    )
    assert ours_params == first_four - block3_text
    # FLOPs: blocks 0..2 in full plus the image rows of block 3, well under half of 8 blocks.
    assert flop_ratio < 0.5
    # And no less than the work that is really needed: blocks 0..2 in full.
    assert flop_ratio > 3 / 8 * 0.8


@pytest.mark.parametrize("layers", [(1, 3), (0, 2)], ids=["deepest=last", "deepest<last"])
def test_triton_kernels_end_to_end_equal_torch(layers):
    """DITREWARD_KERNELS=triton (interpreted on CPU) gives the torch path's features on a tiny dual-attention model."""
    model = make_diffusers_transformer(seed=4, dual_attention_layers=(0, 1))
    z0, prompt_embeds, pooled, noise = random_inputs(batch=2, h=6, w=10, text_len=7, seed=6)
    ref = RewardEngine.from_diffusers(model, layers=layers, kernels_backend="torch")
    fast = RewardEngine.from_diffusers(model, layers=layers, kernels_backend="triton")
    a = ref.features(z0, (prompt_embeds, pooled), noise=noise)
    b = fast.features(z0, (prompt_embeds, pooled), noise=noise)
    assert rel_err(b, a) <= 1e-5
    # seeded noise: the torch reference reproduces the in-kernel Philox stream
    assert (
        rel_err(fast.features(z0, (prompt_embeds, pooled), seed=3), ref.features(z0, (prompt_embeds, pooled), seed=3))
        <= 1e-5
    )
