"""bench.fp8_fidelity's e4m3 emulation rounds the input of every linear that FP8 quantises, on the CPU's unfused FFN
path and on CUDA's fused GEMM + GELU epilogue path (`Ops.linear_gelu`), which calls no `proj.forward`."""

from __future__ import annotations

import pytest
import torch

from bench.fp8_fidelity import _emulate_e4m3
from engine import RewardEngine
from engine.runtime.ops import Ops
from kernels.quant import quantize_rowwise_ref


def _fused_linear_gelu(self, x, proj):  # the CUDA branch of Ops.linear_gelu, taken on the CPU
    out = torch._addmm_activation(proj.bias, x.reshape(-1, x.shape[-1]), proj.weight.t(), use_gelu=True)
    return out.view(*x.shape[:-1], -1)


def _on_e4m3_grid(x: torch.Tensor) -> bool:
    # rounding is idempotent: an input already rounded per row comes back unchanged
    q, scale = quantize_rowwise_ref(x.reshape(-1, x.shape[-1]).float())
    return torch.equal((q.float() * scale).reshape(x.shape), x.float())


@pytest.mark.parametrize("fused", [False, True])
def test_every_quantised_linear_sees_a_rounded_input(monkeypatch, fused):
    engine = RewardEngine.from_preset("tiny", device="cpu", dtype="fp32", seed=0, kernels_backend="torch")
    blocks = engine.backbone.transformer_blocks
    quantised = {
        m.weight.data_ptr(): name
        for name, m in blocks.named_modules()
        if isinstance(m, torch.nn.Linear) and ".norm1" not in f".{name}"
    }
    _emulate_e4m3(weights=False, activations=True)(engine)
    seen: dict[str, bool] = {}
    linear, addmm_activation = torch.nn.functional.linear, torch._addmm_activation

    def record(x, weight):
        if weight.data_ptr() in quantised:
            name = quantised[weight.data_ptr()]
            seen[name] = seen.get(name, True) and _on_e4m3_grid(x)

    def recording_linear(x, weight, bias=None):
        record(x, weight)
        return linear(x, weight, bias)

    def recording_addmm_activation(bias, x, weight_t, **kw):
        record(x, weight_t.t())
        return addmm_activation(bias, x, weight_t, **kw)

    monkeypatch.setattr(torch.nn.functional, "linear", recording_linear)
    monkeypatch.setattr(torch, "_addmm_activation", recording_addmm_activation)
    if fused:
        monkeypatch.setattr(Ops, "linear_gelu", _fused_linear_gelu)
    g = torch.Generator().manual_seed(0)
    cfg = engine.config
    z0 = torch.randn(2, cfg.in_channels, 16, 16, generator=g)
    emb = torch.randn(2, 7, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(2, cfg.pooled_projection_dim, generator=g)
    with torch.no_grad():
        engine.score(z0, (emb, pooled), seed=0)
    ffn_in = [name for name in quantised.values() if name.endswith("net.0.proj")]
    assert ffn_in and set(seen) == set(quantised.values()), set(quantised.values()) - set(seen)
    assert all(seen.values()), [name for name, ok in seen.items() if not ok]
