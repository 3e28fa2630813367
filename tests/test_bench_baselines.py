"""CPU tests for the benchmark harness and the in-process baselines (tiny variants, random weights)."""

from __future__ import annotations

import inspect
from collections import Counter

import pytest
import torch

from bench.baselines import (
    BaselineUnavailable,
    DiffusersHookReward,
    build_sd3_transformer,
    compile_modes,
    compile_regional,
    compile_whole,
    is_engine_fp8_linear,
    quantize_torchao_fp8,
    torchao_fp8_config,
)
from bench.harness import MemoryPeak, Timing, environment_info, measure_peak, time_fn
from bench.hpsv3 import HPSv3Reward, resize_to_448

# Every SD3 feature (qk RMSNorm, dual attention in block 0, the context_pre_only last block) at toy widths: D = 32.
TINY_SD3 = {
    "num_layers": 4,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "joint_attention_dim": 96,
    "caption_projection_dim": 32,
    "pooled_projection_dim": 80,
    "pos_embed_max_size": 32,
    "sample_size": 32,
    "qk_norm": "rms_norm",
    "dual_attention_layers": (0,),
}


@pytest.fixture(scope="module")
def tiny_transformer():
    torch.manual_seed(0)
    return build_sd3_transformer(TINY_SD3, torch.float32, "cpu")


@pytest.fixture(scope="module")
def tiny_hpsv3():
    return HPSv3Reward("tiny", dtype=torch.float32, device="cpu")


def _sd3_inputs(batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 16, 16, 16, generator=gen)
    prompt_embeds = torch.randn(batch, 21, 96, generator=gen)
    pooled = torch.randn(batch, 80, generator=gen)
    noise = torch.randn(batch, 16, 16, 16, generator=gen)
    return latents, prompt_embeds, pooled, noise


def _manual_features(transformer, layers, t, latents, prompt_embeds, pooled, noise) -> torch.Tensor:
    """Eq. 1–4 by walking diffusers' submodules directly, no hooks."""
    z_t = (1 - t) * latents + t * noise
    timestep = torch.full((latents.shape[0],), 1000 * t)
    hidden = transformer.pos_embed(z_t)
    temb = transformer.time_text_embed(timestep, pooled)
    context = transformer.context_embedder(prompt_embeds)
    pooled_layers = []
    for index, block in enumerate(transformer.transformer_blocks[: max(layers) + 1]):
        context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)
        if index in layers:
            pooled_layers.append(hidden.double().mean(dim=1))
    return torch.stack(pooled_layers, dim=1)


def test_build_sd3_transformer_is_random_finite_with_real_sincos(tiny_transformer):
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    for name, param in tiny_transformer.named_parameters():
        assert torch.isfinite(param).all(), name
    assert all(p.abs().sum() > 0 for p in tiny_transformer.parameters() if p.numel() > 1)
    expected = get_2d_sincos_pos_embed(32, 32, base_size=16, output_type="pt").float()
    torch.testing.assert_close(tiny_transformer.pos_embed.pos_embed[0], expected)


def test_hook_features_match_manual_block_loop(tiny_transformer):
    layers, t = (1, 3), 0.1
    reward = DiffusersHookReward(tiny_transformer, layers, t)
    try:
        latents, prompt_embeds, pooled, noise = _sd3_inputs(batch=3)
        features = reward.features(latents, prompt_embeds, pooled, noise)
        assert features.shape == (3, len(layers), 32)
        assert features.dtype == torch.float32
        assert torch.isfinite(features).all()
        with torch.inference_mode():
            expected = _manual_features(tiny_transformer, layers, t, latents, prompt_embeds, pooled, noise)
        torch.testing.assert_close(features.double(), expected, rtol=1e-5, atol=1e-5)

        # One prompt serves a whole batch (GRPO groups), and score reduces to [B].
        shared = reward.features(latents, prompt_embeds[:1], pooled[:1], noise)
        expected_shared = reward.features(latents, prompt_embeds[:1].expand(3, -1, -1), pooled[:1].expand(3, -1), noise)
        torch.testing.assert_close(shared, expected_shared)
        rewards = reward.score(latents, prompt_embeds, pooled, noise)
        assert rewards.shape == (3,) and rewards.dtype == torch.float32 and torch.isfinite(rewards).all()
    finally:
        reward.remove()
    assert not any(block._forward_hooks for block in tiny_transformer.transformer_blocks)


def test_hook_reward_rejects_bad_arguments(tiny_transformer):
    with pytest.raises(ValueError, match="out of range"):
        DiffusersHookReward(tiny_transformer, (4,), 0.1)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        DiffusersHookReward(tiny_transformer, (1,), 1.5)


def test_compile_regional_compiles_every_block():
    transformer = build_sd3_transformer(TINY_SD3, torch.float32, "cpu")
    compile_regional(transformer)
    # nn.Module.compile stores the compiled wrapper; nothing runs (compiling on the CPU would take minutes).
    assert all(block._compiled_call_impl is not None for block in transformer.transformer_blocks)


@pytest.mark.slow  # inductor compiles the whole model's C++ kernels: about a minute on two CPU cores
def test_compile_whole_matches_eager():
    # Two blocks (the dual-attention one and the context_pre_only last one): every kind of block, half the compile.
    torch.manual_seed(0)
    transformer = build_sd3_transformer({**TINY_SD3, "num_layers": 2}, torch.float32, "cpu")
    reward = DiffusersHookReward(transformer, (0, 1), 0.1)
    try:
        inputs = _sd3_inputs(batch=2)
        eager_features = reward.features(*inputs)
        eager_rewards = reward.score(*inputs)
        (mode,) = compile_modes("cpu")
        compile_whole(transformer, mode)
        features = reward.features(*inputs)  # compiles here, the hooks traced into the graph
        rewards = reward.score(*inputs)
    finally:
        reward.remove()
    assert transformer._compiled_call_impl is not None
    # fp32 both ways: only the order of inductor's fused reductions differs
    torch.testing.assert_close(features, eager_features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rewards, eager_rewards, rtol=1e-5, atol=1e-5)


def test_compile_modes_are_the_cuda_graph_modes_on_a_gpu():
    assert compile_modes("cuda") == ("reduce-overhead", "max-autotune")
    assert compile_modes("cpu") == ("default",)


def test_torchao_filter_selects_the_linears_the_engine_quantises(tiny_transformer):
    from engine import RewardEngine
    from engine.runtime.fp8 import Float8Linear, quantize_fp8

    selected = {name for name, m in tiny_transformer.named_modules() if is_engine_fp8_linear(m, name)}
    block_linears = {
        f"transformer_blocks.{i}.{name}"
        for i, block in enumerate(tiny_transformer.transformer_blocks)
        for name, m in block.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    adaln = {name for name in block_linears if name.split(".")[2] in ("norm1", "norm1_context")}
    assert adaln and selected == block_linears - adaln  # nothing outside the blocks (embedders, proj_out) either

    # The same weights, counted on the engine's own FP8 model (its projections fused, e.g. q|k|v in one linear):
    # per block the e4m3 weight elements agree, except that the deepest block has no text queries in the engine.
    engine = RewardEngine.from_diffusers(tiny_transformer, layers=(1, 3), device="cpu", dtype="fp32")
    quantize_fp8(engine.backbone, require_fp8_gpu=False)
    width = TINY_SD3["num_attention_heads"] * TINY_SD3["attention_head_dim"]
    for i, block in enumerate(engine.backbone.transformer_blocks):
        ours = sum(m.in_features * m.out_features for m in block.modules() if isinstance(m, Float8Linear))
        theirs = sum(
            m.weight.numel()
            for name, m in tiny_transformer.named_modules()
            if name.startswith(f"transformer_blocks.{i}.") and name in selected
        )
        assert ours == theirs - (width * width if i == 3 else 0), f"block {i}"


def test_torchao_fp8_config_when_torchao_is_installed():
    torchao_quantization = pytest.importorskip("torchao.quantization")
    config = torchao_fp8_config()
    assert isinstance(config, torchao_quantization.Float8DynamicActivationFloat8WeightConfig)
    granularity = config.granularity if isinstance(config.granularity, list | tuple) else [config.granularity]
    assert granularity and all(isinstance(g, torchao_quantization.PerRow) for g in granularity)


def test_torchao_fp8_skips_cleanly_off_an_fp8_gpu():
    transformer = build_sd3_transformer({**TINY_SD3, "num_layers": 2}, torch.float32, "cpu")
    before = {name: type(m) for name, m in transformer.named_modules()}
    with pytest.raises(BaselineUnavailable, match="skipped: needs CUDA sm≥8.9"):
        quantize_torchao_fp8(transformer)
    assert {name: type(m) for name, m in transformer.named_modules()} == before  # untouched


def test_torchao_fp8_config_without_torchao(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # import fails as if not installed
    with pytest.raises(BaselineUnavailable, match="torchao not installed"):
        torchao_fp8_config()


def test_time_fn_rotates_inputs_and_reports_samples():
    calls: Counter[int] = Counter()
    inputs = [torch.full((64, 64), float(i)) for i in range(3)]

    def fn(x: torch.Tensor) -> torch.Tensor:
        calls[int(x[0, 0])] += 1
        return x @ x

    timing = time_fn(fn, inputs, warmup=2, iters=7, device="cpu")
    assert isinstance(timing, Timing)
    assert timing.n == 7 and len(timing.samples_ms) == 7
    assert timing.median_ms > 0 and timing.min_ms <= timing.p10_ms <= timing.median_ms <= timing.p90_ms
    # warm-up takes inputs 0, 1; timed calls take 0, 1, 2, 0, 1, 2, 0.
    assert calls == {0: 4, 1: 3, 2: 2}
    per_image = timing.per_image(4)
    assert per_image.median_ms == pytest.approx(timing.median_ms / 4)
    assert set(timing.to_dict()) >= {"median_ms", "p10_ms", "p90_ms", "n", "samples_ms"}


def test_measure_peak_on_cpu_reports_rss():
    peak = measure_peak(torch.ones, 1024, 1024, device="cpu")
    assert isinstance(peak, MemoryPeak)
    assert peak.allocated_gib is None and peak.nvml_used_gib is None
    assert peak.rss_gib is not None and peak.rss_gib > 0


def test_environment_info_keys():
    info = environment_info()
    expected = {"gpu", "torch", "triton", "diffusers", "transformers", "cuda", "git_commit", "date", "python"}
    assert expected <= set(info)
    assert info["torch"] == torch.__version__
    assert isinstance(info["git_commit"], str) and info["git_commit"]
    assert "host" not in " ".join(info)


def test_hpsv3_tiny_layout_and_scores(tiny_hpsv3):
    config = tiny_hpsv3.config
    assert tiny_hpsv3.input_ids.shape == (480,)
    assert int((tiny_hpsv3.input_ids == config.image_token_id).sum()) == 256
    assert int((tiny_hpsv3.input_ids == config.vision_start_token_id).sum()) == 1
    assert int((tiny_hpsv3.input_ids == config.vision_end_token_id).sum()) == 1

    images = resize_to_448(torch.rand(2, 3, 512, 512))
    assert images.shape == (2, 3, 448, 448)
    pixel_values, grid_thw = tiny_hpsv3.patchify(images)
    assert pixel_values.shape == (2 * 1024, 3 * 2 * 14 * 14)
    assert grid_thw.tolist() == [[1, 32, 32]] * 2
    rewards = tiny_hpsv3.score(images)
    assert rewards.shape == (2,) and rewards.dtype == torch.float32 and torch.isfinite(rewards).all()


def test_hpsv3_position_ids_match_transformers_rope_index(tiny_hpsv3):
    config = tiny_hpsv3.config
    input_ids = tiny_hpsv3.input_ids[None].expand(2, -1)
    grid_thw = torch.tensor([[1, 32, 32]] * 2)
    kwargs = {"image_grid_thw": grid_thw}
    # transformers 5.x takes the modality of each token explicitly; 4.x inferred it from the ids.
    if "mm_token_type_ids" in inspect.signature(tiny_hpsv3.model.get_rope_index).parameters:
        kwargs["mm_token_type_ids"] = (input_ids == config.image_token_id).int()
    position_ids, _ = tiny_hpsv3.model.get_rope_index(input_ids, **kwargs)
    torch.testing.assert_close(position_ids[:, 0], tiny_hpsv3.position_ids)


def test_hpsv3_patchify_matches_the_image_processor(tiny_hpsv3):
    from transformers import Qwen2VLImageProcessor

    # uint8 pixels: without torchvision the processor falls back to a PIL backend that quantises to 8 bits.
    images_u8 = torch.randint(0, 256, (3, 448, 448), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = Qwen2VLImageProcessor()(images=[images_u8], do_resize=False, return_tensors="pt")
    pixel_values, grid_thw = tiny_hpsv3.patchify(images_u8[None].float() / 255)
    assert out["image_grid_thw"].tolist() == grid_thw.tolist()
    torch.testing.assert_close(pixel_values, out["pixel_values"].float(), rtol=1e-4, atol=1e-4)
