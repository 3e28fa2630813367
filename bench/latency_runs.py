"""The runs behind `python -m bench.latency`: a row collector (`Bench`) and one function per `--interface`.

Every row is timed and memory-measured the same way (`Bench.run`); the diffusers and HPSv3 baselines are built in
the same process as the engine.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from bench.costs import engine_costs
from bench.harness import ceilings, environment_info, measure_peak, provenance, time_fn
from bench.targets import COMPILE_CUDAGRAPHS, EAGER, REGIONAL_COMPILE, TORCHAO_FP8
from bench.tiny_base import default_tiny_base
from bench.workload import dtype_kwargs, latent_inputs
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
WHOLE_MODEL_COMPILED = ("cudagraphs", "torchao-fp8")  # --baselines names compiled whole, once per compile mode


# whole-model compiles start only with this much of the run's time left (SD3.5-L: 60-150 s each, with CUDA graphs)
COMPILE_NEED_S = 120.0


class Bench:
    """Collects rows; every row is timed and memory-measured the same way.

    `sink(row)` (optional) receives each row the moment it exists, so that a caller can write it out before the next
    one starts. `deadline` (optional, a `time.perf_counter()` value): no row starts after it, and no whole-model
    compile with less than `COMPILE_NEED_S` left; each row not started gets a "stopped: ..." row instead. A row
    whose code raises becomes an "error: ..." row and the run goes on."""

    def __init__(
        self,
        args: Any,  # bench.latency.LatencyArgs (that module imports this one)
        device: torch.device,
        sink: Callable[[dict], None] | None = None,
        deadline: float | None = None,
    ):
        self.args, self.device, self.rows = args, device, []
        self.sink, self.deadline = sink, deadline
        self.env = environment_info(device)
        self.env["ceilings"] = ceilings(device)  # the FLOP floor's denominator (CPU: sanity numbers only)
        self.start = time.perf_counter()

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        if self.sink is not None:
            self.sink(row)
        return row

    def out_of_time(self, label: str, need_s: float = 0.0, **fields: Any) -> bool:
        """True (and a "stopped" row for `label`) when less than `need_s` seconds are left before the deadline."""
        if self.deadline is None or self.deadline - time.perf_counter() > need_s:
            return False
        left = self.deadline - time.perf_counter()
        self.skip(label, f"stopped: {max(left, 0):.0f} s left of the section's budget, needs {need_s:.0f} s", **fields)
        return True

    @contextlib.contextmanager
    def guarded(self, label: str, **fields: Any) -> Iterator[None]:
        """Run the block; an exception in it becomes an "error: ..." row for `label` instead of ending the run."""
        try:
            yield
        except Exception as e:
            message = f"error: {type(e).__name__}: {str(e)[:500]}"
            self.add({"path": label, "error": message, **fields, "device": self.env["gpu"] or "cpu"})
            self.progress(f"  {label:<34} {message}")

    def check_injected(self, label: str) -> None:
        """Raise for the path `--fail-path` names (how a test proves that a failing row costs only itself)."""
        if label == getattr(self.args, "fail_path", None):
            raise RuntimeError(f"injected failure of '{label}' (--fail-path)")

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
        self.add(row)
        self.progress(f"  {label:<34} {reason}")
        return row

    def run(
        self,
        label: str,
        fn: Callable[[Any], Any],
        inputs: list,
        batch: int,
        late_fields: Callable[[], dict] | None = None,
        **fields: Any,
    ) -> None:
        """Time `fn` over `inputs` into a row, or an error/stopped row; `late_fields()` adds fields known only after
        the timing (e.g. a CUDA graph's capture time)."""
        if self.out_of_time(label, batch=batch, **fields):
            return
        with self.guarded(label, batch=batch, **fields):
            self.check_injected(label)
            self._timed(label, fn, inputs, batch, late_fields, **fields)

    def _timed(self, label, fn, inputs, batch, late_fields, **fields: Any) -> None:
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
            **provenance(self.env),
        }
        if fields.get("flops_per_image"):
            tflop_s, pct = self.floor_pct(fields["flops_per_image"], timing.median_ms, fields.get("dtype", ""))
            row.update(tflop_s=float(f"{tflop_s:.3g}"), floor_pct=round(pct, 1))  # (3 digits: CPU runs are tiny)
        if late_fields is not None:
            row.update(late_fields())
        self.progress(f"  {label:<34} b{batch:<3} {row['per_image_ms']:>9.2f} ms/img  peak {row['peak_gib']} GiB")
        self.add(row)


def device_weight_bytes(engine: RewardEngine) -> int:
    """Bytes of the engine's parameters and buffers that live on its device (host-resident adaLN weights excluded)."""
    tensors = [*engine.parameters(), *engine.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if t.device == engine.device)


def free_device_memory(device: torch.device) -> None:
    """Collect what the last model left (hooks and peft hold reference cycles) and return the cached blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_latent(b: Bench, preset: str, resolutions: list[int], dtypes: list[str]) -> None:
    for dtype in [] if b.args.no_engine else dtypes:
        with b.guarded("engine", interface="latent", dtype=dtype):  # a build that fails costs only its dtype
            _bench_engine(b, preset, resolutions, dtype)
        free_device_memory(b.device)  # the engine is freed before the next dtype's model is built
    if b.args.baselines:
        bench_diffusers(b, preset, resolutions)


def _bench_engine(b: Bench, preset: str, resolutions: list[int], dtype: str) -> None:
    """The engine rows of one dtype at every --resolution and --batch."""
    args, device = b.args, b.device
    b.check_injected("engine")
    extra = dtype_kwargs(dtype)
    b.progress(f"building the {preset} engine, {dtype} ({'checkpoint' if args.checkpoint else 'random weights'})")
    if args.checkpoint:
        engine = RewardEngine.from_pretrained(args.checkpoint, base=args.base, device=device, **extra)
    elif preset == "tiny":  # the embedded default: the tiny SD3.5 directory, through the real loading code
        engine = RewardEngine.from_base(args.base or default_tiny_base(), device=device, **extra)
    else:
        engine = RewardEngine.from_preset(preset, device=device, **extra)
    engine_rows(b, engine, resolutions, dtype)


def engine_rows(b: Bench, engine: RewardEngine, resolutions: list[int], dtype: str, **fields: Any) -> None:
    """The rows of one built engine at every --resolution and --batch: the eager forward, condition() on its own,
    scoring against conditioning made beforehand, and the CUDA-graph paths on a GPU; `fields` go into every row."""
    args, device = b.args, b.device
    engine.check_finite = False  # the RL-loop setting: no host syncs
    # what was built (a checkpoint brings its own config and layers): shapes, FLOPs and labels follow it
    cfg, layers = engine.config, engine.reward_config.layers
    model = cfg.preset_name() or "custom"
    graphed = None
    if device.type == "cuda" and not args.no_graphs:
        from engine.runtime.graphs import GraphedScorer

        graphed = GraphedScorer(engine)
    for side in resolutions:
        flops = engine_costs(cfg, side, args.text_len, readout=engine.backbone.readout)["flops_per_image"]
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
                **fields,
            )
            b.run("engine eager", lambda x: engine.score(x[0], (x[1], x[2])), inputs, batch, **common)
            # prompt-only work on its own (per prompt), and scoring against conditioning made beforehand: the
            # GRPO pattern, one condition() per prompt batch serving its group of latents
            prompt_only = {k: v for k, v in common.items() if k != "flops_per_image"}  # not the forward's FLOPs
            b.run("condition() per prompt", lambda x: engine.condition(x[1], x[2]), inputs, batch, **prompt_only)
            cached = [(x[0], engine.condition(x[1], x[2])) for x in inputs]
            if graphed is not None:
                b.run(
                    "engine cuda-graph",
                    lambda x: graphed.score(x[0], (x[1], x[2])),
                    inputs,
                    batch,
                    late_fields=lambda: {"first_call_s": round(max(graphed.capture_seconds.values()), 2)},
                    **common,
                )
                b.run("engine cuda-graph, cond cached", lambda x: graphed.score(*x), cached, batch, **common)
            else:
                b.run("engine eager, cond cached", lambda x: engine.score(*x), cached, batch, **common)
            cached = None


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
        if name in WHOLE_MODEL_COMPILED:
            compile_whole(transformer, mode)

    for name in b.args.baselines:
        label = BASELINES[name]
        for mode in modes if name in WHOLE_MODEL_COMPILED else [None]:
            fields = dict(
                interface="latent",
                preset=preset,
                dtype="fp8" if name == "torchao-fp8" else ("bf16" if dtype == torch.bfloat16 else "fp32"),
                random_weights=True,
            )
            if mode is not None:
                fields["compile_mode"] = mode
            need_s = COMPILE_NEED_S if name in WHOLE_MODEL_COMPILED else 0.0
            if b.out_of_time(label, need_s=need_s, **fields):
                continue
            b.progress(f"building diffusers for '{label}'" + (f", mode {mode}" if mode else ""))
            reward = None
            with b.guarded(label, **fields):
                b.check_injected(label)
                torch.manual_seed(0)
                transformer = build_sd3_transformer(cfg.to_dict(), dtype, device)
                reward = DiffusersHookReward(transformer, layers, 0.1)
                try:
                    prepare(name, transformer, mode)
                except BaselineUnavailable as e:
                    b.skip(label, str(e), **fields)
                else:
                    _time_baseline(b, label, reward, cfg, resolutions, need_s, fields)
            if reward is not None:
                reward.remove()
            reward = transformer = None
            torch._dynamo.reset()  # drops compiled graphs and their CUDA-graph pools before the next model
            free_device_memory(device)


def _time_baseline(b: Bench, label: str, reward, cfg, resolutions: list[int], need_s: float, fields: dict) -> None:
    """Rows of one prepared baseline at each --resolution and --batch; a static-shape compile recompiles per shape
    (its first call), so each shape needs `need_s` left to start."""
    device, dtype = b.device, next(reward.transformer.parameters()).dtype
    fn = lambda x: reward.score(x[0], x[1], x[2])
    for side in resolutions:
        for batch in b.args.batch:
            shape = dict(resolution=side, batch=batch)
            if b.out_of_time(label, need_s=need_s, **shape, **fields):
                continue
            first: dict = {}
            with b.guarded(label, **shape, **fields):
                inputs = latent_inputs(cfg, batch, side, b.args.text_len, device, dtype)
                first["first_call_s"] = round(first_call_seconds(fn, inputs[0], device), 2)  # compiles, captures
            if first:
                b.run(label, fn, inputs, batch, late_fields=lambda f=first: f, resolution=side, **fields)


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
    from bench.hpsv3 import HPSv3Reward, resize_to_448
    from engine.pixel import PixelFrontEnd

    device = b.device
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    hps = HPSv3Reward("qwen2-vl-7b" if on_gpu else "tiny", dtype=dtype, device=device)
    front = PixelFrontEnd.from_pretrained(b.args.base or default_tiny_base(), device=device, dtype=dtype)
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
