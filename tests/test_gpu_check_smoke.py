"""`python -m bench.gpu_check --cpu-smoke`: the one-call GPU script runs every section end to end on the tiny preset,
so a GPU session never spends its device time discovering a broken section."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_gpu_check_runs_every_section_on_the_cpu(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path), "--cpu-smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,  # inductor compiles three models on the CPU: minutes on a shared machine
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_results.json").read_text())
    assert data["cpu_smoke"] and data["errors"] == {} and data["skipped"] == []
    expected = {"latency_512", "compiled_peers_512", "adaln_on_host", "hpsv3", "fp8_fidelity", "latency_1024"}
    assert expected | {"kernel_bench", "attention"} <= set(data["sections"])
    sections = data["sections"]
    # the script's own checks hold on the tiny model: equal rewards with host adaLN, engine as close to fp32 as
    # diffusers' bf16 (STYLE.md: at most 2x), fused FP8 producers equal to the unfused path's quantisation
    assert sections["adaln_on_host"]["rewards_equal"]
    parity = sections["engine_parity"]
    assert parity["engine_bf16_rel_err"] <= 2 * parity["diffusers_bf16_rel_err"]
    strided = [r for r in sections["kernel_bench"]["rows"] if r["op"].startswith("quantize_rowwise(strided")]
    assert strided and all(r["max_rel_err"] == 0 for r in strided)
    paths = {(r["path"], r["dtype"]) for r in sections["latency_512"]["rows"]}
    assert ("engine eager, cond cached", "fp8+host-adaln") in paths and ("diffusers regional-compile", "fp32") in paths
    assert [t["target"] for t in data["targets"]][:2] == ["512² b8 fp8 ms/img", "512² b8 bf16 ms/img"]
    # the two new peers: whole-model compile timed (inductor without CUDA graphs on the CPU), torchao's FP8 skipped
    peers = sections["compiled_peers_512"]["rows"]
    graphs = [r for r in peers if r["path"] == "compile+cudagraphs"]
    assert graphs and all(r["per_image_ms"] > 0 and r["compile_mode"] == "reduce-overhead" for r in graphs)
    torchao = [r for r in peers if r["path"] == "torchao fp8"]
    assert torchao and all(r["skipped"].startswith("skipped: needs CUDA sm≥8.9") for r in torchao)
    assert 0.5 <= sections["fp8_fidelity"]["fp8"]["group_order_agreement"] <= 1
    # FP8's rounding emulated in bf16 GEMMs reproduces the FP8 engine (what makes its two halves a valid diagnosis)
    fidelity = sections["fp8_fidelity"]
    emulated = fidelity["e4m3 weights + activations, bf16 GEMMs vs the fp8 engine"]
    assert emulated["pearson"] > 0.999 and emulated["pair_order_agreement"] > 0.95
    for half in ("e4m3 weights only, bf16 GEMMs", "e4m3 activations only, bf16 GEMMs"):
        assert fidelity[half]["rms_error_over_std"] > 0
    share = fidelity["bf16_linear_share"]
    assert share["fp8"] == 0 and share["e4m3 weights only, bf16 GEMMs"] == 1
    assert 0.25 < share["fp8, FFN out bf16"] < 0.4  # the FFN output projection: 4D² of each stream's 12D² per token


def test_agreement_metrics_by_hand():
    from bench.fp8_fidelity import _agreement

    a = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    b = torch.tensor([1.0, 3.0, 2.0, 4.0], dtype=torch.float64)
    m = _agreement(a, b)
    assert m["pair_order_agreement"] == pytest.approx(5 / 6)  # one of six pairs swapped
    assert m["spearman"] == pytest.approx(1 - 6 * 2 / (4 * 15))  # 1 - 6 sum d^2 / (n (n^2 - 1))
    assert m["pearson"] == pytest.approx(4 / 5)  # cov 4 / (sqrt(5) sqrt(5)), sums over the four points
    assert m["rms_error_over_std"] == pytest.approx((2 / 4) ** 0.5 / (5 / 3) ** 0.5)
    assert m["max_abs_diff"] == 1.0
    # pairs whose reference values differ by > 1% of their std: all six here
    assert m["pair_order_agreement_clear_pairs"] == pytest.approx(5 / 6)


def test_group_order_agreement_by_hand():
    from bench.fp8_fidelity import _group_order_agreement

    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    b = torch.tensor([1.0, 3.0, 2.0, 4.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    # group 1: one of its six pairs swapped; group 2: all six reversed -> (5 + 0) / 12
    assert _group_order_agreement(a, b, 4) == pytest.approx(5 / 12)
    # pairs across groups do not count: shifting a whole group changes nothing
    assert _group_order_agreement(a, b + torch.tensor([0.0] * 4 + [100.0] * 4, dtype=torch.float64), 4) == (
        pytest.approx(5 / 12)
    )
    assert _group_order_agreement(a, a, 8) == 1.0
    with pytest.raises(ValueError, match="multiple of the group size"):
        _group_order_agreement(a[:6], b[:6], 4)
