"""The kernel micro-benchmark rows of `bench.gpu_check` time what they say: every "triton" side launches this
package's Triton kernels (recorded as `tools.cross_compile` does), every torch reference none, and both agree."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import pytest
import torch

from bench import kernel_bench
from bench.gpu_sections import Section, Setup
from engine.config import BackboneConfig
from kernels import backend as kernel_backend

pytestmark = pytest.mark.skipif(not kernel_backend.triton_available(), reason="triton is not installed")


@pytest.fixture
def tiny_setup(monkeypatch):
    cfg = BackboneConfig.from_name("tiny")
    for name, value in dict(
        device="cpu",
        preset="tiny",
        n_text=5,
        heads=cfg.num_attention_heads,
        head_dim=cfg.attention_head_dim,
        kernel_shapes=((2, 14),),  # 9 image tokens: an odd count
    ).items():
        monkeypatch.setattr(Setup, name, value)


def test_every_triton_row_launches_triton_kernels_and_every_reference_none(tiny_setup):
    torch.manual_seed(0)
    cases = kernel_bench.kernel_cases(2, 14)
    with torch.inference_mode():
        for name, case in cases.items():
            fast, ref = kernel_bench.triton_launches(case.fast), kernel_bench.triton_launches(case.ref)
            assert fast >= 1, f"{name}: the 'triton' side launched no Triton kernel"
            unfused = "(vs" in name  # these compare against the unfused Triton ops (and copies): no fewer launches
            assert (ref >= fast) if unfused else (ref == 0), f"{name}: reference launched {ref} Triton kernels"
    # the fused fp8 producers each replace two launches by one
    assert kernel_bench.triton_launches(cases["layernorm_modulate_fp8 (vs LN + quantize)"].fast) == 1


def test_rows_stream_out_carry_both_timings_and_a_failing_case_costs_only_its_row(tiny_setup, monkeypatch):
    real = kernel_bench.kernel_cases

    def with_a_broken_case(batch, tokens):
        cases = real(batch, tokens)
        return {"broken": kernel_bench.KernelCase(lambda: 1 / 0, cases["mean_pool"].ref, 1), **cases}

    monkeypatch.setattr(kernel_bench, "kernel_cases", with_a_broken_case)
    rows = []
    kernel_bench.kernel_bench(Section("kernel_bench", rows.append, deadline=float("inf")), compile_batches=())
    assert [r["op"] for r in rows] == ["broken", *real(2, 14)]
    assert rows[0]["error"].startswith("error: ZeroDivisionError")
    for r in rows[1:]:
        assert r["triton_launches"] >= 1 and r["triton_us"] > 0 and r["triton_device_us"] > 0
        assert r["triton_gb_s"] == pytest.approx(r["bytes"] / r["triton_us"] / 1e3)
        assert r["max_rel_err"] < 0.07, r  # bf16 (and e4m3 for the fp8 producers: within one e4m3 step, 2^-4)
    stopped = []
    kernel_bench.kernel_bench(Section("kernel_bench", stopped.append, deadline=0.0), compile_batches=())
    assert len(stopped) == 1 and stopped[0]["skipped"].startswith("stopped:")
