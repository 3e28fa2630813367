"""`python -m bench.gpu_check --cpu-smoke`: the one-call GPU script runs every section end to end on the tiny preset,
so a GPU session never spends its device time discovering a broken section."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.gpu_check import PLAN

ROOT = Path(__file__).parents[1]


def _run_smoke(out: Path, *args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "bench.gpu_check", "--out", str(out), "--cpu-smoke", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_gpu_check_runs_every_section_on_the_cpu_and_a_failing_baseline_costs_only_itself(tmp_path):
    # a baseline made to fail: its error row, the other rows of its section, and every later section are there
    proc = _run_smoke(tmp_path, "--fail-path", "diffusers eager+hooks")
    log, _ = proc.communicate(timeout=2400)  # inductor compiles on the CPU: minutes on a shared machine
    assert proc.returncode == 0, log[-6000:]
    data = json.loads((tmp_path / "gpu_results.json").read_text())
    assert data["cpu_smoke"] and data["errors"] == {} and data["skipped"] == {}
    assert sorted(os.listdir(tmp_path)) == ["gpu_results.json", "rows.jsonl"]  # (+ the log the command tees)
    sections = data["sections"]
    assert list(sections) == [p.name for p in PLAN if p.name in sections]  # in the plan's order
    assert set(sections) == {"ceilings", "kernel_tests", "engine_parity", "latency_512", "fp8_fidelity"} | {
        "adaln_on_host",
        "latency_1024",
        "latency_512_b24",
        "profile_fp8",
        "profile_fp8_b1",
        "profile_bf16",
    } | {"kernel_bench", "attention", "peers_512_b8", "dina_512", "hpsv3"}
    assert set(data["section_seconds"]) == set(sections) and all(s["complete"] for s in sections.values())
    # every row is in rows.jsonl too, in the order it was made, section by section
    streamed = [(r["section"], r["row"]) for r in _records(tmp_path) if "row" in r]
    assert streamed == [(name, row) for name, s in sections.items() for row in s["rows"]]
    lat = sections["latency_512"]["rows"]
    (failed,) = [r for r in lat if r["path"] == "diffusers eager+hooks"]
    assert failed["error"].startswith("error: RuntimeError: injected failure")
    paths = {(r["path"], r["dtype"]) for r in lat if r.get("per_image_ms", 0) > 0}
    assert ("engine eager, cond cached", "fp8+host-adaln") in paths and ("diffusers regional-compile", "fp32") in paths
    # the script's own checks hold on the tiny model: equal rewards with host adaLN, engine as close to fp32 as
    # diffusers' bf16 (STYLE.md: at most 2x), fused FP8 producers equal to the unfused path's quantisation
    assert sections["adaln_on_host"]["rewards_equal"]
    parity = sections["engine_parity"]
    assert parity["engine_bf16_rel_err"] <= 2 * parity["diffusers_bf16_rel_err"]
    kernel_rows = sections["kernel_bench"]["rows"]
    assert kernel_rows and all("error" not in r and r["triton_launches"] >= 1 for r in kernel_rows)
    assert all(r["triton_us"] > 0 and r["triton_device_us"] > 0 and r["eager_us"] > 0 for r in kernel_rows)
    compiled = [r for r in kernel_rows if "compile_us" in r]
    assert [(r["op"], r["batch"]) for r in compiled] == [("layernorm_modulate", 2)] and compiled[0]["compile_us"] > 0
    strided = [r for r in kernel_rows if r["op"].startswith("quantize_rowwise(strided")]
    assert strided and all(r["max_rel_err"] == 0 for r in strided)
    assert [t["target"] for t in data["targets"]][:2] == ["512² b8 fp8 ms/img", "512² b8 bf16 ms/img"]
    # the compiled peers: whole-model compile timed (inductor without CUDA graphs on the CPU), torchao's FP8 skipped
    peers = sections["peers_512_b8"]["rows"]
    graphs = [r for r in peers if r["path"] == "compile+cudagraphs"]
    assert graphs and all(r["per_image_ms"] > 0 and r["compile_mode"] == "reduce-overhead" for r in graphs)
    torchao = [r for r in peers if r["path"] == "torchao fp8"]
    assert torchao and all(r["skipped"].startswith("skipped: needs CUDA sm≥8.9") for r in torchao)
    assert {r["path"] for r in sections["hpsv3"]["rows"]} >= {"vae decode + hpsv3"}
    # the DiNa-shaped engine and its diffusers + peft baseline, both batches, every row timed
    dina = sections["dina_512"]["rows"]
    assert all(r.get("per_image_ms", 0) > 0 and r["head"] == "query_attention" for r in dina)
    paths = ("engine eager", "engine eager, cond cached", "diffusers+peft eager")
    assert {(r["path"], r["batch"]) for r in dina} >= {(path, batch) for path in paths for batch in (1, 8)}
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


def test_a_killed_run_keeps_every_row_it_wrote(tmp_path):
    # SIGKILL once the kernel section's first row is on disk: the rows written so far survive, whole
    proc = _run_smoke(tmp_path, "--only", "kernel_bench", "attention")
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            jsonl = tmp_path / "rows.jsonl"
            if jsonl.exists() and any('"row"' in line for line in jsonl.read_text().splitlines()):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it was killed: " + proc.stdout.read()[-3000:]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    records = _records(tmp_path)
    rows = [r["row"] for r in records if r.get("section") == "kernel_bench" and "row" in r]
    assert rows and rows[0]["op"] == "layernorm_modulate" and rows[0]["triton_launches"] >= 1
    data = json.loads((tmp_path / "gpu_results.json").read_text())  # never a half-written file
    assert data["sections"]["kernel_bench"]["rows"][: len(rows)] == rows
    assert data["sections"]["kernel_bench"]["complete"] is False  # (killed inside the section)


def _fake_report(tmp_path, deadline_s: float = 60.0):
    from bench.gpu_check import Report

    return Report(tmp_path, deadline_s)


def test_a_failing_section_and_a_spent_budget_cost_only_themselves(tmp_path):
    from bench.gpu_check import Planned

    rep = _fake_report(tmp_path)

    def fails(sec):
        sec.row({"op": "first"})
        raise RuntimeError("boom")

    def budgeted(sec):
        for i in range(100):
            if sec.stopped(f"row {i}", op=i):
                return {"made": i}
            sec.row({"op": i})
            time.sleep(0.02)
        return {"made": 100}

    rep.section(Planned("fails", 0, 10, 1), fails)
    rep.section(Planned("budgeted", 0, 0.2, 1), budgeted)
    rep.section(Planned("too_late", 3600, 10, 1), lambda sec: {"ran": True})
    data = json.loads((tmp_path / "gpu_results.json").read_text())
    assert data["sections"]["fails"]["rows"] == [{"op": "first"}] and "RuntimeError: boom" in data["errors"]["fails"]
    budget = data["sections"]["budgeted"]
    assert 2 <= budget["made"] < 100 and budget["rows"][-1]["skipped"].startswith("stopped:")
    assert data["section_seconds"]["budgeted"] < 1.0
    assert "too_late" not in data["sections"] and data["skipped"]["too_late"].endswith("needs 3600 s")
    kinds = [next(k for k in ("row", "skipped", "seconds") if k in r) for r in _records(tmp_path)]
    assert kinds[:3] == ["row", "seconds", "row"] and kinds[-1] == "skipped"


def test_the_plan_fits_one_call():
    from bench.gpu_check import CALL_TIMEOUT_S, DEADLINE_S, PLANNED_S, STARTUP_S, plan_text

    names = [p.name for p in PLAN]
    first = names[: names.index("peers_512_b8") + 1]
    assert STARTUP_S + sum(p.predicted_s for p in PLAN if p.name in first) <= PLANNED_S <= 480
    assert DEADLINE_S + STARTUP_S + 60 <= CALL_TIMEOUT_S <= 570
    # by value: engine correctness and latency first; kernel rows before the peers; the peers' b8 before b1; HPSv3
    # (measured already) last but max-autotune, which runs only when asked for
    order = ["engine_parity", "latency_512", "fp8_fidelity", "adaln_on_host", "latency_1024", "profile_fp8"]
    order += ["kernel_bench", "peers_512_b8", "dina_512", "peers_512_b1", "hpsv3", "max_autotune_512"]
    assert [n for n in names if n in order] == order
    assert all(p.need_s <= p.budget_s for p in PLAN)
    text = plan_text()
    assert "--deadline-s 490" in text and "timeout_s=570" in text and "max_autotune" not in text
    assert "importlib_metadata" not in text.split("pip download")[1].split("\n")[0]
    # the DiNa-shaped section does not fit call 1: it opens call 2
    assert STARTUP_S + sum(p.predicted_s for p in PLAN if p.name in [*first, "dina_512"]) > PLANNED_S
    assert "--only dina_512 peers_512_b1 hpsv3" in text


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
