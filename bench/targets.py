"""The fast-latent-path targets, checked against one `bench.gpu_check` results file.

    python -m bench.targets bench/results/2026-11-26-h200-run3.json

Each latency target takes the best engine row that qualifies (any serving variant of the named dtype), per image,
SD3.5-L shape with the mean-pool head (the DiNa lines: SD3.5-M with the query-attention head). Two columns: prompts
conditioned inside the timed call (as the baselines do), and conditioning made beforehand (`condition()` once per
prompt batch, the GRPO pattern; rows "..., cond cached"). Speedups are against baselines timed in the same run at the
same shape; "the strongest compiled diffusers baseline" is the fastest of regional compile, whole-model compile with
CUDA graphs (any mode) and torchao FP8 + compile. Lines without a bound (kind "info") report a comparison with no
verdict.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from engine.io.files import FileInputError, read_json
from engine.schema import Schema, parse_cli

_POSITIONAL = {"cli": {"positional": True}}

Row = dict[str, Any]

# Row labels of the in-process baselines: bench.latency writes them, targets and report read them.
EAGER = "diffusers eager+hooks"
REGIONAL_COMPILE = "diffusers regional-compile"
COMPILE_CUDAGRAPHS = "compile+cudagraphs"
TORCHAO_FP8 = "torchao fp8"
HPSV3 = "vae decode + hpsv3"
DINA_PEFT = "diffusers+peft eager"  # a DiNa-LRM-shaped reward run as their inferencer runs it (bench.dina)
DINA_MODEL = ("sd35-medium", "query_attention")  # the DiNa-shaped engine rows' (preset, head)
COMPILED_BASELINES = (REGIONAL_COMPILE, COMPILE_CUDAGRAPHS, TORCHAO_FP8)
BASELINE_PATHS = (EAGER, *COMPILED_BASELINES, HPSV3, DINA_PEFT)


@dataclass(frozen=True)
class Target:
    name: str
    bound: float | None  # None: an informative comparison, no verdict
    kind: str  # "max": measured <= bound; "min": measured >= bound; "info": no bound
    rows: Callable[[Row], bool]  # which engine rows qualify
    # from an engine row and the baselines' fastest per-image ms by (path, resolution, batch): (value, what it is
    # relative to, or None), or None when the row has nothing to compare with
    value: Callable[[Row, dict[tuple, float]], tuple[float, str | None] | None]
    model: tuple[str, str] = ("sd35-large", "mean_pool")  # the engine rows' (preset, head) it reads


def _model(row: Row) -> tuple[str, str]:
    """An engine row's (preset, head); rows written before either field existed: SD3.5-L, mean-pool."""
    return row.get("preset", "sd35-large"), row.get("head", "mean_pool")


def _ms(row: Row, _: dict) -> tuple[float, None]:
    return row["per_image_ms"], None


def _peak(row: Row, _: dict) -> tuple[float, None] | None:
    return None if row.get("peak_gib") is None else (row["peak_gib"], None)


def _speedup(*labels: str) -> Callable[[Row, dict], tuple[float, str] | None]:
    """Speedup of an engine row over the fastest of `labels` measured at its resolution and batch."""

    def value(row: Row, baselines: dict) -> tuple[float, str] | None:
        refs = [(baselines[k], k[0]) for k in ((b, row["resolution"], row["batch"]) for b in labels) if k in baselines]
        if not refs:
            return None
        ms, label = min(refs)
        return ms / row["per_image_ms"], label

    return value


def _where(
    dtype: str | None = None, batch: int = 8, resolution: int = 512, host_adaln: bool | None = None
) -> Callable[[Row], bool]:
    """Engine rows of this shape and base dtype; `host_adaln` True/False: only rows with/without `+host-adaln`."""

    def qualifies(row: Row) -> bool:
        return (
            row["batch"] == batch
            and row["resolution"] == resolution
            and (dtype is None or row["dtype"].partition("+")[0] == dtype)
            and (host_adaln is None or ("+host-adaln" in row["dtype"]) == host_adaln)
        )

    return qualifies


TARGETS = (
    Target("512² b8 fp8 ms/img", 9.0, "max", _where("fp8"), _ms),
    Target("512² b8 bf16 ms/img", 12.5, "max", _where("bf16"), _ms),
    Target(
        "512² b8 speedup vs strongest compiled diffusers",
        1.7,
        "min",
        _where(),
        _speedup(*COMPILED_BASELINES),
    ),
    Target("512² b8 speedup vs VAE decode + HPSv3", 4.3, "min", _where(), _speedup(HPSV3)),
    Target("512² b1 ms/img", 12.0, "max", _where(batch=1), _ms),
    Target("1024² b1 fp8 ms/img", 42.0, "max", _where("fp8", batch=1, resolution=1024), _ms),
    Target("512² b8 fp8 peak GiB", 8.0, "max", _where("fp8", host_adaln=False), _peak),
    Target("512² b8 fp8 peak GiB, adaln_on_host", 6.0, "max", _where("fp8", host_adaln=True), _peak),
    # the two peers on their own (the strongest of them is in the speedup target above)
    Target("512² b8 bf16 speedup vs compile+cudagraphs", None, "info", _where("bf16"), _speedup(COMPILE_CUDAGRAPHS)),
    Target("512² b8 fp8 speedup vs torchao fp8", None, "info", _where("fp8"), _speedup(TORCHAO_FP8)),
    Target("512² b1 fp8 speedup vs torchao fp8", None, "info", _where("fp8", batch=1), _speedup(TORCHAO_FP8)),
    # a DiNa-LRM-shaped reward (SD3.5-M, 12 blocks, query-attention head) against the way their inferencer runs it
    *(
        Target(
            f"DiNa-shaped 512² b{b} speedup vs diffusers+peft",
            None,
            "info",
            _where(batch=b),
            _speedup(DINA_PEFT),
            DINA_MODEL,
        )  # fmt: skip
        for b in (8, 1)
    ),
)

# FP8 fidelity (bench.gpu_check's fp8_fidelity section, variant "fp8" vs bf16): key, bound
FIDELITY_TARGETS = (
    ("spearman", 0.99),
    ("pair_order_agreement", 0.98),
    ("group_order_agreement", 0.97),  # within prompt groups of 16 latents: what GRPO's advantages use
)
KERNEL_BANDWIDTH_SHARE = 0.70  # of the measured copy bandwidth, unless faster than torch.compile of the same op
KERNEL_BATCH = 8


def _rows(data: dict) -> list[Row]:
    return [
        r
        for section in data.get("sections", {}).values()
        if isinstance(section, dict)
        for r in section.get("rows", [])
        if isinstance(r, dict) and "per_image_ms" in r and "path" in r
    ]


def fastest_baselines(rows: Iterable[Row]) -> dict[tuple[str, int, int], float]:
    """The fastest per-image ms of each baseline at each shape, over its compile modes: {(path, resolution, batch):
    ms}, from the timed rows (a skipped row has no timing)."""
    fastest: dict[tuple[str, int, int], float] = {}
    for r in rows:
        if r["path"] in BASELINE_PATHS and "per_image_ms" in r:
            key = (r["path"], r["resolution"], r["batch"])
            fastest[key] = min(fastest.get(key, float("inf")), r["per_image_ms"])
    return fastest


def _verdict(value: float, bound: float | None, kind: str) -> bool | None:
    if kind == "info":
        return None
    return value <= bound if kind == "max" else value >= bound


def evaluate(data: dict) -> list[dict[str, Any]]:
    """One line per target: bound, best measured value (uncached / cached conditioning), which row, met or not."""
    if not isinstance(data, dict) or not isinstance(data.get("sections"), dict):
        raise ValueError(
            "not a bench.gpu_check results file (expected {'sections': {...}}); a bench.latency --json file lacks "
            "the baselines and fidelity sections the targets need"
        )
    rows = _rows(data)
    baselines = fastest_baselines(rows)
    engine = [r for r in rows if r["path"].startswith("engine")]
    out = []
    for t in TARGETS:
        line: dict[str, Any] = {"target": t.name, "bound": t.bound, "kind": t.kind}
        for column, cached in (("uncached", False), ("cached", True)):
            candidates = []
            for r in engine:
                if _model(r) == t.model and t.rows(r) and r["path"].endswith("cond cached") == cached:
                    got = t.value(r, baselines)
                    if got is not None:
                        what = f"{r['path']} {r['dtype']}" + (f" vs {got[1]}" if got[1] else "")
                        candidates.append((got[0], what))
            if candidates:
                best = min(candidates) if t.kind == "max" else max(candidates)
                line[column] = {"value": round(best[0], 3), "row": best[1], "met": _verdict(best[0], t.bound, t.kind)}
        out.append(line)
    sections = data.get("sections", {})
    fidelity = sections.get("fp8_fidelity")
    if isinstance(fidelity, dict) and isinstance(fidelity.get("fp8"), dict):
        for key, bound in FIDELITY_TARGETS:
            v = fidelity["fp8"].get(key)
            if v is None:  # a figure this results file's fp8_fidelity section lacks (e.g. no grouped inputs): no line
                continue
            out.append(
                {
                    "target": f"fp8 vs bf16 rewards {key}",
                    "bound": bound,
                    "kind": "min",
                    "uncached": {"value": round(v, 4), "row": "fp8_fidelity", "met": v >= bound},
                }
            )
    out += _kernel_lines(sections)
    return out


def _kernel_lines(sections: dict) -> list[dict[str, Any]]:
    """One line per fused kernel at batch 8: its bandwidth as a share of the measured copy bandwidth, met at
    `KERNEL_BANDWIDTH_SHARE` or when faster than `torch.compile` of the same op."""
    kernel_rows = (sections.get("kernel_bench") or {}).get("rows", [])
    copy_tb_s = (sections.get("ceilings") or {}).get("copy_tb_s")
    out = []
    for r in kernel_rows:
        if r.get("batch") != KERNEL_BATCH or not copy_tb_s or "triton_us" not in r:  # (an error row: no timing)
            continue
        share = r["triton_gb_s"] / (copy_tb_s * 1e3)
        faster = r.get("compile_us") is not None and r["triton_us"] <= r["compile_us"]
        compile_note = f"compile {r['compile_us']:.0f} µs" if r.get("compile_us") is not None else "no compile timing"
        out.append(
            {
                "target": f"kernel {r['op']} b{KERNEL_BATCH}: share of copy bandwidth",
                "bound": KERNEL_BANDWIDTH_SHARE,
                "kind": "min",
                "uncached": {
                    "value": round(share, 3),
                    "row": f"triton {r['triton_us']:.0f} µs, {compile_note}",
                    "met": share >= KERNEL_BANDWIDTH_SHARE or faster,
                },
            }
        )
    return out


def format_table(lines: list[dict[str, Any]]) -> str:
    def cell(c: dict | None) -> str:
        if c is None:
            return "-"
        verdict = {True: "MET", False: "missed", None: "(no bound)"}[c["met"]]
        return f"{c['value']} {verdict} ({c['row']})"

    text = [f"{'target':<72} {'bound':>8}  {'conditioned in the call':<64} conditioning cached"]
    for line in lines:
        bound = "-" if line["bound"] is None else ("≤ " if line["kind"] == "max" else "≥ ") + str(line["bound"])
        text.append(f"{line['target']:<72} {bound:>8}  {cell(line.get('uncached')):<64} {cell(line.get('cached'))}")
    return "\n".join(text)


class TargetsArgs(Schema):
    """The command line of `python -m bench.targets`."""

    results: str = Field(min_length=1, description="a bench.gpu_check results JSON", json_schema_extra=_POSITIONAL)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_cli(TargetsArgs, argv, "python -m bench.targets", __doc__.split("\n\n")[0])
    try:
        results = read_json(args.results, "bench.gpu_check results file")
    except FileInputError as e:
        raise SystemExit(f"python -m bench.targets: RESULTS: {e}") from None
    lines = evaluate(results)
    print(format_table(lines))
    return lines


if __name__ == "__main__":
    main()
