"""The sections of `python -m bench.gpu_check`, and what they share: the setup they run on (`Setup`: the real
thing, or the tiny preset on the CPU), the running section (`Section`: rows written out as they come, a time budget),
timing, memory and the log. Each section takes its `Section` and returns a JSON-able summary (or None).

The FP8 fidelity section is in `bench.fp8_fidelity`, the kernel micro-benchmarks in `bench.kernel_bench`.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.workload import dtype_kwargs, random_inputs

T0 = time.perf_counter()


class Setup:
    """What the sections run on: the real thing, or (`--cpu-smoke`) the tiny preset at small shapes on the CPU."""

    device = "cuda"
    preset = "sd35-large"
    side = 512  # image side for the model-level sections
    text_len = 333
    kernel_shapes = ((1, 1357), (8, 1357), (1, 4429))  # (batch, tokens) for the kernel micro-benchmarks
    kernel_compile_batches = (8,)  # batch sizes whose kernel rows also time torch.compile of the reference
    kernel_compile_ops: tuple[str, ...] | None = None  # ops whose reference is compiled (None: all)
    peer_batches = {"peers_512_b8": "8", "peers_512_b1": "1"}  # section -> batch of the whole-model compiled peers
    heads, head_dim, n_text = 38, 64, 333
    fidelity_inputs = 256

    @classmethod
    def cpu_smoke(cls) -> None:
        import engine.runtime.fp8
        from engine.config import BackboneConfig

        cfg = BackboneConfig.from_name("tiny")
        cls.device, cls.preset, cls.side, cls.text_len = "cpu", "tiny", 128, 9
        cls.heads, cls.head_dim, cls.n_text = cfg.num_attention_heads, cfg.attention_head_dim, 5
        cls.kernel_shapes = ((1, 21), (2, 13))
        cls.kernel_compile_batches, cls.kernel_compile_ops = (2,), ("layernorm_modulate",)  # inductor: ~1 min each
        cls.peer_batches = {"peers_512_b8": "2"}  # inductor on the CPU: about a minute per compile
        cls.fidelity_inputs = 16
        engine.runtime.fp8.fp8_supported = lambda device: True  # torch._scaled_mm's CPU emulation stands in for the GPU

    @classmethod
    def config(cls):
        from engine.config import BackboneConfig

        return BackboneConfig.from_name(cls.preset)

    @classmethod
    def prompt_inputs(cls, batch: int, text_len: int | None = None, generator=None, dtype=torch.bfloat16):
        """latents, prompt embeddings, pooled embeddings, noise for `batch` images at `side`."""
        kw = dict(generator=generator, device=cls.device, dtype=dtype)
        z0, emb, pooled = random_inputs(cls.config(), batch, cls.side, text_len or cls.text_len, **kw)
        return z0, emb, pooled, torch.randn(z0.shape, **kw)


class Section:
    """A running section of `bench.gpu_check`: `row(...)` hands a row to the report at once (it is on disk before the
    next one starts); `deadline` (a `time.perf_counter()` value) ends the section's budget."""

    def __init__(self, name: str, sink: Callable[[dict], None], deadline: float):
        self.name, self.sink, self.deadline = name, sink, deadline

    def row(self, row: dict) -> dict:
        self.sink(row)
        return row

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def stopped(self, what: str, need_s: float = 0.0, **fields) -> bool:
        """True, with a "stopped" row for `what`, when less than `need_s` seconds of the budget are left."""
        if self.left() > need_s:
            return False
        self.row({**fields, "skipped": f"stopped: {max(self.left(), 0):.0f} s left of the budget, before {what}"})
        log(f"{self.name}: budget spent, stopped before {what}")
        return True


def bench_ms(fn) -> float:
    """Median ms of fn(): Triton's do_bench on CUDA (L2 flushed between calls), a short wall-clock timing elsewhere."""
    if Setup.device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    from bench.harness import time_fn

    return time_fn(lambda _: fn(), [None], warmup=1, iters=2, device="cpu").median_ms


def free_memory() -> None:
    gc.collect()
    if Setup.device == "cuda":
        torch.cuda.empty_cache()


def allocated() -> int:
    return torch.cuda.memory_allocated() if Setup.device == "cuda" else 0


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


ROOT = Path(__file__).resolve().parents[1]


def kernel_tests(sec: Section) -> dict:
    """The compiled-kernel tests (tests/test_kernels_gpu.py) in a subprocess; a failure, or no test run, is an error."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    test_file = ROOT / "tests" / "test_kernels_gpu.py"
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=240,
    )
    tail = (r.stdout + r.stderr)[-1500:]
    log(tail.strip().splitlines()[-1] if tail.strip() else "no output")
    if r.returncode != 0:  # 1: failures, 5: nothing collected, ...
        raise RuntimeError(f"GPU kernel tests: pytest exit code {r.returncode}\n{tail}")
    return {"returncode": r.returncode, "tail": tail}


def attention_bench(sec: Section) -> None:
    from engine.runtime.attention import attention

    for tokens in sorted({n for _, n in Setup.kernel_shapes}):
        shape = (1, tokens, Setup.heads, Setup.head_dim)
        q, k, v = (torch.randn(shape, device=Setup.device, dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * tokens * tokens * Setup.head_dim * Setup.heads
        for backend in ("sdpa", "cudnn", "flash", "efficient"):
            if sec.stopped(f"{backend} n{tokens}", backend=backend, tokens=tokens):
                return
            try:
                ms = bench_ms(lambda b=backend: attention(q, k, v, b))
                sec.row({"backend": backend, "tokens": tokens, "ms": ms, "tflop_s": flops / ms / 1e9})
                log(f"attention {backend:<9} n{tokens}: {ms * 1e3:.1f}us {flops / ms / 1e9:.0f} TFLOP/s")
            except Exception as e:
                sec.row({"backend": backend, "tokens": tokens, "error": f"error: {type(e).__name__}: {e}"[:300]})


def adaln_on_host(sec: Section) -> dict:
    """adaln_on_host=True at full size (fp8): device memory freed (counted and measured), condition() cost when the
    adaLN weights stream over PCIe, and the rewards it gives (must equal the on-device engine's)."""
    from engine import RewardEngine
    from engine.model.layers import AdaLN

    free_memory()
    start = allocated()
    plain = RewardEngine.from_preset(Setup.preset, device=Setup.device, dtype="fp8", seed=0)
    mid = allocated()
    host = RewardEngine.from_preset(Setup.preset, device=Setup.device, dtype="fp8", seed=0, adaln_on_host=True)
    end = allocated()
    host_adaln = [p for m in host.backbone.modules() if isinstance(m, AdaLN) for p in m.parameters()]
    g = torch.Generator(device=Setup.device).manual_seed(7)
    z0, emb, pooled, eps = Setup.prompt_inputs(8, generator=g)
    out = {
        "device_gib_on_device_adaln": (mid - start) / 2**30,
        "device_gib_host_adaln": (end - mid) / 2**30,
        "adaln_host_bytes_counted_gib": host.adaln_host_bytes / 2**30,
        "all_pinned": all(p.is_pinned() for p in host_adaln),
        "rewards_equal": bool(
            torch.equal(plain.score(z0, (emb, pooled), noise=eps), host.score(z0, (emb, pooled), noise=eps))
        ),
    }
    for prompts in (1, 8):
        for name, engine in (("on_device", plain), ("host", host)):
            ms = bench_ms(lambda e=engine: e.condition(emb[:prompts], pooled[:prompts]))
            out[f"condition_ms_{name}_p{prompts}"] = ms
    log(f"adaLN on host: {out}")
    del plain, host
    free_memory()
    return out


def engine_parity(sec: Section) -> dict:
    """Full-size engine (Triton kernels, auto attention) vs diffusers' SD3Transformer2DModel on the same random
    weights: features of the default layers in bf16 and fp8, all against an fp32 diffusers reference."""
    from bench.baselines import DiffusersHookReward, build_sd3_transformer
    from engine import RewardEngine
    from engine.config import RewardConfig

    cfg = Setup.config()
    torch.manual_seed(0)
    ref = build_sd3_transformer(cfg.to_dict(), torch.float32, Setup.device)
    z0, emb, pooled, eps = Setup.prompt_inputs(2, dtype=torch.float32)
    layers = RewardConfig.for_backbone(cfg).layers
    hooked = DiffusersHookReward(ref, layers, 0.1)
    f32 = hooked.features(z0, emb, pooled, eps)
    hooked.remove()
    out = {}
    for dtype in ("bf16", "fp8", "fp8+adaln"):
        try:  # each engine alone: one failing costs only its own number
            engine = RewardEngine.from_diffusers(ref, layers=layers, device=Setup.device, **dtype_kwargs(dtype))
            ours = engine.features(z0, (emb, pooled), noise=eps)
            out[f"engine_{dtype}_rel_err"] = float((ours - f32).norm() / f32.norm())
        except Exception as e:
            out[f"engine_{dtype}_rel_err"] = f"error: {type(e).__name__}: {str(e)[:300]}"
        engine = None
    ref16 = ref.to(torch.bfloat16)
    hooked = DiffusersHookReward(ref16, layers, 0.1)
    f16 = hooked.features(z0.bfloat16(), emb.bfloat16(), pooled.bfloat16(), eps.bfloat16())
    hooked.remove()
    out["diffusers_bf16_rel_err"] = float((f16 - f32).norm() / f32.norm())
    log(f"parity vs fp32 diffusers: {out}")
    del ref, ref16, hooked
    free_memory()  # hooks hold reference cycles: without gc the fp32 model stays allocated into the next section
    return out


def latency(sec: Section, argv: list[str]) -> dict:
    """`bench.latency` with `argv`, its rows handed to the report as they come, within the section's budget."""
    from bench import latency as lat

    if Setup.device == "cpu":
        argv = [*argv, "--iters", "1"]
        for flag, value in (("--resolution", str(Setup.side)), ("--text-len", str(Setup.text_len))):
            if flag in argv:
                argv[argv.index(flag) + 1] = value
            elif flag == "--text-len":
                argv += [flag, value]
    lat.main(argv, sink=sec.row, deadline=sec.deadline)
    free_memory()
    return {"argv": argv}


def profile(sec: Section, dtype: str, batch: int = 8) -> dict:
    """Where the time goes: device time per kernel over 3 eager forwards at 512² (prompts conditioned in the call)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from engine import RewardEngine

    on_cuda = Setup.device == "cuda"
    engine = RewardEngine.from_preset(Setup.preset, device=Setup.device, **dtype_kwargs(dtype))
    engine.check_finite = False
    z0, emb, pooled, _ = Setup.prompt_inputs(batch)

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize()

    for _ in range(2):
        engine.score(z0, (emb, pooled))
    sync()
    with torch_profile(activities=[ProfilerActivity.CUDA if on_cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            engine.score(z0, (emb, pooled))
        sync()
    rows = []
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", 0) if on_cuda else evt.self_cpu_time_total
        if us > 0:
            rows.append({"name": evt.key[:90], "ms_per_image": us / 1e3 / (3 * batch), "calls": evt.count})
    rows.sort(key=lambda r: -r["ms_per_image"])
    total = sum(r["ms_per_image"] for r in rows)
    for r in rows[:16]:
        share = 100 * r["ms_per_image"] / total
        log(f"{dtype:<5} b{batch} {r['ms_per_image']:7.3f} ms/img {share:5.1f}% x{r['calls']:<5} {r['name']}")
    del engine
    free_memory()
    return {"device_ms_per_image": total, "top": rows[:40]}
