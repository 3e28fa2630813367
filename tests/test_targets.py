"""`bench.targets` on a committed GPU run: each verdict recomputed here from the run's raw rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import targets

RUN3 = Path(__file__).parents[1] / "bench" / "results" / "2026-11-26-h200-run3.json"


@pytest.fixture(scope="module")
def run3():
    return json.loads(RUN3.read_text())


def _row(data, section, path, dtype, batch):
    return next(
        r
        for r in data["sections"][section]["rows"]
        if r["path"] == path and r["dtype"] == dtype and r["batch"] == batch
    )


def test_targets_of_run3(run3):
    lines = {line["target"]: line for line in targets.evaluate(run3)}
    fp8_b8 = _row(run3, "latency_512", "engine cuda-graph", "fp8", 8)["per_image_ms"]
    compile_b8 = _row(run3, "latency_512", "diffusers regional-compile", "bf16", 8)["per_image_ms"]
    hps_b8 = _row(run3, "hpsv3", "vae decode + hpsv3", "bf16", 8)["per_image_ms"]
    assert lines["512² b8 fp8 ms/img"]["uncached"] == {"value": fp8_b8, "row": "engine cuda-graph fp8", "met": False}
    # the file times one compiled baseline, regional compile: it is the strongest
    speedup = lines["512² b8 speedup vs strongest compiled diffusers"]["uncached"]
    assert speedup["value"] == pytest.approx(compile_b8 / fp8_b8, abs=1e-3) and not speedup["met"]
    assert speedup["row"] == "engine cuda-graph fp8 vs diffusers regional-compile"
    hps = lines["512² b8 speedup vs VAE decode + HPSv3"]["uncached"]
    assert hps["value"] == pytest.approx(hps_b8 / fp8_b8, abs=1e-3) and not hps["met"]
    assert lines["512² b8 fp8 peak GiB"]["uncached"]["value"] == min(
        r["peak_gib"]
        for r in run3["sections"]["latency_512"]["rows"]
        if r["dtype"].startswith("fp8") and r["batch"] == 8
    )
    assert lines["fp8 vs bf16 rewards spearman"]["uncached"]["met"]
    assert not lines["fp8 vs bf16 rewards pair_order_agreement"]["uncached"]["met"]
    assert "fp8 vs bf16 rewards group_order_agreement" not in lines  # not in the file
    assert all("cached" not in line for line in lines.values())  # the file has no cached-conditioning rows
    # the file has no host-adaLN rows and neither whole-model compiled peer
    for name in (
        "512² b8 fp8 peak GiB, adaln_on_host",
        "512² b8 bf16 speedup vs compile+cudagraphs",
        "512² b8 fp8 speedup vs torchao fp8",
    ):
        assert "uncached" not in lines[name]


def _latency_row(path, dtype, batch, ms, peak=None, resolution=512, **fields):
    return dict(path=path, dtype=dtype, batch=batch, per_image_ms=ms, peak_gib=peak, resolution=resolution) | fields


@pytest.fixture
def synthetic():
    """A results file with both new peers (two compile modes), host-adaLN rows, fidelity and kernel rows."""
    rows = [
        _latency_row("engine cuda-graph", "fp8", 8, 10.0, peak=7.9),
        _latency_row("engine cuda-graph", "fp8+host-adaln", 8, 10.4, peak=5.5),
        _latency_row("engine cuda-graph", "bf16", 8, 12.0, peak=15.3),
        _latency_row("engine cuda-graph", "fp8", 1, 14.0, peak=7.8),
        _latency_row("diffusers eager+hooks", "bf16", 8, 23.3),
        _latency_row("diffusers regional-compile", "bf16", 8, 15.4),
        _latency_row("compile+cudagraphs", "bf16", 8, 13.0, compile_mode="reduce-overhead"),
        _latency_row("compile+cudagraphs", "bf16", 8, 12.6, compile_mode="max-autotune"),
        _latency_row("torchao fp8", "fp8", 8, 11.2, compile_mode="reduce-overhead"),
        _latency_row("torchao fp8", "fp8", 1, 30.0, compile_mode="reduce-overhead"),
        {"path": "torchao fp8", "skipped": "skipped: needs CUDA sm≥8.9", "dtype": "fp8"},  # ignored
    ]
    kernels = [  # triton_gb_s against a 4.0 TB/s copy ceiling: 0.75, 0.5 (but faster than compile), 0.5 (slower)
        {"op": "a", "batch": 8, "tokens": 1357, "triton_gb_s": 3000.0, "triton_us": 50.0, "compile_us": 40.0},
        {"op": "b", "batch": 8, "tokens": 1357, "triton_gb_s": 2000.0, "triton_us": 100.0, "compile_us": 120.0},
        {"op": "c", "batch": 8, "tokens": 1357, "triton_gb_s": 2000.0, "triton_us": 100.0, "compile_us": 80.0},
        {"op": "a", "batch": 1, "tokens": 1357, "triton_gb_s": 10.0, "triton_us": 50.0, "compile_us": 1.0},
    ]
    return {
        "sections": {
            "ceilings": {"copy_tb_s": 4.0},
            "latency_512": {"rows": rows},
            "fp8_fidelity": {"fp8": {"spearman": 0.995, "pair_order_agreement": 0.981, "group_order_agreement": 0.965}},
            "kernel_bench": {"rows": kernels},
        }
    }


def test_targets_with_both_new_peers(synthetic):
    lines = {line["target"]: line for line in targets.evaluate(synthetic)}
    # strongest compiled baseline at b8: min(15.4 regional, 13.0 / 12.6 compile+cudagraphs, 11.2 torchao) = 11.2;
    # the best engine row against it is fp8 at 10.0 ms
    strongest = lines["512² b8 speedup vs strongest compiled diffusers"]["uncached"]
    assert strongest == {"value": 1.12, "row": "engine cuda-graph fp8 vs torchao fp8", "met": False}
    # compile+cudagraphs: its faster mode (12.6) against the bf16 engine (12.0), no verdict
    graphs = lines["512² b8 bf16 speedup vs compile+cudagraphs"]
    assert graphs["bound"] is None and graphs["kind"] == "info"
    assert graphs["uncached"] == {"value": 1.05, "row": "engine cuda-graph bf16 vs compile+cudagraphs", "met": None}
    assert lines["512² b8 fp8 speedup vs torchao fp8"]["uncached"]["value"] == 1.12  # 11.2 / 10.0
    assert lines["512² b1 fp8 speedup vs torchao fp8"]["uncached"]["value"] == pytest.approx(30 / 14, abs=1e-3)
    # peaks: 7.9 without host adaLN (<= 8), 5.5 with it (<= 6)
    assert lines["512² b8 fp8 peak GiB"]["uncached"] == {"value": 7.9, "row": "engine cuda-graph fp8", "met": True}
    host = lines["512² b8 fp8 peak GiB, adaln_on_host"]["uncached"]
    assert host == {"value": 5.5, "row": "engine cuda-graph fp8+host-adaln", "met": True}
    group = lines["fp8 vs bf16 rewards group_order_agreement"]
    assert group["bound"] == 0.97 and group["uncached"]["value"] == 0.965 and not group["uncached"]["met"]
    kernel = {name: line["uncached"] for name, line in lines.items() if name.startswith("kernel")}
    assert len(kernel) == 3  # batch 8 only
    a, b, c = (kernel[f"kernel {op} b8: share of copy bandwidth"] for op in "abc")
    assert (a["value"], a["met"]) == (0.75, True)
    assert (b["value"], b["met"]) == (0.5, True)  # under 70% but faster than torch.compile
    assert (c["value"], c["met"]) == (0.5, False)
    table = targets.format_table(list(lines.values()))
    assert "1.05 (no bound)" in table and "1.12 missed" in table


def test_cached_rows_are_scored_separately(run3):
    data = json.loads(json.dumps(run3))
    rows = data["sections"]["latency_512"]["rows"]
    fast = dict(_row(data, "latency_512", "engine cuda-graph", "fp8", 8), path="engine cuda-graph, cond cached")
    fast["per_image_ms"] = 8.5
    rows.append(fast)
    line = next(x for x in targets.evaluate(data) if x["target"] == "512² b8 fp8 ms/img")
    assert line["cached"] == {"value": 8.5, "row": "engine cuda-graph, cond cached fp8", "met": True}
    assert not line["uncached"]["met"]
    assert "8.5 MET" in targets.format_table([line])


def test_refuses_files_that_are_not_gpu_check_results():
    with pytest.raises(ValueError, match="not a bench.gpu_check results file"):
        targets.evaluate({"env": {}, "rows": []})
