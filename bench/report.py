"""Render the committed GPU results as a Markdown table and a latency/memory plot; no GPU, no re-measurement.

    python -m bench.report                                  # all runs, per GPU, to stdout; plot to bench/results/
    python -m bench.report --latest-only --markdown t.md    # the latest run per GPU (what README.md shows)
    python -m bench.report --results DIR --plot out.png

Reads every `*.json` under --results: `bench.gpu_check` files (`{"env", "sections": {name: {"rows": [...]}}}`) and
plain `python -m bench.latency --json` files (`{"env", "rows": [...]}`). Rows without `per_image_ms` (attention and
kernel micro-benchmarks) are not latency rows and are left out. All numbers come from random weights.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from bench.targets import BASELINE_PATHS
from engine.io.files import read_json
from engine.schema import Schema, parse_cli

RESULTS_DIR = Path(__file__).parent / "results"
DEFAULT_PLOT = RESULTS_DIR / "latency.png"

# Rows are listed engine first, then the baselines it is compared with, then the pieces of a pipeline.
INTERFACE_ORDER = ("latent", "pixel", "hpsv3")
ROLE_ORDER = ("engine", "baseline", "component")
KEY_COLUMNS = ("interface", "res", "path", "role", "model", "dtype", "batch")  # then ms/img and peak GiB per run


def row_role(row: dict[str, Any]) -> str:
    """'engine' (our paths), 'baseline' (an end-to-end alternative) or 'component' (one stage of a pipeline)."""
    path = row["path"]
    if path.startswith("engine"):
        return "engine"
    if path in BASELINE_PATHS:
        return "baseline"
    return "component"


def row_label(row: dict[str, Any]) -> str:
    """The path, with the `torch.compile` mode where a baseline was timed in several, and the head where it is not
    DiT-Reward's mean-pool head (a DiNa-shaped row: `[query_attention]`)."""
    label = row["path"] + (f" ({row['compile_mode']})" if row.get("compile_mode") else "")
    return label + (f" [{row['head']}]" if row.get("head", "mean_pool") != "mean_pool" else "")


@dataclass(frozen=True)
class Run:
    """The latency rows of one results file on one device."""

    name: str  # file stem, e.g. 2026-11-26-h200-run2
    device: str  # GPU name, or "cpu"
    env: dict[str, Any]
    note: str | None
    rows: tuple[dict[str, Any], ...]

    @property
    def date(self) -> str:
        """ISO 8601 date of the run (env first, else its newest row); sorts chronologically."""
        return str(self.env.get("date") or max((str(r.get("date", "")) for r in self.rows), default=""))

    @property
    def commit(self) -> str:
        # gpu_check records a dirty tree as "<sha> + uncommitted ..."; the sha and a '+' are enough in a table.
        raw = str(self.env.get("git_commit") or next((r.get("commit") for r in self.rows), None) or "unknown")
        sha, _, rest = raw.partition(" ")
        return sha + ("+" if rest else "")

    @property
    def torch(self) -> str:
        return str(self.env.get("torch") or next((r.get("torch") for r in self.rows), "?"))


def _latency_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Every row with a per-image latency, from either file format."""
    if isinstance(data.get("sections"), dict):
        tables = [s.get("rows", []) for s in data["sections"].values() if isinstance(s, dict)]
    else:
        tables = [data.get("rows", [])]
    return [r for rows in tables for r in rows if isinstance(r, dict) and "per_image_ms" in r and "path" in r]


def load_runs(paths: Iterable[Path]) -> list[Run]:
    """Runs from results files, oldest first. Files that are not results JSON raise `ValueError` naming the file."""
    runs = []
    for path in sorted(paths):
        data = read_json(path, "results file (written by bench.gpu_check or `python -m bench.latency --json`)")
        if not isinstance(data, dict) or not ("rows" in data or "sections" in data):
            raise ValueError(f"{path}: expected an object with 'rows' or 'sections', as bench.latency --json writes")
        env = data.get("env") or {}
        by_device: dict[str, list[dict[str, Any]]] = {}
        for row in _latency_rows(data):
            device = str(row.get("device") or env.get("gpu") or "cpu")
            by_device.setdefault(device, []).append(row)
        for device, rows in by_device.items():
            runs.append(Run(Path(path).stem, device, env, data.get("note"), tuple(rows)))
    return sorted(runs, key=lambda r: (r.date, r.name))


def _row_key(row: dict[str, Any]) -> tuple:
    """What identifies a measurement across runs (the order is the table's sort order)."""
    interface = row.get("interface", "latent")
    return (
        INTERFACE_ORDER.index(interface) if interface in INTERFACE_ORDER else len(INTERFACE_ORDER),
        interface,
        row.get("resolution") or 0,
        ROLE_ORDER.index(row_role(row)),
        row_label(row),
        str(row.get("dtype", "?")),
        str(row.get("preset", "")),
        int(row["batch"]),
    )


def _fmt(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def render_markdown(runs: Sequence[Run], latest_only: bool = False) -> str:
    """Markdown: one table per device, one row per (interface, resolution, path, dtype, model, batch), a latency
    and a peak-memory column per run (the latest marked). `latest_only` keeps only each device's latest run."""
    if not runs:
        raise ValueError("no latency rows found: pass --results DIR holding bench.gpu_check or bench.latency JSON")
    out = ["All numbers: **random weights** (latency and memory depend on shapes and kernels, not values).", ""]
    for device in sorted({r.device for r in runs}):
        device_runs = [r for r in runs if r.device == device]  # oldest first
        if latest_only:
            device_runs = device_runs[-1:]
        latest = device_runs[-1]
        out.append(f"### {device}")
        out.append("")
        # Runs are numbered oldest first (#1, #2, ...) so that column headers stay short; the list names the files.
        header = list(KEY_COLUMNS)
        for number, run in enumerate(device_runs, 1):
            mark = " **(latest)**" if run is latest else ""
            note = f" — {run.note}" if run.note else ""
            tag = f"#{number} " if len(device_runs) > 1 else ""
            out.append(f"- {tag}`{run.name}`{mark}: {run.date}, torch {run.torch}, commit {run.commit}{note}")
            header += [f"ms/img {tag}".strip(), f"peak GiB {tag}".strip()]
        out.append("")
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join("---" if i < len(KEY_COLUMNS) else "---:" for i in range(len(header))) + "|")
        cells: dict[tuple, list[dict[str, Any] | None]] = {}
        for i, run in enumerate(device_runs):
            for row in run.rows:
                cells.setdefault(_row_key(row), [None] * len(device_runs))[i] = row
        for key in sorted(cells):
            first = next(r for r in cells[key] if r is not None)
            bold = "**" if row_role(first) == "engine" else ""
            line = [
                str(first.get("interface", "latent")),
                f"{first['resolution']}²" if first.get("resolution") else "–",
                f"{bold}{row_label(first)}{bold}",
                row_role(first),
                str(first.get("preset", "")),
                str(first.get("dtype", "?")),
                str(first["batch"]),
            ]
            for row in cells[key]:
                line += ["–", "–"] if row is None else [_fmt(row["per_image_ms"], 1), _fmt(row.get("peak_gib"), 1)]
            out.append("| " + " | ".join(line) + " |")
        out.append("")
    return "\n".join(out)


def plot(runs: Sequence[Run], path: Path) -> Path:
    """PNG of each device's latest run: per-image latency (log scale past a 3x spread) and peak allocated memory vs
    batch, one line per (path, dtype, resolution) of the engine and the end-to-end baselines (pipeline components are
    in the table)."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("the plot needs matplotlib: pip install -e '.[plot]', or pass --no-plot") from err
    matplotlib.use("Agg")  # files only; no display on CI or a GPU box
    import matplotlib.pyplot as plt

    if not runs:
        raise ValueError("no latency rows to plot")
    devices = sorted({r.device for r in runs})
    latest = {d: [r for r in runs if r.device == d][-1] for d in devices}
    # One sub-figure per device: its own title line (run, torch, commit) above its two panels, no overlaps.
    fig = plt.figure(figsize=(13, 5.0 * len(devices) + 1.4), layout="constrained")
    subfigs = fig.subfigures(len(devices), 1, squeeze=False)[:, 0]
    # Colour = path (the thing compared), line style = dtype, marker = resolution: one glance separates all three.
    colours = plt.get_cmap("tab10").colors
    styles = {"bf16": "-", "fp8": "--", "fp32": ":"}
    markers = ["o", "s", "^", "D", "v"]
    series_by_device: dict[str, dict[tuple, list[dict[str, Any]]]] = {}
    for device in devices:
        series = series_by_device.setdefault(device, {})
        for row in latest[device].rows:
            if row_role(row) != "component":
                series.setdefault((row_label(row), str(row.get("dtype", "?")), row.get("resolution")), []).append(row)
    # One colour and marker per path and resolution across all devices, so that the shared legend holds for each.
    keys = [k for series in series_by_device.values() for k in series]
    paths = sorted({k[0] for k in keys}, key=lambda p: (not p.startswith("engine"), p))
    resolutions = sorted({k[2] or 0 for k in keys})
    handles: dict[str, Any] = {}
    for subfig, device in zip(subfigs, devices, strict=True):
        run, series = latest[device], series_by_device[device]
        ax_ms, ax_gib = subfig.subplots(1, 2)
        batches = sorted({int(r["batch"]) for rows in series.values() for r in rows})
        for key in sorted(series, key=lambda k: (paths.index(k[0]), k[2] or 0, k[1])):
            rows = sorted(series[key], key=lambda r: r["batch"])
            p, dtype, res = key
            style = dict(
                color=colours[paths.index(p) % len(colours)],
                linestyle=styles.get(dtype, "-."),
                marker=markers[resolutions.index(res or 0) % len(markers)],
                markersize=7,
                linewidth=1.8,
            )
            label = f"{p} · {dtype}" + (f" · {res}²" if res else "")
            x = [int(r["batch"]) for r in rows]
            (line,) = ax_ms.plot(x, [r["per_image_ms"] for r in rows], label=label, **style)
            peaks = [(b, r["peak_gib"]) for b, r in zip(x, rows, strict=True) if r.get("peak_gib") is not None]
            if peaks:
                ax_gib.plot(*zip(*peaks, strict=True), **style)
            handles.setdefault(label, line)
        latencies = [r["per_image_ms"] for rows in series.values() for r in rows]
        # Log scale once the spread passes 3x (b1 eager vs b8 graphs spans ~15x on a GPU); linear reads better below.
        log_ms = bool(latencies) and max(latencies) > 3 * min(latencies)
        for ax in (ax_ms, ax_gib):
            ax.set_xscale("log", base=2)  # batches double: 1, 2, 4, 8 evenly spaced
            ax.set_xticks(batches, [str(b) for b in batches])
            ax.minorticks_off()
            ax.set_xlabel("batch size")
            ax.grid(True, which="major", alpha=0.3)
        if log_ms:
            ax_ms.set_yscale("log")
            # Plain milliseconds on the ticks, not 10^x: the range is one or two decades.
            plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
            ax_ms.yaxis.set_major_formatter(plain)
            ax_ms.yaxis.set_minor_formatter(plain)
        else:
            ax_ms.set_ylim(bottom=0)
        ax_ms.set_ylabel("per-image latency (ms" + (", log scale)" if log_ms else ")"))
        ax_gib.set_ylabel("peak allocated memory (GiB)")
        ax_gib.set_ylim(bottom=0)
        if not ax_gib.lines:
            ax_gib.text(0.5, 0.5, "no peak memory recorded", ha="center", va="center", transform=ax_gib.transAxes)
        ax_ms.set_title("per-image latency (lower is better)")
        ax_gib.set_title("peak memory (lower is better)")
        subfig.suptitle(
            f"{device}  ·  {run.name}, {run.date[:16].replace('T', ' ')}, torch {run.torch}, commit {run.commit}"
            ", random weights",
            fontsize=11,
            fontweight="bold",
        )
    fig.legend(
        handles.values(),
        handles.keys(),
        loc="outside lower center",
        ncol=3,
        fontsize=9,
        title="path · dtype · resolution (colour = path, line style = dtype, marker = resolution)",
        frameon=False,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # No software/date metadata: the same results give the same bytes, so re-rendering leaves git clean.
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path


class ReportArgs(Schema):
    """The command line of `python -m bench.report`."""

    results: str = Field(str(RESULTS_DIR), min_length=1, description="folder of results JSON")
    markdown: str | None = Field(None, min_length=1, description="also write the Markdown here")
    plot: str = Field(str(DEFAULT_PLOT), min_length=1, description="PNG path")
    no_plot: bool = Field(False, description="table only (no matplotlib needed)")
    latest_only: bool = Field(False, description="only each device's latest run in the table")


def main(argv: list[str] | None = None) -> str:
    args = parse_cli(ReportArgs, argv, "python -m bench.report", __doc__.split("\n\n")[0])
    files = sorted(Path(args.results).glob("*.json"))
    if not files:
        raise SystemExit(f"--results: no *.json results under {args.results}")
    runs = load_runs(files)
    markdown = render_markdown(runs, latest_only=args.latest_only)
    print(markdown)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(markdown + "\n")
    if not args.no_plot:
        print(f"plot: {plot(runs, Path(args.plot))}", file=sys.stderr)
    return markdown


if __name__ == "__main__":
    main()
