"""Conditioning cache, prompt_index, the differentiable reward, the FP8 linear's reference, and bucketing logic."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from conftest import random_inputs, rel_err

from engine import RewardEngine
from engine.runtime.fp8 import Float8Linear, linear_fp8_ref
from kernels.quant import quantize_rowwise


@pytest.fixture(scope="module")
def engine():
    return RewardEngine.from_preset("tiny", dtype=torch.float32, kernels_backend="torch")


def summation_order_tolerance(dtype: torch.dtype) -> float:
    """Relative difference allowed between the same math run as differently shaped matmuls (a prompt conditioned
    once vs once per latent): BLAS blocking, and so summation order, depends on the shape and the CPU, and moves
    each sum by a few ulps. 64 ulps of the dtype leaves margin on any CPU; on the tiny random model a wrong prompt
    moves the features by ~1e-4 relative, 11x that in fp32 (checked below, so the comparison can fail)."""
    return 64 * torch.finfo(dtype).eps


def assert_equal_up_to_summation_order(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert rel_err(actual, expected) <= summation_order_tolerance(expected.dtype)


def test_conditioning_cache_matches_uncached(engine):
    z0, pe, po, noise = random_inputs(batch=6, h=8, w=8, text_len=9, seed=21)
    group = torch.tensor([0, 0, 0, 1, 1, 1])  # two prompts, a GRPO group of 3 latents each
    pe, po = pe[:2], po[:2]
    cond = engine.condition(pe, po)
    cached = engine.features(z0, cond, noise=noise, prompt_index=group)
    assert_equal_up_to_summation_order(cached, engine.features(z0, (pe[group], po[group]), noise=noise))
    swapped = engine.features(z0, cond, noise=noise, prompt_index=1 - group)
    assert rel_err(swapped, cached) > 10 * summation_order_tolerance(cached.dtype)  # the comparison can fail
    # one prompt for the whole batch
    single = engine.features(z0[:3], (pe[:1], po[:1]), noise=noise[:3])
    assert_equal_up_to_summation_order(single, engine.features(z0[:3], (pe[[0, 0, 0]], po[[0, 0, 0]]), noise=noise[:3]))
    # the same conditioning, the same batch: the same ops on the same shapes, bit-identical
    assert torch.equal(cached, engine.features(z0, cond, noise=noise, prompt_index=group))


def test_conditioning_does_not_depend_on_its_batch(engine):
    """A prompt's conditioning made alongside 37 other prompts equals the one made in a batch of 2 up to summation
    order: the adaLN GEMMs of a [39, D] and a [2, D] batch are blocked differently (here too: not bit-equal)."""
    _, pe, po, _ = random_inputs(batch=39, h=8, w=8, text_len=9, seed=22)
    small, large = engine.condition(pe[:2], po[:2]), engine.condition(pe, po)
    assert_equal_up_to_summation_order(large.modulation[:2], small.modulation)
    assert_equal_up_to_summation_order(large.context[:2], small.context)


def test_fp64_engine_scores_without_grad():
    """fp64 (gradient checks) also on the inference path, whose pooling writes into a preallocated feature buffer."""
    fp64 = RewardEngine.from_preset("tiny", dtype="fp64", kernels_backend="torch")
    fp32 = RewardEngine.from_preset("tiny", dtype="fp32", kernels_backend="torch")
    z0, pe, po, noise = random_inputs(batch=2, h=8, w=8, text_len=5, seed=17)
    r64 = fp64.score(z0.double(), (pe.double(), po.double()), noise=noise.double())
    assert r64.dtype == torch.float64
    torch.testing.assert_close(r64.float(), fp32.score(z0, (pe, po), noise=noise), rtol=1e-4, atol=1e-5)
    with torch.enable_grad():  # and the grad path (its own pooling, autograd-capable kernels) agrees with it
        grad_path = fp64.score(z0.double(), (pe.double(), po.double()), noise=noise.double(), grad=True)
        assert_equal_up_to_summation_order(grad_path.detach(), r64)


def test_reward_gradient_reaches_latents(engine):
    z0, pe, po, noise = random_inputs(batch=2, h=8, w=8, text_len=5, seed=3)
    z0 = z0.clone().requires_grad_(True)
    cond = engine.condition(pe, po)  # made without grad, usable by a differentiable score
    r = engine.score(z0, cond, noise=noise, grad=True)
    (grad,) = torch.autograd.grad(r.sum(), z0)
    assert grad.abs().sum() > 0 and torch.isfinite(grad).all()
    # central finite difference along the gradient direction (fp32, tiny model)
    d = grad / grad.norm()
    h = 1e-2
    with torch.no_grad():
        plus = engine.score(z0 + h * d, cond, noise=noise).sum()
        minus = engine.score(z0 - h * d, cond, noise=noise).sum()
    fd = (plus - minus) / (2 * h)
    assert torch.allclose(fd, (grad * d).sum(), rtol=2e-2, atol=1e-5)


def test_backbone_conditioning_weights_get_gradients():
    engine = RewardEngine.from_preset("tiny", dtype=torch.float32, kernels_backend="torch")
    engine.backbone.requires_grad_(True)
    z0, pe, po, noise = random_inputs(batch=2, h=8, w=8, text_len=5, seed=4)
    engine.score(z0, (pe, po), noise=noise, grad=True).sum().backward()
    for name in (
        "context_embedder.weight",
        "time_text_embed.text_embedder.linear_1.weight",
        "transformer_blocks.0.norm1.linear.weight",
    ):
        assert engine.backbone.get_parameter(name).grad is not None, name


def test_float8_linear_matches_its_reference():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48).to(torch.bfloat16)
    x = torch.randn(3, 7, 64, dtype=torch.bfloat16)
    ref = linear_fp8_ref(x, linear.weight, linear.bias)
    try:
        out = Float8Linear(linear)(x)
    except (RuntimeError, NotImplementedError) as e:  # _scaled_mm without a CPU fp8 kernel in this torch build
        pytest.skip(f"torch._scaled_mm unavailable on CPU: {e}")
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)
    # and fp8 is a fair approximation of the bf16 linear (e4m3 has 3 mantissa bits)
    exact = linear(x).float()
    assert float((out.float() - exact).norm() / exact.norm()) < 0.08


def test_weight_only_float8_linear_matches_its_reference():
    """The adaLN linears with `fp8_adaln`: e4m3 weights, bf16 activations; the scale applied to the output."""
    torch.manual_seed(1)
    linear = torch.nn.Linear(96, 6 * 32).to(torch.bfloat16)
    x = torch.randn(3, 96, dtype=torch.bfloat16)
    out = Float8Linear(linear, weight_only=True)(x)
    ref = linear_fp8_ref(x, linear.weight, linear.bias, weight_only=True)
    wq, ws = quantize_rowwise(linear.weight, backend="torch")
    truth = x.double() @ (wq.double() * ws.double()).t() + linear.bias.double()  # exact math, same e4m3 weights
    assert out.dtype == torch.bfloat16 and out.shape == (3, 192)
    # both within bf16 rounding of the result
    assert rel_err(out, truth) <= 2 * rel_err(ref, truth) and rel_err(ref, truth) < 2**-8


def test_fast_accum_reaches_scaled_mm(monkeypatch):
    """fp8_fast_accum is passed to every FP8 GEMM (on the CPU it only changes the call, not the numbers)."""
    from engine.runtime.fp8 import quantize_fp8

    seen = []
    scaled_mm = torch._scaled_mm

    def spy(*args, **kwargs):
        seen.append(kwargs.get("use_fast_accum"))
        return scaled_mm(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    engine = RewardEngine.from_preset("tiny", dtype="bf16", kernels_backend="torch")
    quantize_fp8(engine.backbone, require_fp8_gpu=False, fast_accum=True)
    z0, pe, po, noise = random_inputs(batch=1, h=8, w=8, text_len=5, seed=16)
    engine.features(z0, (pe, po), noise=noise)
    assert seen and all(seen)


def test_quantize_rowwise_roundtrip():
    x = torch.randn(5, 33) * torch.logspace(-3, 3, 5)[:, None]
    q, s = quantize_rowwise(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 1)
    assert float(((q.float() * s - x).norm(dim=1) / x.norm(dim=1)).max()) < 0.05


def test_fp8_needs_a_capable_gpu():
    with pytest.raises(ValueError, match="compute capability >= 8.9"):
        RewardEngine.from_preset("tiny", dtype="fp8")


def test_fp8_engine_refuses_grad():
    from engine.runtime.fp8 import quantize_fp8

    engine = RewardEngine.from_preset("tiny", dtype="bf16", kernels_backend="torch")
    quantize_fp8(engine.backbone, require_fp8_gpu=False)
    engine.fp8 = True  # what dtype="fp8" sets on a capable GPU
    z0, pe, po, noise = random_inputs(batch=1, h=8, w=8, text_len=5, seed=2)
    with pytest.raises(ValueError, match="FP8 path is inference-only"):
        engine.score(z0, (pe, po), noise=noise, grad=True)


def test_graphed_scorer_refuses_cpu(engine):
    from engine.runtime.graphs import GraphedScorer

    with pytest.raises(ValueError, match="need a CUDA engine"):
        GraphedScorer(engine)


def test_gradient_checkpointing_gives_the_same_gradient():
    engine = RewardEngine.from_preset("tiny", dtype=torch.float32, kernels_backend="torch")
    z0, pe, po, noise = random_inputs(batch=2, h=8, w=8, text_len=5, seed=8)
    grads = []
    for ckpt in (False, True):
        engine.backbone.gradient_checkpointing = ckpt
        z = z0.clone().requires_grad_(True)
        engine.score(z, (pe, po), noise=noise, grad=True).sum().backward()
        grads.append(z.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("adaln", [False, True])
def test_fp8_forward_runs_and_tracks_bf16(adaln):
    """The whole FP8 forward (fused-GELU quantisation, pre-quantised activations, weight-only adaLN), run through
    torch._scaled_mm's CPU implementation: close to the same model in bf16."""
    from engine.runtime.fp8 import Float8Linear, quantize_fp8

    bf16 = RewardEngine.from_preset("tiny", dtype="bf16", kernels_backend="torch")
    fp8 = RewardEngine.from_preset("tiny", dtype="bf16", kernels_backend="torch")
    try:
        quantize_fp8(fp8.backbone, adaln=adaln, require_fp8_gpu=False)
        z0, pe, po, noise = random_inputs(batch=3, h=8, w=12, text_len=7, seed=30)
        a = bf16.features(z0, (pe, po), noise=noise)
        b = fp8.features(z0, (pe, po), noise=noise)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"torch._scaled_mm unavailable on CPU: {e}")
    n_fp8 = sum(isinstance(m, Float8Linear) for m in fp8.backbone.modules())
    assert n_fp8 == sum(
        1
        for n, m in bf16.backbone.named_modules()
        if isinstance(m, torch.nn.Linear) and "transformer_blocks" in n and (adaln or ".norm1" not in n)
    )
    err = float((a - b).norm() / a.norm())
    assert 0 < err < 0.1, err


@pytest.mark.parametrize("kept", ["net.2", "to_qkv", "net.0.proj"])
def test_fp8_with_some_linears_kept_bf16(kept):
    """`keep_bf16` mixes FP8 and bf16 linears: each producer quantises only for an FP8 consumer."""
    from engine.runtime.fp8 import Float8Linear, quantize_fp8

    bf16 = RewardEngine.from_preset("tiny", dtype="bf16", kernels_backend="torch")
    mixed = RewardEngine.from_preset("tiny", dtype="bf16", kernels_backend="torch")
    quantize_fp8(mixed.backbone, require_fp8_gpu=False, keep_bf16=lambda block, name: name.endswith(kept))
    z0, pe, po, noise = random_inputs(batch=2, h=8, w=8, text_len=5, seed=14)
    try:
        a = bf16.features(z0, (pe, po), noise=noise)
        b = mixed.features(z0, (pe, po), noise=noise)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"torch._scaled_mm unavailable on CPU: {e}")
    kept_modules = [n for n, m in mixed.backbone.named_modules() if n.endswith(kept)]
    assert kept_modules and not any(isinstance(mixed.backbone.get_submodule(n), Float8Linear) for n in kept_modules)
    assert any(isinstance(m, Float8Linear) for m in mixed.backbone.modules())
    assert 0 < float((a - b).norm() / a.norm()) < 0.1


def test_batch_buckets_pad_and_split():
    from engine.runtime.graphs import bucket_for, chunks

    buckets = (1, 2, 4, 8, 16, 32)
    assert [bucket_for(b, buckets) for b in (1, 2, 3, 5, 16, 17, 24, 32)] == [1, 2, 4, 8, 16, 32, 32, 32]
    assert chunks(24, buckets) == [(0, 24, 32)]  # a GRPO group of 24: one graph, 8 padding rows dropped
    assert chunks(70, buckets) == [(0, 32, 32), (32, 64, 32), (64, 70, 8)]
    assert sum(hi - lo for lo, hi, _ in chunks(70, buckets)) == 70
    from engine.runtime.graphs import DEFAULT_BUCKETS

    # GRPO groups of 12, 16 and 24 latents run unpadded with the default buckets
    assert [bucket_for(b, DEFAULT_BUCKETS) for b in (12, 16, 24, 20)] == [12, 16, 24, 24]


def test_fp8_fused_kernels_end_to_end_equal_the_torch_path():
    """The FP8 forward on the Triton kernels (interpreted on CPU: adaLN ops emitting e4m3, the GELU and the strided
    attention-output quantisation) equals the same FP8 forward on the torch references, on a dual-attention model.
    Activations are fp32 here: the CPU interpreter's bf16 casts truncate (a 2% drift over a bf16 forward that the GPU
    does not show), which would hide the comparison."""
    from conftest import make_diffusers_transformer

    from engine.runtime.fp8 import quantize_fp8

    model = make_diffusers_transformer(seed=5, dual_attention_layers=(0, 1))
    z0, pe, po, noise = random_inputs(batch=3, h=6, w=10, text_len=7, seed=31)
    exact = RewardEngine.from_diffusers(model, layers=(1, 3), dtype="fp32", kernels_backend="torch")
    exact = exact.features(z0, (pe, po), noise=noise)
    feats = {}
    for backend in ("torch", "triton"):
        engine = RewardEngine.from_diffusers(model, layers=(1, 3), dtype="fp32", kernels_backend=backend)
        try:
            quantize_fp8(engine.backbone, require_fp8_gpu=False)
            feats[backend] = engine.features(z0, (pe, po), noise=noise)
        except (RuntimeError, NotImplementedError) as e:
            pytest.skip(f"torch._scaled_mm unavailable on CPU: {e}")

    assert rel_err(feats["triton"], feats["torch"]) <= 1e-5  # same e4m3 codes, fp32 summation order aside
    assert 1e-3 < rel_err(feats["torch"], exact) < 0.1  # and both really are quantised


def test_adaln_on_host_gives_the_same_rewards_and_checkpoints(tmp_path):
    """adaln_on_host=True: the adaLN linears stream from host memory in condition() (on a CPU engine, through the
    same functional_call path), rewards and saved weights unchanged, gradients still reach them (fine-tuning)."""
    from engine.model.layers import AdaLN

    z0, pe, po, noise = random_inputs(batch=3, h=8, w=8, text_len=6, seed=12)
    plain = RewardEngine.from_preset("tiny", dtype=torch.float32, kernels_backend="torch")
    host = RewardEngine.from_preset("tiny", dtype=torch.float32, kernels_backend="torch", adaln_on_host=True)
    adalns = [m for m in host.backbone.modules() if isinstance(m, AdaLN)]
    assert adalns and all(m.host_resident for m in adalns)
    assert all(p.device.type == "cpu" for m in adalns for p in m.parameters())
    assert host.adaln_host_bytes == 0  # nothing left a device: a CPU engine's weights were in host memory already
    assert torch.equal(host.score(z0, (pe, po), noise=noise), plain.score(z0, (pe, po), noise=noise))
    assert host.backbone.state_dict().keys() == plain.backbone.state_dict().keys()
    host.save_pretrained(tmp_path / "ckpt", include_backbone=True)
    again = RewardEngine.from_pretrained(tmp_path / "ckpt", dtype=torch.float32, kernels_backend="torch")
    assert torch.equal(again.score(z0, (pe, po), noise=noise), plain.score(z0, (pe, po), noise=noise))
    host.backbone.requires_grad_(True)
    host.score(z0, (pe, po), noise=noise, grad=True).sum().backward()
    assert adalns[0].linear.weight.grad is not None and adalns[0].linear.weight.grad.abs().sum() > 0
    # .to() moves and casts the rest of the model; the host-resident weights stay put and are cast as they stream
    host.to(torch.float64)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for m in adalns for p in m.parameters())
    assert host.backbone.context_embedder.weight.dtype == torch.float64
    plain.to(torch.float64)
    with torch.no_grad():
        args = (z0.double(), (pe.double(), po.double()))
        assert torch.equal(host.score(*args, noise=noise.double()), plain.score(*args, noise=noise.double()))


def test_fp8_adaln_weights_on_host():
    """e4m3 adaLN weights (weight-only Float8Linear: buffers + bias) stream from the host the same way."""
    from engine.runtime.fp8 import quantize_fp8

    z0, pe, po, noise = random_inputs(batch=2, h=8, w=8, text_len=5, seed=15)
    feats = []
    for on_host in (False, True):
        engine = RewardEngine.from_preset("tiny", dtype="bf16", kernels_backend="torch")
        quantize_fp8(engine.backbone, adaln=True, require_fp8_gpu=False)
        if on_host:
            engine.backbone.adaln_on_host()
        try:
            feats.append(engine.features(z0, (pe, po), noise=noise))
        except (RuntimeError, NotImplementedError) as e:
            pytest.skip(f"torch._scaled_mm unavailable on CPU: {e}")
    assert torch.equal(feats[0], feats[1])


def test_adaln_on_host_warns_once_when_scoring_uncached():
    engine = RewardEngine.from_preset("tiny", dtype=torch.float32, kernels_backend="torch", adaln_on_host=True)
    engine.adaln_host_bytes = 3 * 2**30  # what a GPU engine would have moved off its device
    z0, pe, po, noise = random_inputs(batch=2, h=8, w=8, text_len=5, seed=13)
    with pytest.warns(RuntimeWarning, match=r"streams 3.0 GiB .* engine.condition"):
        engine.score(z0, (pe, po), noise=noise)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.score(z0, (pe, po), noise=noise)  # once only
        engine.score(z0, engine.condition(pe, po), noise=noise)  # the cached path never warns


def test_kernels_get_contiguous_modulation_vectors(engine, monkeypatch):
    # each block lays its modulation out [n, B, D] once, so the adaLN ops never copy a strided [B, D] slice
    import kernels

    seen = []
    for name in ("layernorm_modulate", "gated_residual_layernorm_modulate", "gated_residual"):
        op = getattr(kernels, name)

        def recording(*args, op=op, name=name, **kwargs):
            vectors = args[1:] if name == "layernorm_modulate" else args[2:]
            seen.extend((name, v.is_contiguous()) for v in vectors)
            return op(*args, **kwargs)

        monkeypatch.setattr(kernels, name, recording)
    z0, pe, po, noise = random_inputs(batch=3, h=8, w=8, text_len=9, seed=5)
    engine.score(z0, (pe, po), noise=noise)
    assert {name for name, _ in seen} == {"layernorm_modulate", "gated_residual_layernorm_modulate", "gated_residual"}
    assert all(contiguous for _, contiguous in seen), [s for s in seen if not s[1]]


def _clear_flash_attn_caches() -> None:
    from engine.runtime import attention

    for fn in vars(attention).values():
        if callable(fn) and hasattr(fn, "cache_clear"):
            fn.cache_clear()


@pytest.mark.parametrize(
    "fa3, fa2, capability, expected",
    [
        (True, True, (9, 0), "flash_attn"),  # FA3 on Hopper
        (True, False, (9, 0), "flash_attn"),
        (False, True, (9, 0), "sdpa_cudnn_first"),  # FA2 alone: cuDNN is faster at head dim 64
        (False, False, (9, 0), "sdpa_cudnn_first"),
        (True, True, (8, 0), "sdpa_cudnn_first"),  # FA3 is Hopper-only
        (False, True, (10, 0), "sdpa_cudnn_first"),
    ],
)
def test_auto_attention_resolution(monkeypatch, fa3, fa2, capability, expected):
    """`auto` means what engine.runtime.attention's docstring says, whichever flash-attn packages import (faked in
    sys.modules: None there makes an import fail)."""
    from engine.runtime import attention

    def fake(name: str) -> types.ModuleType:
        module = types.ModuleType(name)
        module.flash_attn_func = lambda q, k, v: q
        return module

    monkeypatch.setitem(sys.modules, "flash_attn_interface", fake("flash_attn_interface") if fa3 else None)
    monkeypatch.setitem(sys.modules, "flash_attn", fake("flash_attn") if fa2 else None)
    monkeypatch.delenv("DITREWARD_ATTENTION", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    _clear_flash_attn_caches()
    try:
        assert attention.resolve_backend("auto", torch.device("cuda")) == expected
        assert attention.resolve_backend(None, torch.device("cpu")) == "sdpa"
        assert attention.resolve_backend("flash_attn", torch.device("cuda")) == "flash_attn"  # explicit: FA3 or FA2
    finally:
        _clear_flash_attn_caches()  # the next test sees the real packages
