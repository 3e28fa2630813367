"""Per-image latency and peak memory of the reward engine, side by side with the baselines, in one process.

    python -m bench.latency --interface latent            # engine (+ CUDA graphs on GPU) vs diffusers baselines
    python -m bench.latency --interface pixel             # VAE decode + VAE encode + text encoders + engine
    python -m bench.latency --interface hpsv3             # VAE decode + resize 448 + HPSv3 (Qwen2-VL-7B arch.)

Random weights throughout unless --checkpoint is given (latency and memory do not depend on the values). Without a
GPU it runs the `tiny` preset on the CPU and says so: those numbers check that everything runs, nothing more.
Latency: CUDA events, warm-up excluded, median of --iters, inputs rotated; per image = batch time / batch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bench.harness import positive_int
from bench.latency_runs import BASELINES, Bench, bench_hpsv3, bench_latent, bench_pixel
from bench.report import row_label
from bench.targets import COMPILED_BASELINES, EAGER, fastest_baselines
from bench.workload import dtype_kwargs
from engine.prompt_length import CLIP_TOKENS, SD3_T5_TOKENS, checkpoint_t5_tokens


def _dtype_name(name: str) -> str:
    """argparse type: a valid benchmark dtype name."""
    try:
        dtype_kwargs(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name


def _side(text: str) -> int:
    """argparse type: an image side in pixels, a positive multiple of 16 (VAE 8 x patch 2)."""
    value = positive_int(text)
    if value % 16:
        raise argparse.ArgumentTypeError(f"image side must be a multiple of 16 pixels (VAE 8 x patch 2), got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.split("\n\n")[0])
    p.add_argument("--interface", choices=("latent", "pixel", "hpsv3"), default="latent")
    p.add_argument("--preset", default=None, help="backbone preset (default: sd35-large on GPU, tiny on CPU)")
    p.add_argument("--resolution", type=_side, nargs="+", default=None, help="image side(s) in pixels (default 512)")
    p.add_argument("--batch", type=positive_int, nargs="+", default=[1, 8])
    p.add_argument(
        "--dtype",
        type=_dtype_name,
        nargs="+",
        default=None,
        help="bf16|fp8|fp32, then optional +variants: +adaln (fp8 adaLN weights, weight-only), +fast-accum (Hopper "
        "fast FP8 accumulation), +host-adaln (adaLN weights in pinned host memory, streamed by condition(): time "
        "the cached rows)",
    )
    p.add_argument(
        "--text-len",
        type=positive_int,
        default=None,
        help="text tokens: 77 CLIP + T5 tokens; default: the --checkpoint's trained length, else 333 = SD3's default; "
        "205 = Flow-GRPO",
    )
    p.add_argument(
        "--baselines",
        nargs="*",
        choices=tuple(BASELINES),
        default=None,
        help="also time these diffusers baselines in the same process (no names: all of them): "
        + ", ".join(f"{k} = '{v}'" for k, v in BASELINES.items()),
    )
    p.add_argument(
        "--compile-modes",
        nargs="+",
        choices=("reduce-overhead", "max-autotune", "default"),
        default=None,
        help="torch.compile modes of the whole-model baselines (default: reduce-overhead and max-autotune on a GPU, "
        "default on the CPU)",
    )
    p.add_argument("--no-engine", action="store_true", help="time only the baselines (with --baselines)")
    p.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph engine path")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="reward checkpoint dir (real weights; needs --base unless it carries every backbone weight)",
    )
    p.add_argument("--base", default=None, help="SD3.5 diffusers dir or single file for --checkpoint")
    p.add_argument("--iters", type=positive_int, default=10)
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.text_len is None:
        args.text_len = CLIP_TOKENS + (checkpoint_t5_tokens(args.checkpoint) if args.checkpoint else SD3_T5_TOKENS)
    if args.baselines == []:
        args.baselines = list(BASELINES)
    if args.no_engine and not args.baselines:
        p.error("--no-engine needs --baselines")
    if args.interface == "pixel" and args.text_len <= 77:
        p.error(
            f"--text-len must exceed 77 for the pixel interface (77 CLIP tokens + at least one T5), got {args.text_len}"
        )
    return args


def print_table(rows: list[dict]) -> None:
    """The rows, with speedups vs diffusers eager and vs the strongest compiled baseline of the same shape."""
    eager, compiled = {}, {}
    for (path, resolution, batch), ms in fastest_baselines(rows).items():
        key = (resolution, batch)
        if path == EAGER:
            eager[key] = ms
        if path in COMPILED_BASELINES:
            compiled[key] = min(compiled.get(key, float("inf")), ms)
    print(
        f"\n{'interface':<9} {'path':<40} {'dtype':<15} {'res':>5} {'b':>3} {'ms/img':>9} {'peak GiB':>9} "
        f"{'TFLOP/s':>8} {'% floor':>8} {'vs eager':>9} {'vs best compile':>15}"
    )
    for r in rows:
        label = row_label(r)
        if "per_image_ms" not in r:
            print(f"{r.get('interface', '-'):<9} {label:<40} {r.get('dtype', '-'):<15} {r['skipped']}")
            continue
        ratios = []
        for base in (eager, compiled):
            ref = base.get((r["resolution"], r["batch"]))
            ratios.append(f"{ref / r['per_image_ms']:.2f}x" if ref and r["interface"] == "latent" else "-")
        print(
            f"{r['interface']:<9} {label:<40} {r['dtype']:<15} {r['resolution']:>5} {r['batch']:>3} "
            f"{r['per_image_ms']:>9.2f} {r['peak_gib'] if r['peak_gib'] is not None else '-':>9} "
            f"{r.get('tflop_s', '-'):>8} {r.get('floor_pct', '-'):>8} {ratios[0]:>9} {ratios[1]:>15}"
        )


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    preset = args.preset or ("sd35-large" if on_gpu else "tiny")
    resolutions = args.resolution or ([512] if on_gpu else [256])
    dtypes = args.dtype or (["bf16"] if on_gpu else ["fp32"])
    if not on_gpu:
        print(
            f"No GPU: running the '{preset}' preset on the CPU with random weights. These numbers only show that "
            "every path runs; GPU numbers are in bench/results/.",
            file=sys.stderr,
        )
    print(
        f"DiT-Reward latency, interface={args.interface}, preset={preset}, device={device}, random weights="
        f"{not args.checkpoint}",
        file=sys.stderr,
    )
    b = Bench(args, device)
    if args.interface == "latent":
        bench_latent(b, preset, resolutions, dtypes)
    elif args.interface == "pixel":
        bench_pixel(b, preset, resolutions, dtypes)
    else:
        bench_hpsv3(b, resolutions)
    print_table(b.rows)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"env": b.env, "rows": b.rows}, indent=1))
    return b.rows


if __name__ == "__main__":
    main()
