"""One GPU session, one call: correctness of every fast path, then every timing, engine and baselines in one process.

    python -m bench.gpu_check --plan                     # the prepared device command and each section's time
    python -m bench.gpu_check --out DIR [--deadline-s 490] [--only SECTION ...]
    python -m bench.gpu_check --out DIR --cpu-smoke      # every section on the tiny preset, on the CPU

Nothing measured is lost: every row is appended to DIR/rows.jsonl (flushed and synced) the moment it exists and
DIR/gpu_results.json is rewritten (atomically) after it, so a run killed at any point keeps every finished row. A
row whose code fails becomes an "error: ..." row and its section goes on. Sections run in order of value (`PLAN`),
each within its own time budget (no row starts after it) and only while the run's deadline leaves it its `need_s`;
a section not started is listed as skipped, with the reason. Each section's measured seconds are recorded
(`section_seconds`), from which `PLAN`'s estimates are set. The output folder holds these two files and the log the
command tees (three in all). Random SD3.5-Large weights (latency and memory do not depend on the values).

`--cpu-smoke` runs the same code on the `tiny` preset with small shapes, the FP8 path through torch._scaled_mm's CPU
emulation, the Triton kernels interpreted and torch.compile through inductor on the CPU: it proves the script
(every row type, the compiled ones and the error rows included) before device time is spent on it; its numbers mean
nothing.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

if "--cpu-smoke" in sys.argv:  # before anything imports triton: its CPU interpreter must be chosen at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from pydantic import Field, model_validator  # noqa: E402

from bench.gpu_sections import T0, Section, Setup, log  # noqa: E402
from engine.schema import Schema, invalid, parse_cli  # noqa: E402

DEADLINE_S = 490  # the run's own deadline: with the wheel install and imports, ~60 s of margin in a 570 s call
CALL_TIMEOUT_S = 570


@dataclass(frozen=True)
class Planned:
    """A section's place in the run: `need_s` left before the deadline to start it, `budget_s` it may take at most
    (no row starts after that), `predicted_s` what it is expected to take on an H100/H200 (PERF_NOTES' plan)."""

    name: str
    need_s: float
    budget_s: float
    predicted_s: float


# In order of value. Predicted seconds (bench/PERF_NOTES.md, "Plan of the next device session"): the seconds per row
# of bench/results/2026-11-26-h200-run3.json times the rows each section makes (counted in the CPU smoke's
# rows.jsonl); the compiled peers from an estimate of 60-150 s per whole-model compile of SD3.5-L (not measured).
PLAN = (
    Planned("ceilings", 0, 10, 1),
    Planned("kernel_tests", 20, 60, 15),
    Planned("gelu_epilogue_is_tanh", 0, 10, 1),
    Planned("engine_parity", 20, 60, 15),
    Planned("latency_512", 60, 170, 115),
    Planned("fp8_fidelity", 60, 130, 70),
    Planned("adaln_on_host", 30, 60, 30),
    Planned("latency_1024", 15, 40, 16),
    Planned("latency_512_b24", 15, 40, 15),
    Planned("profile_fp8", 5, 20, 3),
    Planned("profile_fp8_b1", 5, 20, 3),
    Planned("profile_bf16", 5, 20, 3),
    Planned("kernel_bench", 20, 70, 45),
    Planned("attention", 3, 15, 2),
    # compile+cudagraphs b8 first (one compile, 60-150 s), then torchao fp8 b8 only while 120 s of the run remain
    Planned("peers_512_b8", 120, 330, 120),
    # DiNa-LRM-shaped engine (SD3.5-M, 12 blocks, query-attention head) vs diffusers + peft: call 2's first section
    Planned("dina_512", 30, 90, 35),
    Planned("peers_512_b1", 120, 330, 150),
    Planned("hpsv3", 20, 40, 15),  # in bench/results/2026-11-26-h200-run3.json: last
    Planned("max_autotune_512", 400, 900, 600),  # only with --max-autotune: it tunes every GEMM shape
)
STARTUP_S = 15  # wheel install and imports, before the first section starts (its T0)
PLANNED_S = 480  # what call 1's predicted sections may add up to (startup included), 10 s under its deadline


class Report:
    """The output folder: rows.jsonl (append-only, one record per line) and gpu_results.json (the whole run so far)."""

    def __init__(self, out: Path, deadline_s: float):
        # the deadline counts from here, after the imports (the plan's STARTUP_S covers those)
        self.out, self.deadline = out, time.perf_counter() + deadline_s
        self.data: dict = {"sections": {}, "skipped": {}, "errors": {}, "section_seconds": {}}

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def record(self, entry: dict) -> None:
        """One line of rows.jsonl, on disk before this returns, then gpu_results.json rewritten."""
        with (self.out / "rows.jsonl").open("a", encoding="utf-8") as jsonl:
            jsonl.write(json.dumps({"t": round(time.perf_counter() - T0, 1), **entry}, default=str) + "\n")
            jsonl.flush()
            os.fsync(jsonl.fileno())
        self.save()

    def save(self) -> None:
        tmp = self.out / "gpu_results.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.out / "gpu_results.json")  # atomic: a kill leaves the previous or the new file whole

    def section(self, plan: Planned, fn) -> None:
        name = plan.name
        if self.left() < plan.need_s:
            reason = f"{self.left():.0f} s left of the run, needs {plan.need_s:.0f} s"
            log(f"SKIP {name}: {reason}")
            self.data["skipped"][name] = reason
            self.record({"section": name, "skipped": reason})
            return
        log(f"--- {name}")
        start = time.perf_counter()
        entry = self.data["sections"][name] = {"rows": [], "complete": False}

        def sink(row: dict) -> None:
            entry["rows"].append(row)
            self.record({"section": name, "row": row})

        sec = Section(name, sink, deadline=min(self.deadline, start + plan.budget_s))
        try:
            result = fn(sec)
            if isinstance(result, dict):
                entry.update(result)
            elif result is not None:
                entry["result"] = result
        except Exception as e:  # keep going: the other sections are still worth their device time
            self.data["errors"][name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"
            log(f"ERROR in {name}: {type(e).__name__}: {e}")
        took = time.perf_counter() - start
        entry["complete"] = True
        self.data["section_seconds"][name] = round(took, 1)
        log(f"    {name} took {took:.1f}s")
        summary = {k: v for k, v in entry.items() if k != "rows"}
        self.record({"section": name, "seconds": round(took, 1), "error": self.data["errors"].get(name), **summary})


def section_functions(fail_path: str | None) -> dict:
    """name -> fn(Section) for every section of `PLAN` this device runs."""
    from bench.fp8_fidelity import fp8_fidelity
    from bench.gpu_sections import adaln_on_host, attention_bench, engine_parity, kernel_tests, latency, profile
    from bench.harness import ceilings
    from bench.kernel_bench import kernel_bench
    from engine.runtime import ops

    on_cuda = Setup.device == "cuda"
    fail = ["--fail-path", fail_path] if fail_path else []
    lat512 = ["--resolution", "512", "--batch", "1", "8", "--baselines", "eager", "regional", *fail]
    lat512 += ["--dtype", "bf16", "fp8", "fp8+fast-accum", "fp8+host-adaln"]
    # the whole-model compiled peers, each a fresh model compiled (and CUDA-graph captured) per batch size
    peers = ["--no-engine", "--resolution", "512", "--compile-modes", "reduce-overhead"]
    peers += ["--baselines", "cudagraphs", "torchao-fp8", *fail]
    autotune = ["--no-engine", "--resolution", "512", "--batch", "8", "--baselines", "cudagraphs"]
    hps = ["--interface", "hpsv3", "--resolution", "512", "--batch", "1", "8"]
    lat1024 = ["--resolution", "1024", "--batch", "1", "--dtype", "bf16", "fp8"]
    grpo = ["--resolution", "512", "--batch", "24", "--iters", "5", "--dtype", "fp8"]  # one GRPO group per call
    dina = ["--reward", "dina", "--resolution", "512", "--batch", "1", "8", "--baselines", "peft", *fail]
    fns = {
        "ceilings": lambda sec: ceilings(Setup.device),
        "kernel_tests": kernel_tests,
        "gelu_epilogue_is_tanh": lambda sec: ops.gelu_epilogue_ok(torch.bfloat16),
        "engine_parity": engine_parity,
        "latency_512": lambda sec: latency(sec, lat512),
        "fp8_fidelity": fp8_fidelity,
        "adaln_on_host": adaln_on_host,
        "latency_1024": lambda sec: latency(sec, lat1024),
        "latency_512_b24": lambda sec: latency(sec, grpo),
        "profile_fp8": lambda sec: profile(sec, "fp8"),
        "profile_fp8_b1": lambda sec: profile(sec, "fp8", batch=1),
        "profile_bf16": lambda sec: profile(sec, "bf16"),
        "kernel_bench": lambda sec: kernel_bench(sec, Setup.kernel_compile_batches, Setup.kernel_compile_ops),
        "attention": attention_bench,
        **{
            name: lambda sec, batch=batch: latency(sec, [*peers, "--batch", batch])
            for name, batch in Setup.peer_batches.items()
        },
        "dina_512": lambda sec: latency(sec, dina),
        "hpsv3": lambda sec: latency(sec, hps),
        "max_autotune_512": lambda sec: latency(sec, [*autotune, "--compile-modes", "max-autotune"]),
    }
    if not on_cuda:  # the GELU check runs CUDA's epilogue; max-autotune is the peers' code in another mode (and the
        # CPU smoke compiles the peers at one batch size: a minute of inductor each)
        del fns["gelu_epilogue_is_tanh"], fns["max_autotune_512"]
    return fns


def device_command(sha: str = "<sha>", deadline_s: float = DEADLINE_S) -> str:
    """The one command a device call runs (`run` tool, timeout CALL_TIMEOUT_S, `.whl` carried)."""
    return (
        "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
        f".whl/*.whl && export PYTHONPATH=/tmp/site:$PWD DITREWARD_COMMIT={sha} && "
        f"python3 -m bench.gpu_check --out $OUT --deadline-s {deadline_s:.0f} 2>&1 | tee $OUT/gpu_check.log; "
        "python3 -m bench.targets $OUT/gpu_results.json"
    )


def plan_text(max_autotune: bool = False) -> str:
    """The prepared device session: wheels, the call, and each section's predicted time (`--plan`)."""
    sections = [p for p in PLAN if max_autotune or p.name != "max_autotune_512"]
    lines = [
        "Here, once: build the wheels the bare GPU machine lacks (pure Python, into the ignored .whl/;",
        "importlib_metadata is not among them: Python 3.12's importlib.metadata serves diffusers, and",
        "importlib_metadata 10 needs lazy_importer, which the machine lacks):",
        "  rm -rf .whl && python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 "
        "--implementation cp -d .whl diffusers==0.42.1 torchao==0.18.0",
        f"Device call 1 (run tool: timeout_s={CALL_TIMEOUT_S}, carry ['.whl']):",
        "  " + device_command(),
        f"Deadline {DEADLINE_S} s after imports: ~{CALL_TIMEOUT_S - DEADLINE_S} s of margin in the call, with the "
        "install and imports.",
        "",
        f"{'section':<22} {'need_s':>7} {'budget_s':>9} {'predicted_s':>12} {'cumulative':>11}",
    ]
    total = STARTUP_S
    lines.append(f"{'(startup)':<22} {'':>7} {'':>9} {STARTUP_S:>12.0f} {total:>11.0f}")
    fits = []
    for p in sections:
        total += p.predicted_s
        if total <= PLANNED_S:
            fits.append(p.name)
        mark = "" if total <= PLANNED_S else "   (call 2)"
        lines.append(f"{p.name:<22} {p.need_s:>7.0f} {p.budget_s:>9.0f} {p.predicted_s:>12.0f} {total:>11.0f}{mark}")
    first = sum(p.predicted_s for p in sections if p.name in fits) + STARTUP_S
    rest = [p.name for p in sections if p.name not in fits]
    lines += [
        "",
        f"Call 1 is predicted to run {len(fits)} sections in {first:.0f} s (planned <= {PLANNED_S} s, deadline "
        f"{DEADLINE_S} s); torchao fp8 b8 starts in it only if 120 s remain.",
        "Call 2, only if the session has >= 5 min of device time left: the sections call 1 skipped or stopped,",
        f"  ... python3 -m bench.gpu_check --out $OUT --deadline-s {DEADLINE_S} --only {' '.join(rest)} ...",
        "  (in the command above; a section listed under 'skipped' in call 1's gpu_results.json goes here too).",
    ]
    return "\n".join(lines)


class GpuCheckArgs(Schema):
    """The command line of `python -m bench.gpu_check`."""

    out: str | None = Field(None, min_length=1, description="output folder (rows.jsonl, gpu_results.json)")
    deadline_s: float | None = Field(
        None,
        gt=0,
        le=7 * 24 * 3600,
        description=f"no section starts this many seconds after the report starts (default {DEADLINE_S}; with "
        "--cpu-smoke 3600: every section must run, on a CPU that compiles for minutes)",
    )
    only: list[Literal[tuple(plan.name for plan in PLAN)]] | None = Field(
        None, min_length=1, description="run just these sections"
    )
    cpu_smoke: bool = Field(False, description="tiny preset on the CPU: check the script, not the GPU")
    plan: bool = Field(False, description="print the prepared device command and section times, exit")
    max_autotune: bool = Field(False, description="also time max-autotune (minutes of GEMM tuning)")
    fail_path: str | None = Field(
        None, description="testing: make this latency path's rows fail", json_schema_extra={"cli": {"metavar": "LABEL"}}
    )

    @model_validator(mode="after")
    def _consistent(self) -> GpuCheckArgs:
        if self.out is None and not self.plan:
            raise invalid("out", None, "an output folder (or --plan)")
        if self.only and "max_autotune_512" in self.only and not self.max_autotune:
            raise invalid("only", self.only, "max_autotune_512 only with --max-autotune")
        return self


def main(argv: list[str] | None = None) -> dict:
    args = parse_cli(GpuCheckArgs, argv, "python -m bench.gpu_check", __doc__.split("\n\n")[0])
    if args.plan:
        print(plan_text(args.max_autotune))
        return {}
    if args.cpu_smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--cpu-smoke needs TRITON_INTERPRET=1 set before triton is imported")
        Setup.cpu_smoke()
    elif not torch.cuda.is_available():
        raise SystemExit("bench.gpu_check needs a CUDA GPU (or --cpu-smoke to check the script on the CPU)")
    fns = section_functions(args.fail_path)
    if not args.max_autotune:
        fns.pop("max_autotune_512", None)
    plans = [plan for plan in PLAN if plan.name in fns]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rep = Report(out, args.deadline_s if args.deadline_s is not None else (3600 if args.cpu_smoke else DEADLINE_S))
    from bench.harness import environment_info

    rep.data["env"] = environment_info(Setup.device)
    rep.data["cpu_smoke"] = args.cpu_smoke
    rep.data["plan"] = {plan.name: plan.predicted_s for plan in plans}
    for plan in plans:
        if args.only is None or plan.name in args.only:
            rep.section(plan, fns[plan.name])
    from bench.targets import evaluate, format_table

    rep.data["targets"] = evaluate(rep.data)
    log("targets:\n" + format_table(rep.data["targets"]))
    log(f"done; skipped: {list(rep.data['skipped'])}; errors: {list(rep.data['errors'])}")
    rep.record({"done": True, "section_seconds": rep.data["section_seconds"]})
    return rep.data


if __name__ == "__main__":
    main()
