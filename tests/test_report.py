"""`python -m bench.report` renders the committed GPU results and synthetic results files (no GPU involved)."""

from __future__ import annotations

import json

import pytest

from bench import report

COMMITTED = sorted(report.RESULTS_DIR.glob("*.json"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _table_rows(markdown: str) -> list[list[str]]:
    """The cells of every Markdown table body row (header and separator left out)."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines if not line.startswith("| interface")]


def _row(path: str, batch: int, ms: float, peak: float | None, **fields) -> dict:
    return (
        dict(
            interface="latent",
            path=path,
            preset="tiny",
            resolution=256,
            batch=batch,
            dtype="fp32",
            per_image_ms=ms,
            peak_gib=peak,
            device="cpu",
            torch="2.13.0+cpu",
            commit="abc1234",
            date="2026-01-01T00:00:00+00:00",
        )
        | fields
    )


@pytest.mark.skipif(not COMMITTED, reason="no committed results under bench/results")
def test_report_renders_committed_results(tmp_path):
    runs = report.load_runs(COMMITTED)
    markdown = report.render_markdown(runs)
    rows = _table_rows(markdown)
    paths = {r[2].strip("*") for r in rows}
    assert {"engine cuda-graph", "engine eager", "diffusers eager+hooks", "diffusers regional-compile"} <= paths
    assert "vae decode + hpsv3" in paths  # the HPSv3 baseline, end to end
    assert markdown.count("**(latest)**") == len({r.device for r in runs})  # one latest run per GPU
    assert "random weights" in markdown
    # Every committed latency row lands in a cell: one table row per distinct measurement, no row dropped.
    assert sum(1 for r in rows for c in r[7::2] if c != "–") == sum(len(r.rows) for r in runs)

    latest = report.render_markdown(runs, latest_only=True)
    assert latest.count("ms/img") == len({r.device for r in runs})  # a single run's columns per device

    png = report.plot(runs, tmp_path / "latency.png")
    assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 30_000


def test_report_from_synthetic_files(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    # A plain `bench.latency --json` file (older) and a gpu_check-style sectioned file (newer) on the same device,
    # plus a GPU-only section row without per_image_ms that must be ignored.
    (results / "a-plain.json").write_text(
        json.dumps(
            {
                "env": {"gpu": None, "torch": "2.13.0+cpu", "git_commit": "abc1234", "date": "2026-01-01T00:00:00"},
                "rows": [
                    _row("engine eager", 1, 10.0, None),
                    _row("engine eager", 4, 5.0, None),
                    _row("diffusers eager+hooks", 1, 12.0, None),
                ],
            }
        )
    )
    (results / "b-sections.json").write_text(
        json.dumps(
            {
                "env": {"torch": "2.13.0+cpu", "git_commit": "def5678 + uncommitted x.py", "date": "2026-02-01"},
                "note": "second run",
                "sections": {
                    "latency_256": {"rows": [_row("engine eager", 1, 8.0, 0.5), _row("engine eager", 4, 4.0, 0.6)]},
                    "attention": {"rows": [{"backend": "sdpa", "tokens": 10, "ms": 0.1}]},
                    "ceilings": {"copy_tb_s": 1.0},
                },
            }
        )
    )
    md_path, png_path = tmp_path / "out" / "table.md", tmp_path / "out" / "plot.png"
    markdown = report.main(["--results", str(results), "--markdown", str(md_path), "--plot", str(png_path)])

    assert md_path.read_text().strip() == markdown.strip() and markdown in capsys.readouterr().out
    assert "#2 `b-sections` **(latest)**" in markdown and "commit def5678+" in markdown
    rows = {(r[2].strip("*"), r[6]): r[7:] for r in _table_rows(markdown)}
    assert rows[("engine eager", "1")] == ["10.0", "–", "8.0", "0.5"]
    assert rows[("engine eager", "4")] == ["5.0", "–", "4.0", "0.6"]
    assert rows[("diffusers eager+hooks", "1")] == ["12.0", "–", "–", "–"]  # a baseline the newer run did not time
    assert png_path.read_bytes().startswith(PNG_MAGIC) and png_path.stat().st_size > 10_000


def test_report_rejects_non_results_json(tmp_path):
    bad = tmp_path / "notes.json"
    bad.write_text(json.dumps(["not", "results"]))
    with pytest.raises(ValueError, match="notes.json"):
        report.load_runs([bad])
    with pytest.raises(ValueError, match="no latency rows"):
        report.render_markdown([])


@pytest.mark.skipif(not COMMITTED, reason="no committed results under bench/results")
def test_readme_shows_the_latest_results():
    """README's "Latest GPU results" table is the generated one, so a new results file cannot leave it stale."""
    readme = (report.RESULTS_DIR.parents[1] / "README.md").read_text()
    expected = report.render_markdown(report.load_runs(COMMITTED), latest_only=True)
    assert expected in readme, "regenerate: python -m bench.report --latest-only --markdown FILE, paste into README"


def test_new_peers_are_baseline_rows_one_per_compile_mode():
    rows = [
        _row("engine cuda-graph", 8, 10.0, 7.9, dtype="fp8"),
        _row("compile+cudagraphs", 8, 13.0, 16.0, dtype="bf16", compile_mode="reduce-overhead"),
        _row("compile+cudagraphs", 8, 12.6, 16.1, dtype="bf16", compile_mode="max-autotune"),
        _row("torchao fp8", 8, 11.2, 10.5, dtype="fp8", compile_mode="reduce-overhead"),
        {"path": "torchao fp8", "skipped": "skipped: needs CUDA sm≥8.9"},  # no timing: not a table row
    ]
    run = report.Run("r", "cpu", {"date": "2026-01-01"}, None, tuple(r for r in rows if "per_image_ms" in r))
    table = {(r[2].strip("*"), r[3], r[5]): r[7:] for r in _table_rows(report.render_markdown([run]))}
    assert table == {
        ("engine cuda-graph", "engine", "fp8"): ["10.0", "7.9"],
        ("compile+cudagraphs (max-autotune)", "baseline", "bf16"): ["12.6", "16.1"],
        ("compile+cudagraphs (reduce-overhead)", "baseline", "bf16"): ["13.0", "16.0"],
        ("torchao fp8 (reduce-overhead)", "baseline", "fp8"): ["11.2", "10.5"],
    }
