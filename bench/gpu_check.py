"""One GPU session, one call: correctness of every fast path, then every timing, engine and baselines in one process.

    python -m bench.gpu_check --out DIR [--deadline-s 420] [--only SECTION ...]
    python -m bench.gpu_check --out DIR --cpu-smoke      # every section on the tiny preset, on the CPU

Sections run in priority order and the JSON is rewritten after each, so a run cut short still reports what it did;
optional sections are skipped (and marked so) once the deadline nears. Random SD3.5-Large weights (latency and memory
do not depend on the values). `--cpu-smoke` runs the same code on the `tiny` preset with small shapes, the FP8 path
through torch._scaled_mm's CPU emulation and the Triton kernels interpreted: it proves the script before device time
is spent on it (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

if "--cpu-smoke" in sys.argv:  # before anything imports triton: its CPU interpreter must be chosen at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from bench.fp8_fidelity import fp8_fidelity  # noqa: E402
from bench.gpu_sections import (  # noqa: E402
    T0,
    Setup,
    adaln_on_host,
    attention_bench,
    engine_parity,
    kernel_bench,
    kernel_tests,
    latency,
    log,
    profile,
)


class Report:
    def __init__(self, out: Path, deadline_s: float):
        self.out, self.deadline, self.only = out, deadline_s, None
        self.data: dict = {"sections": {}, "skipped": [], "errors": {}}

    def left(self) -> float:
        return self.deadline - (time.perf_counter() - T0)

    def section(self, name: str, fn, need_s: float = 0.0) -> None:
        if self.only is not None and name not in self.only:
            return
        if self.left() < need_s:
            log(f"SKIP {name}: {self.left():.0f}s left, needs ~{need_s:.0f}s")
            self.data["skipped"].append(name)
            return
        log(f"--- {name}")
        start = time.perf_counter()
        try:
            self.data["sections"][name] = fn()
        except Exception as e:  # keep going: the other sections are still worth their device time
            self.data["errors"][name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"
            log(f"ERROR in {name}: {type(e).__name__}: {e}")
        log(f"    {name} took {time.perf_counter() - start:.1f}s")
        self.save()

    def save(self) -> None:
        (self.out / "gpu_results.json").write_text(json.dumps(self.data, indent=1, default=str))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="no optional section starts after this many seconds (default 420; with --cpu-smoke 3600: every section "
        "must run, on a CPU that compiles for minutes)",
    )
    p.add_argument("--only", nargs="*", default=None, help="run just these sections")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny preset on the CPU: check the script, not the GPU")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--cpu-smoke needs TRITON_INTERPRET=1 set before triton is imported")
        Setup.cpu_smoke()
    elif not torch.cuda.is_available():
        raise SystemExit("bench.gpu_check needs a CUDA GPU (or --cpu-smoke to check the script on the CPU)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline_s = args.deadline_s if args.deadline_s is not None else (3600 if args.cpu_smoke else 420)
    rep = Report(out, deadline_s)
    rep.only = args.only
    from bench.harness import ceilings, environment_info
    from engine.runtime import ops

    on_cuda = Setup.device == "cuda"
    rep.data["env"] = environment_info(Setup.device)
    rep.data["cpu_smoke"] = args.cpu_smoke
    lat512 = ["--resolution", "512", "--batch", "1", "8", "--baselines", "eager", "regional"]
    lat512 += ["--dtype", "bf16", "fp8", "fp8+fast-accum", "fp8+host-adaln"]
    # the whole-model compiled peers, each a fresh model compiled (and CUDA-graph captured) per batch size
    peers = ["--no-engine", "--resolution", "512", "--batch", *Setup.compile_batches]
    graphs = [*peers, "--baselines", "cudagraphs", "torchao-fp8", "--compile-modes", "reduce-overhead"]
    autotune = [*peers, "--baselines", "cudagraphs", "--compile-modes", "max-autotune"]
    hps = ["--interface", "hpsv3", "--resolution", "512", "--batch", "1", "8"]
    lat1024 = ["--resolution", "1024", "--batch", "1", "--dtype", "bf16", "fp8"]
    grpo = ["--resolution", "512", "--batch", "24", "--iters", "5", "--dtype", "fp8"]  # one GRPO group per call
    sections = [  # (name, what, seconds it needs to be worth starting), in priority order
        ("ceilings", lambda: ceilings(Setup.device), 0),
        ("kernel_tests", kernel_tests, 60),
        ("gelu_epilogue_is_tanh", lambda: ops.gelu_epilogue_ok(torch.bfloat16), 0),
        ("engine_parity", engine_parity, 60),
        ("latency_512", lambda: latency([*lat512, "--json", str(out / "latency_512.json")]), 120),
        ("compiled_peers_512", lambda: latency([*graphs, "--json", str(out / "compiled_peers_512.json")]), 150),
        ("adaln_on_host", adaln_on_host, 40),
        ("hpsv3", lambda: latency([*hps, "--json", str(out / "hpsv3.json")]), 60),
        ("fp8_fidelity", fp8_fidelity, 50),
        ("latency_1024", lambda: latency([*lat1024, "--json", str(out / "latency_1024.json")]), 60),
        ("latency_512_b24", lambda: latency([*grpo, "--json", str(out / "latency_512_b24.json")]), 40),
        ("profile_fp8", lambda: profile("fp8"), 40),
        ("profile_fp8_b1", lambda: profile("fp8", batch=1), 40),
        ("profile_bf16", lambda: profile("bf16"), 40),
        ("kernel_bench", lambda: kernel_bench(with_compile=on_cuda and rep.left() > 120), 20),
        ("attention", attention_bench, 15),
        # max-autotune tunes every GEMM shape: minutes; last, so that it never displaces a measurement of the engine
        ("max_autotune_512", lambda: latency([*autotune, "--json", str(out / "max_autotune_512.json")]), 200),
    ]
    if not on_cuda:  # the GELU check runs CUDA's epilogue; max-autotune is compiled_peers_512's code in another mode
        sections = [s for s in sections if s[0] not in ("gelu_epilogue_is_tanh", "max_autotune_512")]
    names = [name for name, _, _ in sections]
    if args.only is not None and (not args.only or set(args.only) - set(names)):
        p.error(f"--only takes section names among {names}, got {args.only}")
    for name, fn, need_s in sections:
        rep.section(name, fn, need_s=need_s)
    from bench.targets import evaluate, format_table

    rep.data["targets"] = evaluate(rep.data)
    log("targets:\n" + format_table(rep.data["targets"]))
    log(f"done; skipped: {rep.data['skipped']}; errors: {list(rep.data['errors'])}")
    rep.save()
    return rep.data


if __name__ == "__main__":
    main()
