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
    speedup = lines["512² b8 speedup vs diffusers regional compile"]["uncached"]
    assert speedup["value"] == pytest.approx(compile_b8 / fp8_b8, abs=1e-3) and not speedup["met"]
    hps = lines["512² b8 speedup vs VAE decode + HPSv3"]["uncached"]
    assert hps["value"] == pytest.approx(hps_b8 / fp8_b8, abs=1e-3) and not hps["met"]
    assert lines["512² b8 fp8 peak GiB"]["uncached"]["value"] == min(
        r["peak_gib"]
        for r in run3["sections"]["latency_512"]["rows"]
        if r["dtype"].startswith("fp8") and r["batch"] == 8
    )
    assert lines["fp8 vs bf16 rewards spearman"]["uncached"]["met"]
    assert not lines["fp8 vs bf16 rewards pair_order_agreement"]["uncached"]["met"]
    assert all("cached" not in line for line in lines.values())  # run 3 had no cached-conditioning rows


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
