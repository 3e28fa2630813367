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
import gc
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

if "--cpu-smoke" in sys.argv:  # before anything imports triton: its CPU interpreter must be chosen at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from bench.workload import dtype_kwargs, random_inputs  # noqa: E402

T0 = time.perf_counter()


class Setup:
    """What the sections run on: the real thing, or (`--cpu-smoke`) the tiny preset at small shapes on the CPU."""

    device = "cuda"
    preset = "sd35-large"
    side = 512  # image side for the model-level sections
    text_len = 333
    kernel_shapes = ((1, 1357), (8, 1357), (1, 4429))  # (batch, tokens) for the kernel micro-benchmarks
    compile_batches = ("1", "8")  # batch sizes of the whole-model compiled peers (one compile each)
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
        cls.compile_batches = ("2",)  # inductor on the CPU: about a minute per compile
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


# ------------------------------------------------------------------------------------------------------ sections


ROOT = Path(__file__).resolve().parents[1]


def kernel_tests() -> dict:
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


@torch.no_grad()  # joint_qkv takes its reference path under autograd: time the inference path
def kernel_bench(with_compile: bool) -> dict:
    """Each memory-bound kernel vs its eager torch reference (and torch.compile of it) at SD3.5-L shapes."""
    import kernels
    from kernels import adaln, noise, pooling, qknorm, quant

    dev, d, n_txt, heads = Setup.device, Setup.config().hidden_size, Setup.n_text, Setup.heads
    rows = []
    for batch, tokens in Setup.kernel_shapes:
        x = torch.randn(batch, tokens, d, device=dev, dtype=torch.bfloat16)
        y = torch.randn_like(x)
        shift, scale, gate = (torch.randn(batch, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
        side = int(round((tokens - n_txt) ** 0.5)) * 2  # latent side whose patches are the image tokens
        z0 = torch.randn(batch, 16, side, side, device=dev, dtype=torch.bfloat16)
        eps = torch.randn_like(z0)
        xb = x.numel() * 2
        cases = {
            # name: (triton fn, reference fn, bytes moved)
            "layernorm_modulate": (
                lambda: kernels.layernorm_modulate(x, shift, scale, backend="triton"),
                lambda: adaln.layernorm_modulate_ref(x, shift, scale),
                2 * xb,
            ),
            "gated_residual_layernorm_modulate": (
                lambda: kernels.gated_residual_layernorm_modulate(x, y, gate, shift, scale, backend="triton"),
                lambda: adaln.gated_residual_layernorm_modulate_ref(x, y, gate, shift, scale),
                4 * xb,
            ),
            "mean_pool": (lambda: kernels.mean_pool(x, backend="triton"), lambda: pooling.mean_pool_ref(x), xb),
            "near_clean(noise)": (
                lambda: kernels.near_clean(z0, 0.1, noise=eps, backend="triton"),
                lambda: noise.near_clean_ref(z0, 0.1, eps),
                3 * z0.numel() * 2,
            ),
        }
        qkv = torch.randn(batch, tokens - n_txt, 3 * d, device=dev, dtype=torch.bfloat16)
        txt = torch.randn(batch, n_txt, 3 * d, device=dev, dtype=torch.bfloat16)
        norms = tuple(1 + 0.1 * torch.randn(Setup.head_dim, device=dev, dtype=torch.bfloat16) for _ in range(4))
        hidden = torch.randn(batch * tokens, 4 * d, device=dev, dtype=torch.bfloat16)
        cases["joint_qkv"] = (
            lambda: kernels.joint_qkv(qkv, txt, heads, norms, backend="triton"),
            lambda: qknorm.joint_qkv_ref(qkv, txt, heads, norms),
            4 * 3 * x.numel(),
        )
        cases["quantize_rowwise+gelu"] = (
            lambda: kernels.quantize_rowwise(hidden, gelu=True, backend="triton"),
            lambda: quant.quantize_rowwise_ref(hidden, gelu=True),
            hidden.numel() * 3 + hidden.shape[0] * 4,
        )
        # FP8 producers: fused (one pass, e4m3 out) vs the bf16 op then a separate quantisation pass
        cases["layernorm_modulate_fp8 (vs LN + quantize)"] = (
            lambda: kernels.layernorm_modulate_fp8(x, shift, scale, backend="triton"),
            lambda: kernels.quantize_rowwise(
                kernels.layernorm_modulate(x, shift, scale, backend="triton"), backend="triton"
            ),
            xb + xb // 2,
        )
        cases["gated_residual_layernorm_modulate_fp8 (vs unfused)"] = (
            lambda: kernels.gated_residual_layernorm_modulate_fp8(x, y, gate, shift, scale, backend="triton")[1:],
            lambda: kernels.quantize_rowwise(
                kernels.gated_residual_layernorm_modulate(x, y, gate, shift, scale, backend="triton")[1],
                backend="triton",
            ),
            3 * xb + xb // 2,
        )
        image_rows = torch.randn(batch, tokens, d, device=dev, dtype=torch.bfloat16)[:, : tokens - n_txt]
        cases["quantize_rowwise(strided image rows) (vs copy + quantize)"] = (
            lambda: kernels.quantize_rowwise(image_rows, backend="triton"),
            lambda: kernels.quantize_rowwise(image_rows.reshape(-1, d), backend="triton"),
            image_rows.numel() * 3,
        )
        for name, (fast, ref, nbytes) in cases.items():
            got, want = fast(), ref()
            got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
            errs = [
                float((g.float() - w.float()).norm() / w.float().norm().clamp_min(1e-30))
                for g, w in zip(got, want, strict=True)
            ]
            row = {"op": name, "batch": batch, "tokens": tokens, "dim": d, "bytes": nbytes, "max_rel_err": max(errs)}
            for label, fn in (("triton", fast), ("eager", ref)):
                row[f"{label}_us"] = 1e3 * bench_ms(fn)
            if with_compile:
                compiled = torch.compile(ref, dynamic=False)
                compiled()
                row["compile_us"] = 1e3 * bench_ms(compiled)
            row["triton_gb_s"] = nbytes / row["triton_us"] / 1e3
            rows.append(row)
            log(
                f"{name:<36} b{batch} n{tokens}: triton {row['triton_us']:.1f}us ({row['triton_gb_s']:.0f} GB/s) "
                f"eager {row['eager_us']:.1f}us compile {row.get('compile_us', float('nan')):.1f}us "
                f"err {row['max_rel_err']:.1e}"
            )
    return {"rows": rows}


def attention_bench() -> dict:
    from engine.runtime.attention import attention

    rows = []
    for tokens in sorted({n for _, n in Setup.kernel_shapes}):
        shape = (1, tokens, Setup.heads, Setup.head_dim)
        q, k, v = (torch.randn(shape, device=Setup.device, dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * tokens * tokens * Setup.head_dim * Setup.heads
        for backend in ("sdpa", "cudnn", "flash", "efficient"):
            try:
                ms = bench_ms(lambda b=backend: attention(q, k, v, b))
                rows.append({"backend": backend, "tokens": tokens, "ms": ms, "tflop_s": flops / ms / 1e9})
                log(f"attention {backend:<9} n{tokens}: {ms * 1e3:.1f}us {flops / ms / 1e9:.0f} TFLOP/s")
            except Exception as e:
                rows.append({"backend": backend, "tokens": tokens, "error": str(e)[:200]})
    return {"rows": rows}


def adaln_on_host() -> dict:
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


def engine_parity() -> dict:
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
        kw = dtype_kwargs(dtype)
        engine = RewardEngine.from_diffusers(ref, layers=layers, device=Setup.device, **kw)
        ours = engine.features(z0, (emb, pooled), noise=eps)
        out[f"engine_{dtype}_rel_err"] = float((ours - f32).norm() / f32.norm())
        del engine
    ref16 = ref.to(torch.bfloat16)
    hooked = DiffusersHookReward(ref16, layers, 0.1)
    f16 = hooked.features(z0.bfloat16(), emb.bfloat16(), pooled.bfloat16(), eps.bfloat16())
    hooked.remove()
    out["diffusers_bf16_rel_err"] = float((f16 - f32).norm() / f32.norm())
    log(f"parity vs fp32 diffusers: {out}")
    del ref, ref16, hooked
    free_memory()  # hooks hold reference cycles: without gc the fp32 model stays allocated into the next section
    return out


def latency(argv: list[str]) -> dict:
    from bench import latency as lat

    if Setup.device == "cpu":
        argv = [*argv, "--iters", "1"]
        for flag, value in (("--resolution", str(Setup.side)), ("--text-len", str(Setup.text_len))):
            if flag in argv:
                argv[argv.index(flag) + 1] = value
            elif flag == "--text-len":
                argv += [flag, value]
    rows = lat.main(argv)
    free_memory()
    return {"argv": argv, "rows": rows}


def _keep_bf16(keep):
    """Variant transform: quantise a bf16 engine's block linears except those `keep(block, name)` selects."""

    def transform(engine) -> None:
        from engine.runtime.fp8 import quantize_fp8

        quantize_fp8(engine.backbone, keep_bf16=keep)

    return transform


def _emulate_e4m3(weights: bool, activations: bool):
    """Variant transform: a bf16 engine whose block linears (adaLN excluded, as in `dtype="fp8"`) see FP8's rounding —
    weights rounded to rowwise e4m3 once, and/or inputs rounded per token in a pre-hook — while the GEMMs stay bf16.
    Each source alone says which of FP8's two errors costs the fidelity (the fix differs: weight rounding can be
    calibrated at load, activation rounding cannot); both together check the emulation against the real FP8 engine."""

    import kernels

    def rounded(x: torch.Tensor) -> torch.Tensor:
        q, scale = kernels.quantize_rowwise(x.reshape(-1, x.shape[-1]), backend="torch")
        return (q.float() * scale).to(x.dtype).reshape(x.shape)

    def transform(engine) -> None:
        for name, m in engine.backbone.transformer_blocks.named_modules():
            if not isinstance(m, torch.nn.Linear) or ".norm1" in f".{name}":
                continue
            if weights:
                m.weight.data = rounded(m.weight.data)
            if activations:
                m.register_forward_pre_hook(lambda _, args: (rounded(args[0]),))

    return transform


# FP8 variants whose fidelity is measured against bf16: engine dtype, and a transform applied to a bf16 engine (then
# the dtype is bf16): linears left in bf16 (`_keep_bf16`), or FP8's rounding emulated in bf16 GEMMs (`_emulate_e4m3`)
FIDELITY_VARIANTS = {
    "fp8": ("fp8", None),
    "fp8+adaln": ("fp8+adaln", None),
    "fp8+fast-accum": ("fp8+fast-accum", None),
    "fp8, blocks 0-7 bf16": ("bf16", _keep_bf16(lambda block, name: block < 8)),
    "fp8, FFN out bf16": ("bf16", _keep_bf16(lambda block, name: name.endswith("net.2"))),
    "e4m3 weights only, bf16 GEMMs": ("bf16", _emulate_e4m3(weights=True, activations=False)),
    "e4m3 activations only, bf16 GEMMs": ("bf16", _emulate_e4m3(weights=False, activations=True)),
    "e4m3 weights + activations, bf16 GEMMs": ("bf16", _emulate_e4m3(weights=True, activations=True)),
}


GROUP = 16  # latents per prompt in the grouped fidelity inputs (a GRPO group)


def fp8_fidelity() -> dict:
    """Rewards of the same random full-size model in bf16 and FP8 variants on n random inputs: Spearman, pair order,
    and the share of the bf16 model's GEMM FLOPs each variant still runs in bf16 GEMMs (a mixed variant's speed cost;
    1 for the emulations). Then n more inputs in prompt groups of `GROUP` latents (one prompt each): the order
    agreement within groups, which is what GRPO's group-normalised advantages see."""
    from engine import RewardEngine

    out = {}
    scores, grouped = {}, {}
    text_len = 205 if Setup.device == "cuda" else None  # Flow-GRPO's T5 length
    for name, (dtype, transform) in {"bf16": ("bf16", None), **FIDELITY_VARIANTS}.items():
        engine = RewardEngine.from_preset(Setup.preset, device=Setup.device, seed=0, **dtype_kwargs(dtype))
        if transform is not None:  # the same bf16 weights, transformed
            transform(engine)
        if name != "bf16":
            out.setdefault("bf16_linear_share", {})[name] = _bf16_linear_share(engine)
        engine.check_finite = False
        g = torch.Generator(device=Setup.device).manual_seed(123)
        rs = []
        for _ in range(Setup.fidelity_inputs // 8):
            z0, emb, pooled, eps = Setup.prompt_inputs(8, text_len=text_len, generator=g)
            rs.append(engine.score(z0, (emb, pooled), noise=eps))
        scores[name] = torch.cat(rs).double().cpu()
        g = torch.Generator(device=Setup.device).manual_seed(321)
        rs = []
        for _ in range(Setup.fidelity_inputs // GROUP):
            z0, emb, pooled, eps = Setup.prompt_inputs(GROUP, text_len=text_len, generator=g)
            rs.append(engine.score(z0, (emb[:1], pooled[:1]), noise=eps))  # one prompt serves the group
        grouped[name] = torch.cat(rs).double().cpu()
        del engine
        free_memory()
    out["reward_std_bf16"] = float(scores["bf16"].std())
    for name in FIDELITY_VARIANTS:
        out[name] = _agreement(scores["bf16"], scores[name])
        out[name]["group_order_agreement"] = _group_order_agreement(grouped["bf16"], grouped[name], GROUP)
    emulated = "e4m3 weights + activations, bf16 GEMMs"
    out[f"{emulated} vs the fp8 engine"] = _agreement(scores["fp8"], scores[emulated])
    log(f"fp8 fidelity: {out}")
    return out


def _agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """How well rewards `b` reproduce reference rewards `a` (same inputs): rank and linear correlation, the share of
    input pairs ordered alike (all pairs, and pairs whose reference rewards differ by > 1% of their std: those an RL
    update can act on), and the error relative to the reference spread."""
    i, j = torch.triu_indices(len(a), len(a), 1)
    agree = (a[i] > a[j]) == (b[i] > b[j])
    clear = (a[i] - a[j]).abs() > 0.01 * a.std()
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return {
        "spearman": float(torch.corrcoef(torch.stack([ra, rb]))[0, 1]),
        "pearson": float(torch.corrcoef(torch.stack([a, b]))[0, 1]),
        "pair_order_agreement": float(agree.double().mean()),
        "pair_order_agreement_clear_pairs": float(agree[clear].double().mean()),
        "rms_error_over_std": float((a - b).pow(2).mean().sqrt() / a.std()),
        "max_abs_diff": float((a - b).abs().max()),
    }


def _group_order_agreement(a: torch.Tensor, b: torch.Tensor, group: int) -> float:
    """The share of pairs within each prompt group (consecutive runs of `group` inputs) that rewards `b` order as the
    reference rewards `a` do; pairs across groups do not count (GRPO compares a latent only with its group)."""
    if len(a) != len(b) or len(a) % group:
        raise ValueError(f"need equal lengths that are a multiple of the group size {group}, got {len(a)}, {len(b)}")
    i, j = torch.triu_indices(group, group, 1)
    ga, gb = a.reshape(-1, group), b.reshape(-1, group)
    return float(((ga[:, i] > ga[:, j]) == (gb[:, i] > gb[:, j])).double().mean())


def _bf16_linear_share(engine) -> float:
    """Share of the per-token block-linear weights (∝ GEMM FLOPs) an engine runs in bf16 GEMMs (the rest FP8)."""
    from engine.runtime.fp8 import Float8Linear

    blocks = engine.backbone.transformer_blocks
    sizes = {"fp8": 0, "bf16": 0}
    for name, m in blocks.named_modules():
        if ".norm1" in f".{name}":
            continue
        if isinstance(m, Float8Linear):
            sizes["fp8"] += m.in_features * m.out_features
        elif isinstance(m, torch.nn.Linear):
            sizes["bf16"] += m.in_features * m.out_features
    return sizes["bf16"] / (sizes["fp8"] + sizes["bf16"])


def profile(dtype: str, batch: int = 8) -> dict:
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
