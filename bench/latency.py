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
import gc
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.costs import engine_costs
from bench.harness import ceilings, environment_info, measure_peak, positive_int, time_fn
from bench.targets import COMPILE_CUDAGRAPHS, COMPILED_BASELINES, EAGER, REGIONAL_COMPILE, TORCHAO_FP8
from engine import RewardEngine
from engine.config import BackboneConfig

FULL_SIZE = {  # SD3 VAE and text encoders at their real sizes (for the pixel/hpsv3 interfaces on GPU)
    "vae": dict(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        norm_num_groups=32,
        sample_size=1024,
        shift_factor=0.0609,
        scaling_factor=1.5305,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
}


# --baselines names and the row labels they produce (labels shared with bench.targets and bench.report)
BASELINES = {"eager": EAGER, "regional": REGIONAL_COMPILE, "cudagraphs": COMPILE_CUDAGRAPHS, "torchao-fp8": TORCHAO_FP8}

BASE_DTYPES = ("bf16", "fp8", "fp32")
VARIANTS = {  # "+<variant>" suffixes of a benchmark dtype name, and the engine arguments they set
    "adaln": {"fp8_adaln": True},  # adaLN weights e4m3 too (fp8 only)
    "fast-accum": {"fp8_fast_accum": True},  # Hopper's fast FP8 accumulation (fp8 only)
    "host-adaln": {"adaln_on_host": True},  # adaLN weights in pinned host memory, streamed by condition()
}
FP8_ONLY = ("adaln", "fast-accum")


def dtype_kwargs(name: str) -> dict[str, Any]:
    """Engine-constructor arguments for a benchmark dtype name `<bf16|fp8|fp32>[+variant...]`, e.g.
    "fp8+host-adaln+fast-accum" (variants: see `VARIANTS`)."""
    base, *variants = name.split("+")
    unknown = [v for v in variants if v not in VARIANTS]
    if base not in BASE_DTYPES or unknown or len(set(variants)) != len(variants):
        raise ValueError(f"benchmark dtype must be <{'|'.join(BASE_DTYPES)}>[+{'|+'.join(VARIANTS)}...], got {name!r}")
    if base != "fp8" and any(v in FP8_ONLY for v in variants):
        raise ValueError(f"{name!r}: +{' / +'.join(FP8_ONLY)} apply to fp8 only")
    kwargs: dict[str, Any] = {"dtype": base}
    for v in variants:
        kwargs |= VARIANTS[v]
    return kwargs


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
        default=333,
        help="text tokens: 77 CLIP + T5 tokens; 333 = SD3 default, 205 = Flow-GRPO",
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
    if args.baselines == []:
        args.baselines = list(BASELINES)
    if args.no_engine and not args.baselines:
        p.error("--no-engine needs --baselines")
    if args.interface == "pixel" and args.text_len <= 77:
        p.error(
            f"--text-len must exceed 77 for the pixel interface (77 CLIP tokens + at least one T5), got {args.text_len}"
        )
    return args


class Bench:
    """Collects rows; every row is timed and memory-measured the same way."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args, self.device, self.rows = args, device, []
        self.env = environment_info(device)
        self.env["ceilings"] = ceilings(device)  # the FLOP floor's denominator (CPU: sanity numbers only)
        self.start = time.perf_counter()

    def progress(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def floor_pct(self, flops_per_image: float, per_image_ms: float, dtype: str) -> tuple[float, float]:
        """Achieved TFLOP/s, and the FLOP floor (counted FLOPs at the measured matmul ceiling of this dtype: the fp8
        GEMM ceiling for fp8 engines, bf16's otherwise) as a percentage of the measured time."""
        c = self.env["ceilings"]
        ceiling = c.get("fp8_matmul_tflop_s") if dtype.startswith("fp8") else None
        tflop_s = flops_per_image / (per_image_ms * 1e-3) / 1e12
        return tflop_s, 100 * tflop_s / (ceiling or c["matmul_tflop_s"])

    def skip(self, label: str, reason: str, **fields: Any) -> dict:
        """A row for a path that cannot run here: no timing, the reason instead (reports leave it out)."""
        row = {"path": label, "skipped": reason, **fields, "device": self.env["gpu"] or "cpu"}
        self.rows.append(row)
        self.progress(f"  {label:<34} {reason}")
        return row

    def run(self, label: str, fn: Callable[[Any], Any], inputs: list, batch: int, **fields: Any) -> dict:
        timing = time_fn(fn, inputs, warmup=3, iters=self.args.iters, device=self.device).per_image(batch)
        peak = measure_peak(fn, inputs[0], device=self.device)
        row = {
            "path": label,
            "batch": batch,
            "per_image_ms": round(timing.median_ms, 3),
            "p10_ms": round(timing.p10_ms, 3),
            "p90_ms": round(timing.p90_ms, 3),
            "peak_gib": None if peak.allocated_gib is None else round(peak.allocated_gib, 3),
            "nvml_gib": None if peak.nvml_used_gib is None else round(peak.nvml_used_gib, 3),
            **fields,
            "device": self.env["gpu"] or "cpu",
            "torch": self.env["torch"],
            "commit": self.env["git_commit"],
            "date": self.env["date"],
        }
        if fields.get("flops_per_image"):
            tflop_s, pct = self.floor_pct(fields["flops_per_image"], timing.median_ms, fields.get("dtype", ""))
            row.update(tflop_s=float(f"{tflop_s:.3g}"), floor_pct=round(pct, 1))  # (3 digits: CPU runs are tiny)
        self.rows.append(row)
        self.progress(f"  {label:<34} b{batch:<3} {row['per_image_ms']:>9.2f} ms/img  peak {row['peak_gib']} GiB")
        return row


def random_inputs(
    cfg: BackboneConfig, batch: int, side: int, text_len: int, *, generator, device, dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random latents [B, C, side/8, side/8], prompt embeddings [B, text_len, joint_dim] and pooled [B, pooled_dim]."""
    kw = dict(generator=generator, device=device, dtype=dtype)
    return (
        torch.randn(batch, cfg.in_channels, side // 8, side // 8, **kw),
        torch.randn(batch, text_len, cfg.joint_attention_dim, **kw),
        torch.randn(batch, cfg.pooled_projection_dim, **kw),
    )


def latent_inputs(cfg: BackboneConfig, batch: int, side: int, text_len: int, device, dtype, n: int = 3) -> list:
    """`n` distinct input sets (rotated by the timer so no call re-reads the previous one from L2)."""
    return [
        random_inputs(
            cfg,
            batch,
            side,
            text_len,
            generator=torch.Generator(device=device).manual_seed(i),
            device=device,
            dtype=dtype,
        )  # fmt: skip
        for i in range(n)
    ]


def device_weight_bytes(engine: RewardEngine) -> int:
    """Bytes of the engine's parameters and buffers that live on its device (host-resident adaLN weights excluded)."""
    tensors = [*engine.parameters(), *engine.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if t.device == engine.device)


def bench_latent(b: Bench, preset: str, resolutions: list[int], dtypes: list[str]) -> None:
    args, device = b.args, b.device
    for dtype in [] if args.no_engine else dtypes:
        extra = dtype_kwargs(dtype)
        b.progress(f"building the {preset} engine, {dtype} ({'checkpoint' if args.checkpoint else 'random weights'})")
        if args.checkpoint:
            engine = RewardEngine.from_pretrained(args.checkpoint, base=args.base, device=device, **extra)
        elif preset == "tiny":  # the embedded default: the tiny SD3.5 directory, through the real loading code
            from tools.tiny_base import default_tiny_base

            engine = RewardEngine.from_base(args.base or default_tiny_base(), device=device, **extra)
        else:
            engine = RewardEngine.from_preset(preset, device=device, **extra)
        engine.check_finite = False  # the RL-loop setting: no host syncs
        # what was built (a checkpoint brings its own config and layers): shapes, FLOPs and labels follow it
        cfg, layers = engine.config, engine.reward_config.layers
        model = cfg.preset_name() or "custom"
        graphed = None
        if device.type == "cuda" and not args.no_graphs:
            from engine.runtime.graphs import GraphedScorer

            graphed = GraphedScorer(engine)
        for side in resolutions:
            flops = engine_costs(cfg, side, args.text_len, layers=layers)["flops_per_image"]
            for batch in args.batch:
                inputs = latent_inputs(cfg, batch, side, args.text_len, device, engine.dtype)
                common = dict(
                    interface="latent",
                    preset=model,
                    layers=list(layers),
                    resolution=side,
                    dtype=dtype,
                    flops_per_image=flops,
                    weights_gib=round(device_weight_bytes(engine) / 2**30, 3),
                    random_weights=not args.checkpoint,
                )
                b.run("engine eager", lambda x: engine.score(x[0], (x[1], x[2])), inputs, batch, **common)
                # prompt-only work on its own (per prompt), and scoring against conditioning made beforehand: the
                # GRPO pattern, one condition() per prompt batch serving its group of latents
                prompt_only = {k: v for k, v in common.items() if k != "flops_per_image"}  # not the forward's FLOPs
                b.run("condition() per prompt", lambda x: engine.condition(x[1], x[2]), inputs, batch, **prompt_only)
                cached = [(x[0], engine.condition(x[1], x[2])) for x in inputs]
                if graphed is not None:
                    row = b.run(
                        "engine cuda-graph", lambda x: graphed.score(x[0], (x[1], x[2])), inputs, batch, **common
                    )
                    row["first_call_s"] = round(max(graphed.capture_seconds.values()), 2)
                    b.run("engine cuda-graph, cond cached", lambda x: graphed.score(*x), cached, batch, **common)
                else:
                    b.run("engine eager, cond cached", lambda x: engine.score(*x), cached, batch, **common)
                cached = None
        engine = graphed = None  # free before the next dtype's model is built
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.baselines:
        bench_diffusers(b, preset, resolutions)


def bench_diffusers(b: Bench, preset: str, resolutions: list[int]) -> None:
    """The diffusers baselines named by --baselines, each on a freshly built model with the same random weights
    (seed 0): eager + hooks, regional compile, whole-model compile with CUDA graphs per --compile-modes, torchao FP8
    + the same compile. A baseline this machine cannot run gets a "skipped: <reason>" row instead of timings."""
    from bench.baselines import (
        BaselineUnavailable,
        DiffusersHookReward,
        build_sd3_transformer,
        compile_modes,
        compile_regional,
        compile_whole,
        quantize_torchao_fp8,
    )
    from engine.config import RewardConfig

    device, dtype = b.device, (torch.bfloat16 if b.device.type == "cuda" else torch.float32)
    cfg = BackboneConfig.from_name(preset)
    layers = RewardConfig.for_backbone(cfg).layers
    modes = b.args.compile_modes or compile_modes(device)

    def prepare(name: str, transformer, mode: str | None) -> None:
        if name == "regional":
            compile_regional(transformer)
        if name == "torchao-fp8":
            quantize_torchao_fp8(transformer)
        if name in ("cudagraphs", "torchao-fp8"):
            compile_whole(transformer, mode)

    for name in b.args.baselines:
        label = BASELINES[name]
        for mode in modes if name in ("cudagraphs", "torchao-fp8") else [None]:
            fields = dict(
                interface="latent",
                preset=preset,
                dtype="fp8" if name == "torchao-fp8" else ("bf16" if dtype == torch.bfloat16 else "fp32"),
                random_weights=True,
            )
            if mode is not None:
                fields["compile_mode"] = mode
            b.progress(f"building diffusers for '{label}'" + (f", mode {mode}" if mode else ""))
            torch.manual_seed(0)
            transformer = build_sd3_transformer(cfg.to_dict(), dtype, device)
            reward = DiffusersHookReward(transformer, layers, 0.1)
            try:
                prepare(name, transformer, mode)
            except BaselineUnavailable as e:
                b.skip(label, str(e), **fields)
            else:
                fn = lambda x: reward.score(x[0], x[1], x[2])
                for side in resolutions:
                    for batch in b.args.batch:
                        inputs = latent_inputs(cfg, batch, side, b.args.text_len, device, dtype)
                        first_call_s = first_call_seconds(fn, inputs[0], device)  # compiles (and captures) here
                        row = b.run(label, fn, inputs, batch, resolution=side, **fields)
                        row["first_call_s"] = round(first_call_s, 2)
            reward.remove()
            reward = transformer = fn = None
            torch._dynamo.reset()  # drops compiled graphs and their CUDA-graph pools before the next model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


def first_call_seconds(fn: Callable[[Any], Any], x: Any, device: torch.device) -> float:
    """Wall-clock seconds of one call, synchronised: a compiled path's compile (and graph capture) time."""
    start = time.perf_counter()
    fn(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench_pixel(b: Bench, preset: str, resolutions: list[int], dtypes: list[str]) -> None:
    """Pixel path as a policy would use it: VAE decode its latents, then VAE encode + text encoders + engine. The VAE
    and text encoders run in bf16 on GPU (fp32 on CPU), the engine in each requested dtype; rows say which."""
    from engine.pixel import PixelFrontEnd
    from tools.tiny_base import default_tiny_base

    device = b.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    front_dtype = "bf16" if dtype == torch.bfloat16 else "fp32"
    base = b.args.base or default_tiny_base()
    front = PixelFrontEnd.from_pretrained(base, device=device, dtype=dtype, max_sequence_length=b.args.text_len - 77)
    engines = {}
    for name in dtypes:
        kwargs = dtype_kwargs(name)
        engine = (
            RewardEngine.from_base(base, device=device, **kwargs)
            if preset == "tiny"
            else RewardEngine.from_preset(preset, device=device, **kwargs)
        )
        engine.check_finite = False
        engines[name] = engine
    cfg = next(iter(engines.values())).config
    for side in resolutions:
        for batch in b.args.batch:
            common = dict(interface="pixel", preset=preset, resolution=side, dtype=front_dtype, random_weights=True)
            latents = [x[0] for x in latent_inputs(cfg, batch, side, b.args.text_len, device, dtype)]
            images = [front.vae_decode(z) for z in latents]
            prompts = [[f"a photo number {i} of a cat, variant {j}" for j in range(batch)] for i in range(3)]
            b.run("vae decode", front.vae_decode, latents, batch, **common)
            b.run("vae encode", lambda x: front.encode_images(x), images, batch, **common)
            b.run(
                "text encoders (uncached)",
                lambda p: (front.prompt_encoder.clear_cache(), front.encode_prompts(p)),
                prompts,
                batch,
                **common,
            )
            b.run("text encoders (cached)", front.encode_prompts, prompts, batch, **common)
            embs = [front.encode_prompts(p) for p in prompts]
            for name, engine in engines.items():
                z = [x.to(engine.dtype) for x in latents]
                e = [tuple(t.to(engine.dtype) for t in emb) for emb in embs]
                b.run(
                    "engine on encoded",
                    lambda i, engine=engine, z=z, e=e: engine.score(z[i], e[i]),
                    [0, 1, 2],
                    batch,
                    **{**common, "dtype": name},
                )


def bench_hpsv3(b: Bench, resolutions: list[int]) -> None:
    from bench.baselines import HPSv3Reward, resize_to_448
    from engine.pixel import PixelFrontEnd
    from tools.tiny_base import default_tiny_base

    device = b.device
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    hps = HPSv3Reward("qwen2-vl-7b" if on_gpu else "tiny", dtype=dtype, device=device)
    front = PixelFrontEnd.from_pretrained(b.args.base or default_tiny_base(), device=device, dtype=dtype)
    vae = front.image_encoder.vae
    if on_gpu and b.args.base is None:  # the real SD3 VAE's size, random weights
        from diffusers import AutoencoderKL

        with torch.device(device):
            vae = AutoencoderKL(**FULL_SIZE["vae"]).to(dtype).eval()
        front.image_encoder.vae = vae
    for side in resolutions:
        for batch in b.args.batch:
            common = dict(
                interface="hpsv3",
                preset="qwen2-vl-7b" if on_gpu else "tiny",
                resolution=side,
                dtype="bf16" if on_gpu else "fp32",
                random_weights=True,
            )
            latents = [torch.randn(batch, 16, side // 8, side // 8, device=device, dtype=dtype) for _ in range(3)]
            images = [resize_to_448(front.vae_decode(z)) for z in latents]
            b.run("vae decode", front.vae_decode, latents, batch, **common)
            b.run("hpsv3 (448², 480 tokens)", hps.score, images, batch, **common)
            b.run(
                "vae decode + hpsv3", lambda z: hps.score(resize_to_448(front.vae_decode(z))), latents, batch, **common
            )


def print_table(rows: list[dict]) -> None:
    """The rows, with speedups vs diffusers eager and vs the strongest compiled baseline of the same shape."""
    timed = [r for r in rows if "per_image_ms" in r]
    eager, compiled = {}, {}
    for r in timed:
        key = (r["resolution"], r["batch"])
        if r["path"] == EAGER:
            eager[key] = r["per_image_ms"]
        if r["path"] in COMPILED_BASELINES:
            compiled[key] = min(compiled.get(key, float("inf")), r["per_image_ms"])
    print(
        f"\n{'interface':<9} {'path':<40} {'dtype':<15} {'res':>5} {'b':>3} {'ms/img':>9} {'peak GiB':>9} "
        f"{'TFLOP/s':>8} {'% floor':>8} {'vs eager':>9} {'vs best compile':>15}"
    )
    for r in rows:
        label = r["path"] + (f" ({r['compile_mode']})" if r.get("compile_mode") else "")
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
