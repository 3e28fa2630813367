"""Per-image latency and peak memory of the reward engine, side by side with the baselines, in one process.

    python -m bench.latency --interface latent            # engine (+ CUDA graphs on GPU) vs diffusers baselines
    python -m bench.latency --interface pixel             # VAE decode + VAE encode + text encoders + engine
    python -m bench.latency --interface hpsv3             # VAE decode + resize 448 + HPSv3 (Qwen2-VL-7B arch.)
    python -m bench.latency --reward dina --baselines peft  # DiNa-LRM-shaped engine vs diffusers + peft (bench.dina)

Random weights throughout unless --checkpoint is given (latency and memory do not depend on the values). Without a
GPU it runs the `tiny` preset on the CPU and says so: those numbers check that everything runs, nothing more.
Latency: CUDA events, warm-up excluded, median of --iters, inputs rotated; per image = batch time / batch.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import AfterValidator, Field, model_validator

from bench.latency_runs import BASELINES, Bench, bench_hpsv3, bench_latent, bench_pixel
from bench.report import row_label
from bench.targets import COMPILED_BASELINES, DINA_PEFT, EAGER, fastest_baselines
from bench.workload import BASE_DTYPES, FP8_ONLY, VARIANTS, dtype_kwargs
from engine.config import PRESETS
from engine.io.dina import T5_TOKENS as DINA_T5_TOKENS
from engine.prompt_length import CLIP_TOKENS, SD3_T5_TOKENS, checkpoint_t5_tokens
from engine.schema import Schema, invalid, parse_cli


def _checked_dtype(name: str) -> str:
    try:
        dtype_kwargs(name)
    except ValueError:
        forms = (
            f"<{'|'.join(BASE_DTYPES)}>[+{'|+'.join(VARIANTS)}...], each variant once, +{'/+'.join(FP8_ONLY)} on fp8"
        )
        raise ValueError(forms) from None
    return name


Side = Annotated[int, Field(ge=16, le=8192, multiple_of=16)]  # pixels: VAE 8 x patch 2
# --reward -> its --baselines names and their row labels; the presets a DiNa-shaped reward fits (bench.dina)
REWARD_BASELINES = {"dit-reward": BASELINES, "dina": {"peft": DINA_PEFT}}
DINA_PRESETS = ("sd35-medium", "sd3-medium", "tiny")
BenchDtype = Annotated[str, AfterValidator(_checked_dtype)]


class LatencyArgs(Schema):
    """The command line of `python -m bench.latency`."""

    interface: Literal["latent", "pixel", "hpsv3"] = "latent"
    reward: Literal[tuple(REWARD_BASELINES)] = Field(
        "dit-reward",
        description="dit-reward: the mean-pool head (DiT-Reward); dina: a DiNa-LRM-shaped reward (the first 12 blocks "
        "with a LoRA merged, the query-attention head over blocks 4/8/12's image and text tokens, t = their u; "
        "default preset sd35-medium on GPU), its baseline 'peft' = diffusers blocks + the peft LoRA unmerged, bf16",
    )
    preset: Literal[tuple(PRESETS)] | None = Field(
        None, description="backbone preset (default: sd35-large on GPU, tiny on CPU)"
    )
    resolution: list[Side] | None = Field(None, min_length=1, description="image side(s) in pixels (default 512)")
    batch: list[Annotated[int, Field(ge=1, le=4096)]] = Field([1, 8], min_length=1, description="images per call")
    dtype: list[BenchDtype] | None = Field(
        None,
        min_length=1,
        description="bf16|fp8|fp32, then optional +variants: +adaln (fp8 adaLN weights, weight-only), +fast-accum "
        "(Hopper fast FP8 accumulation), +host-adaln (adaLN weights in pinned host memory, streamed by condition(): "
        "time the cached rows)",
    )
    text_len: int | None = Field(
        None,
        ge=1,
        le=CLIP_TOKENS + 4096,
        description="text tokens: 77 CLIP + T5 tokens; default: the --checkpoint's trained length, else 333 = SD3's "
        "default (--reward dina: 205, its training length); 205 = Flow-GRPO",
    )
    baselines: list[Literal[tuple(name for names in REWARD_BASELINES.values() for name in names)]] | None = Field(
        None,
        description="also time these diffusers baselines in the same process (no names: all of the --reward's): "
        + ", ".join(f"{k} = '{v}'" for names in REWARD_BASELINES.values() for k, v in names.items()),
        json_schema_extra={"cli": {"nargs": "*"}},
    )
    compile_modes: list[Literal["reduce-overhead", "max-autotune", "default"]] | None = Field(
        None,
        min_length=1,
        description="torch.compile modes of the whole-model baselines (default: reduce-overhead and max-autotune on a "
        "GPU, default on the CPU)",
    )
    no_engine: bool = Field(False, description="time only the baselines (with --baselines)")
    no_graphs: bool = Field(False, description="skip the CUDA-graph engine path")
    checkpoint: str | None = Field(
        None, min_length=1, description="reward checkpoint dir (real weights; needs --base unless it carries every "
        "backbone weight)"
    )  # fmt: skip
    base: str | None = Field(None, min_length=1, description="SD3.5 diffusers dir or single file for --checkpoint")
    iters: int = Field(10, ge=1, le=100_000, description="timed calls per row")
    json_out: str | None = Field(None, min_length=1, description="write the rows as JSON here",
                                 json_schema_extra={"cli": {"flag": "--json"}})  # fmt: skip
    fail_path: str | None = Field(
        None, description="testing: make the rows of this path (e.g. 'diffusers eager+hooks') raise, to see its error "
        "rows", json_schema_extra={"cli": {"metavar": "LABEL"}}
    )  # fmt: skip

    @model_validator(mode="after")
    def _consistent(self) -> LatencyArgs:
        if self.no_engine and not self.baselines:
            raise invalid("no_engine", True, "--baselines beside it (nothing else would be timed)")
        if self.interface == "pixel" and self.text_len is not None and self.text_len <= CLIP_TOKENS:
            raise invalid("text_len", self.text_len, f"more than {CLIP_TOKENS} (77 CLIP tokens + at least one T5)")
        other = [b for b in self.baselines or [] if b not in REWARD_BASELINES[self.reward]]
        if other:
            raise invalid(
                "baselines", other, f"baselines of --reward {self.reward}: {list(REWARD_BASELINES[self.reward])}"
            )
        if self.reward == "dina":
            if self.interface != "latent":
                raise invalid("interface", self.interface, "latent with --reward dina (the latent interface)")
            if self.checkpoint is not None:
                raise invalid("checkpoint", self.checkpoint, "none with --reward dina (random weights; time a "
                              "DiNa-LRM checkpoint with --checkpoint alone)")  # fmt: skip
            if self.preset is not None and self.preset not in DINA_PRESETS:
                raise invalid("preset", self.preset, f"one of {list(DINA_PRESETS)} with --reward dina (24 or 4 blocks)")
        return self


def parse_args(argv: list[str] | None = None) -> LatencyArgs:
    args = parse_cli(LatencyArgs, argv, "python -m bench.latency", __doc__.split("\n\n")[0])
    if args.baselines == []:
        args.baselines = list(REWARD_BASELINES[args.reward])
    if args.text_len is None:
        t5 = checkpoint_t5_tokens(args.checkpoint) if args.checkpoint else SD3_T5_TOKENS
        args.text_len = CLIP_TOKENS + (DINA_T5_TOKENS if args.reward == "dina" else t5)
    return args


def print_table(rows: list[dict]) -> None:
    """The rows, with speedups vs diffusers eager and vs the strongest compiled baseline of the same shape."""
    eager, compiled = {}, {}
    for (path, resolution, batch), ms in fastest_baselines(rows).items():
        key = (resolution, batch)
        if path in (EAGER, DINA_PEFT):  # (one --reward per run: the eager baseline of its reward)
            eager[key] = ms
        if path in COMPILED_BASELINES:
            compiled[key] = min(compiled.get(key, float("inf")), ms)
    print(
        f"\n{'interface':<9} {'path':<48} {'dtype':<15} {'res':>5} {'b':>3} {'ms/img':>9} {'peak GiB':>9} "
        f"{'TFLOP/s':>8} {'% floor':>8} {'vs eager':>9} {'vs best compile':>15}"
    )
    for r in rows:
        label = row_label(r)
        if "per_image_ms" not in r:
            why = r.get("skipped") or r.get("error")
            print(f"{r.get('interface', '-'):<9} {label:<48} {r.get('dtype', '-'):<15} {why}")
            continue
        ratios = []
        for base in (eager, compiled):
            ref = base.get((r["resolution"], r["batch"]))
            ratios.append(f"{ref / r['per_image_ms']:.2f}x" if ref and r["interface"] == "latent" else "-")
        print(
            f"{r['interface']:<9} {label:<48} {r['dtype']:<15} {r['resolution']:>5} {r['batch']:>3} "
            f"{r['per_image_ms']:>9.2f} {r['peak_gib'] if r['peak_gib'] is not None else '-':>9} "
            f"{r.get('tflop_s', '-'):>8} {r.get('floor_pct', '-'):>8} {ratios[0]:>9} {ratios[1]:>15}"
        )


def main(
    argv: list[str] | None = None, *, sink: Callable[[dict], None] | None = None, deadline: float | None = None
) -> list[dict]:
    """Run the benchmark; `sink` and `deadline` as in `Bench` (rows written as they come; a time budget)."""
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    preset = args.preset or (("sd35-medium" if args.reward == "dina" else "sd35-large") if on_gpu else "tiny")
    resolutions = args.resolution or ([512] if on_gpu else [256])
    dtypes = args.dtype or (["bf16"] if on_gpu else ["fp32"])
    if not on_gpu:
        print(
            f"No GPU: running the '{preset}' preset on the CPU with random weights. These numbers only show that "
            "every path runs; GPU numbers are in bench/results/.",
            file=sys.stderr,
        )
    print(
        f"DiT-Reward latency, reward={args.reward}, interface={args.interface}, preset={preset}, device={device}, "
        "random weights="
        f"{not args.checkpoint}",
        file=sys.stderr,
    )
    b = Bench(args, device, sink=sink, deadline=deadline)
    if args.reward == "dina":
        from bench.dina import bench_dina

        bench_dina(b, preset, resolutions, dtypes)
    elif args.interface == "latent":
        bench_latent(b, preset, resolutions, dtypes)
    elif args.interface == "pixel":
        bench_pixel(b, preset, resolutions, dtypes)
    else:
        bench_hpsv3(b, resolutions)
    print_table(b.rows)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps({"env": b.env, "rows": b.rows}, indent=1))
    return b.rows


if __name__ == "__main__":
    main()
