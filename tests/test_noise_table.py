"""bench.noise_table at a toy size: four heads trained, a row per head with its accuracy at every t, and the JSON
figures equal to the trainer's per-file validation rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import noise_table


@pytest.mark.slow
def test_noise_table_runs_at_a_toy_size(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "table.json"
    argv = ["--json", str(out), "--n-train", "16", "--n-val", "4", "--steps", "2", "--batch-size", "4"]
    noise_table.main([*argv, "--t", "0.2", "0.8", "--work-dir", str(tmp_path / "work")])
    report = json.loads(out.read_text())
    runs = report["runs"]
    assert [(r["t_sampling"], r["head"]) for r in runs] == noise_table.RUNS
    for r in runs:
        assert list(r["accuracy"]) == ["0.2", "0.8"]
        assert [(row["t"], row["file"]) for row in r["per_file"]] == [
            (t, f"val_{s}.json") for t in (0.2, 0.8) for s in "ab"
        ]
        for t in ("0.2", "0.8"):  # the mean over the two files of the trainer's rows
            rows = [row["accuracy"] for row in r["per_file"] if f"{row['t']:g}" == t]
            assert r["accuracy"][t] == pytest.approx(sum(rows) / 2)
        log = [json.loads(line) for line in (tmp_path / "work" / f"{r['t_sampling']}_{r['head']}" / "log.jsonl")
               .read_text().splitlines()]  # fmt: skip
        assert [row["accuracy"] for row in log[-1]["val_accuracy_per_t"] if row["t"] in (0.2, 0.8)] == [
            row["accuracy"] for row in r["per_file"]
        ]
    assert report["environment"]["git_commit"] and report["environment"]["date"]
    printed = capsys.readouterr().out.splitlines()
    table = printed[printed.index(next(line for line in printed if line.startswith("t_sampling"))) :]
    assert table[0].split()[2:4] == ["t=0.2", "t=0.8"] and len(table) == 5
    assert table[1].split()[:2] == ["fixed", "mean_pool"]
