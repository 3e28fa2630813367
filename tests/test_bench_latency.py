"""`python -m bench.latency` completes on the CPU (tiny preset) for every interface and writes its JSON rows."""

from __future__ import annotations

import json

import pytest

from bench import latency

KEYS = {
    "interface",
    "path",
    "preset",
    "resolution",
    "batch",
    "dtype",
    "per_image_ms",
    "peak_gib",
    "device",
    "torch",
    "commit",
    "date",
}


@pytest.mark.parametrize("interface", ["latent", "pixel", "hpsv3"])
def test_latency_cli_runs_on_cpu(interface, tmp_path):
    out = tmp_path / "rows.json"
    rows = latency.main(
        ["--interface", interface, "--batch", "2", "--iters", "1", "--resolution", "128", "--json", str(out)]
    )
    assert rows and all(set(r) >= KEYS and r["per_image_ms"] > 0 for r in rows)
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))
