"""One GPU session, one call: correctness of every fast path, then every timing, engine and baselines in one process.

    python -m bench.gpu_check --out DIR [--deadline-s 420]

Sections run in priority order and the JSON is rewritten after each, so a run cut short still reports what it did;
optional sections are skipped (and marked so) once the deadline nears. Random SD3.5-Large weights (latency and memory
do not depend on the values).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from bench.latency import dtype_kwargs

T0 = time.perf_counter()


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


def kernel_tests() -> dict:
    env = {**__import__("os").environ, "TRITON_INTERPRET": "0"}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels_gpu.py"],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    tail = (r.stdout + r.stderr)[-1500:]
    log(tail.strip().splitlines()[-1] if tail.strip() else "no output")
    return {"returncode": r.returncode, "tail": tail}


@torch.no_grad()  # joint_qkv takes its reference path under autograd: time the inference path (run 3 did not)
def kernel_bench(with_compile: bool) -> dict:
    """Each memory-bound kernel vs its eager torch reference (and torch.compile of it) at SD3.5-L shapes."""
    import triton.testing

    import kernels
    from kernels import adaln, noise, pooling, qknorm, quant

    rows = []
    for batch, tokens in ((1, 1357), (8, 1357), (1, 4429)):
        d = 2432
        x = torch.randn(batch, tokens, d, device="cuda", dtype=torch.bfloat16)
        y = torch.randn_like(x)
        shift, scale, gate = (torch.randn(batch, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        z0 = torch.randn(
            batch, 16, 64 if tokens == 1357 else 128, 64 if tokens == 1357 else 128, device="cuda", dtype=torch.bfloat16
        )
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
        qkv = torch.randn(batch, tokens - 333, 3 * d, device="cuda", dtype=torch.bfloat16)
        txt = torch.randn(batch, 333, 3 * d, device="cuda", dtype=torch.bfloat16)
        norms = tuple(1 + 0.1 * torch.randn(64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        hidden = torch.randn(batch * tokens, 4 * d, device="cuda", dtype=torch.bfloat16)
        cases["joint_qkv"] = (
            lambda: kernels.joint_qkv(qkv, txt, 38, norms, backend="triton"),
            lambda: qknorm.joint_qkv_ref(qkv, txt, 38, norms),
            4 * 3 * x.numel(),
        )
        cases["quantize_rowwise+gelu"] = (
            lambda: kernels.quantize_rowwise(hidden, gelu=True, backend="triton"),
            lambda: quant.quantize_rowwise_ref(hidden, gelu=True),
            hidden.numel() * 3 + hidden.shape[0] * 4,
        )
        # FP8 producers: fused (one pass, e4m3 out) vs the bf16 op then a separate quantisation pass (run 3's path)
        cases["layernorm_modulate_fp8 (vs LN + quantize)"] = (
            lambda: kernels.layernorm_modulate_fp8(x, shift, scale, backend="triton"),
            lambda: kernels.quantize_rowwise(kernels.layernorm_modulate(x, shift, scale, backend="triton")),
            xb + xb // 2,
        )
        cases["gated_residual_layernorm_modulate_fp8 (vs unfused)"] = (
            lambda: kernels.gated_residual_layernorm_modulate_fp8(x, y, gate, shift, scale, backend="triton")[1:],
            lambda: kernels.quantize_rowwise(
                kernels.gated_residual_layernorm_modulate(x, y, gate, shift, scale, backend="triton")[1]
            ),
            3 * xb + xb // 2,
        )
        joint_out = torch.randn(batch, tokens, d, device="cuda", dtype=torch.bfloat16)
        image_rows = joint_out[:, : tokens - 333]
        cases["quantize_rowwise(strided image rows) (vs copy + quantize)"] = (
            lambda: kernels.quantize_rowwise(image_rows, backend="triton"),
            lambda: kernels.quantize_rowwise(image_rows.reshape(-1, d), backend="triton"),
            image_rows.numel() * 3,
        )
        for name, (fast, ref, nbytes) in cases.items():
            with torch.no_grad():
                got, want = fast(), ref()
            got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
            errs = [
                float((g.float() - w.float()).norm() / w.float().norm().clamp_min(1e-30))
                for g, w in zip(got, want, strict=True)
            ]
            row = {"op": name, "batch": batch, "tokens": tokens, "dim": d, "bytes": nbytes, "max_rel_err": max(errs)}
            for label, fn in (("triton", fast), ("eager", ref)):
                row[f"{label}_us"] = 1e3 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            if with_compile:
                compiled = torch.compile(ref, dynamic=False)
                compiled()
                row["compile_us"] = 1e3 * triton.testing.do_bench(compiled, warmup=25, rep=100, return_mode="median")
            row["triton_gb_s"] = nbytes / row["triton_us"] / 1e3
            rows.append(row)
            log(
                f"{name:<36} b{batch} n{tokens}: triton {row['triton_us']:.1f}us ({row['triton_gb_s']:.0f} GB/s) "
                f"eager {row['eager_us']:.1f}us compile {row.get('compile_us', float('nan')):.1f}us "
                f"err {row['max_rel_err']:.1e}"
            )
    return {"rows": rows}


def attention_bench() -> dict:
    import triton.testing

    from engine.attention import attention

    rows = []
    for tokens in (1357, 4429):
        q, k, v = (torch.randn(1, tokens, 38, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * tokens * tokens * 64 * 38
        for backend in ("sdpa", "cudnn", "flash", "efficient"):
            try:
                ms = triton.testing.do_bench(
                    lambda b=backend: attention(q, k, v, b), warmup=25, rep=100, return_mode="median"
                )
                rows.append({"backend": backend, "tokens": tokens, "ms": ms, "tflop_s": flops / ms / 1e9})
                log(f"attention {backend:<9} n{tokens}: {ms * 1e3:.1f}us {flops / ms / 1e9:.0f} TFLOP/s")
            except Exception as e:
                rows.append({"backend": backend, "tokens": tokens, "error": str(e)[:200]})
    return {"rows": rows}


def adaln_on_host() -> dict:
    """adaln_on_host=True at full size (fp8): device memory freed (counted and measured), condition() cost when the
    adaLN weights stream over PCIe, and the rewards it gives (must equal the on-device engine's)."""
    import triton.testing

    from engine import RewardEngine
    from engine.mmdit import AdaLN

    gc.collect()
    torch.cuda.empty_cache()
    start = torch.cuda.memory_allocated()
    plain = RewardEngine.from_preset("sd35-large", device="cuda", dtype="fp8", seed=0)
    mid = torch.cuda.memory_allocated()
    host = RewardEngine.from_preset("sd35-large", device="cuda", dtype="fp8", seed=0, adaln_on_host=True)
    end = torch.cuda.memory_allocated()
    host_adaln = [p for m in host.backbone.modules() if isinstance(m, AdaLN) for p in m.parameters()]
    g = torch.Generator(device="cuda").manual_seed(7)
    z0, eps = (torch.randn(8, 16, 64, 64, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    emb = torch.randn(8, 333, 4096, device="cuda", generator=g, dtype=torch.bfloat16)
    pooled = torch.randn(8, 2048, device="cuda", generator=g, dtype=torch.bfloat16)
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
            ms = triton.testing.do_bench(
                lambda e=engine: e.condition(emb[:prompts], pooled[:prompts]), warmup=3, rep=50, return_mode="median"
            )
            out[f"condition_ms_{name}_p{prompts}"] = ms
    log(f"adaLN on host: {out}")
    del plain, host
    gc.collect()
    torch.cuda.empty_cache()
    return out


def engine_parity() -> dict:
    """Full-size engine (Triton kernels, auto attention) vs diffusers' SD3Transformer2DModel on the same random
    weights: features of layers (15, 23, 28, 37) in bf16, both against an fp32 diffusers reference."""
    from bench.baselines import DiffusersHookReward, build_sd3_transformer
    from engine import RewardEngine
    from engine.config import BackboneConfig

    cfg = BackboneConfig.from_name("sd35-large")
    torch.manual_seed(0)
    ref = build_sd3_transformer(cfg.to_dict(), torch.float32, "cuda")
    z0 = torch.randn(2, 16, 64, 64, device="cuda")
    emb = torch.randn(2, 333, 4096, device="cuda")
    pooled = torch.randn(2, 2048, device="cuda")
    eps = torch.randn_like(z0)
    layers = (15, 23, 28, 37)
    hooked = DiffusersHookReward(ref, layers, 0.1)
    f32 = hooked.features(z0, emb, pooled, eps)
    hooked.remove()
    out = {}
    for dtype in ("bf16", "fp8", "fp8+adaln"):
        kw = dtype_kwargs(dtype)
        engine = RewardEngine.from_diffusers(ref, layers=layers, device="cuda", **kw)
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
    gc.collect()  # hooks hold reference cycles: without this 16 GB stayed allocated into the next section (run 1)
    torch.cuda.empty_cache()
    return out


def latency(argv: list[str]) -> dict:
    from bench import latency as lat

    rows = lat.main(argv)
    torch.cuda.empty_cache()
    return {"argv": argv, "rows": rows}


def fp8_fidelity(n: int = 256) -> dict:
    """Rewards of the same random full-size model in bf16 and fp8 on n random inputs: Spearman and pair order."""
    from engine import RewardEngine

    out = {}
    scores = {}
    for dtype in ("bf16", "fp8", "fp8+adaln"):
        kw = dtype_kwargs(dtype)
        engine = RewardEngine.from_preset("sd35-large", device="cuda", seed=0, **kw)
        engine.check_finite = False
        g = torch.Generator(device="cuda").manual_seed(123)
        rs = []
        for _ in range(n // 8):
            z0 = torch.randn(8, 16, 64, 64, device="cuda", generator=g, dtype=torch.bfloat16)
            emb = torch.randn(8, 205, 4096, device="cuda", generator=g, dtype=torch.bfloat16)
            pooled = torch.randn(8, 2048, device="cuda", generator=g, dtype=torch.bfloat16)
            eps = torch.randn(8, 16, 64, 64, device="cuda", generator=g, dtype=torch.bfloat16)
            rs.append(engine.score(z0, (emb, pooled), noise=eps))
        scores[dtype] = torch.cat(rs).double().cpu()
        del engine
        torch.cuda.empty_cache()
    a = scores["bf16"]
    out["reward_std_bf16"] = float(a.std())
    i, j = torch.triu_indices(len(a), len(a), 1)
    clear = (a[i] - a[j]).abs() > 0.01 * a.std()  # pairs an RL update can act on (bf16 rewards differ by >1% std)
    for name in ("fp8", "fp8+adaln"):
        b = scores[name]
        ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
        agree = (a[i] > a[j]) == (b[i] > b[j])
        out[name] = {
            "spearman": float(((ra - ra.mean()) * (rb - rb.mean())).sum() / (ra.std() * rb.std() * (len(a) - 1))),
            "pair_order_agreement": float(agree.double().mean()),
            "pair_order_agreement_clear_pairs": float(agree[clear].double().mean()),
            "max_abs_diff": float((a - b).abs().max()),
        }
    log(f"fp8 fidelity: {out}")
    return out


def profile(dtype: str) -> dict:
    """Where the time goes: device time per kernel over 3 eager forwards at 512², batch 8."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from engine import RewardEngine

    kw = dtype_kwargs(dtype)
    engine = RewardEngine.from_preset("sd35-large", device="cuda", **kw)
    engine.check_finite = False
    z0 = torch.randn(8, 16, 64, 64, device="cuda", dtype=torch.bfloat16)
    emb = torch.randn(8, 333, 4096, device="cuda", dtype=torch.bfloat16)
    pooled = torch.randn(8, 2048, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):
        engine.score(z0, (emb, pooled))
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            engine.score(z0, (emb, pooled))
        torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", 0) or getattr(evt, "self_cuda_time_total", 0)
        if us > 0:
            rows.append({"name": evt.key[:90], "ms_per_image": us / 1e3 / 24, "calls": evt.count})
    rows.sort(key=lambda r: -r["ms_per_image"])
    total = sum(r["ms_per_image"] for r in rows)
    for r in rows[:16]:
        share = 100 * r["ms_per_image"] / total
        log(f"{dtype:<5} {r['ms_per_image']:7.3f} ms/img {share:5.1f}% x{r['calls']:<5} {r['name']}")
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return {"device_ms_per_image": total, "top": rows[:40]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--deadline-s", type=float, default=420)
    p.add_argument("--only", nargs="*", default=None, help="run just these sections")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rep = Report(out, args.deadline_s)
    rep.only = args.only
    from bench.harness import ceilings, environment_info
    from engine import ops

    rep.data["env"] = environment_info("cuda")
    rep.section("ceilings", lambda: ceilings("cuda"))
    rep.section("kernel_tests", kernel_tests, need_s=60)
    rep.section("gelu_epilogue_is_tanh", lambda: ops._gelu_epilogue_ok(torch.bfloat16))
    rep.section("engine_parity", engine_parity, need_s=60)
    lat512 = ["--resolution", "512", "--batch", "1", "8", "--dtype", "bf16", "fp8", "fp8+host-adaln", "--baselines"]
    rep.section("latency_512", lambda: latency([*lat512, "--json", str(out / "latency_512.json")]), need_s=120)
    rep.section("adaln_on_host", adaln_on_host, need_s=40)
    lat1024 = ["--resolution", "1024", "--batch", "1", "--dtype", "bf16", "fp8"]
    rep.section("latency_1024", lambda: latency([*lat1024, "--json", str(out / "latency_1024.json")]), need_s=60)
    rep.section("profile_fp8", lambda: profile("fp8"), need_s=40)
    rep.section("profile_bf16", lambda: profile("bf16"), need_s=40)
    hps = ["--interface", "hpsv3", "--resolution", "512", "--batch", "1", "8"]
    rep.section("hpsv3", lambda: latency([*hps, "--json", str(out / "hpsv3.json")]), need_s=60)
    rep.section("fp8_fidelity", fp8_fidelity, need_s=45)
    rep.section("attention", attention_bench, need_s=15)
    rep.section("kernel_bench", lambda: kernel_bench(with_compile=rep.left() > 120), need_s=20)
    from bench.targets import evaluate, format_table

    rep.data["targets"] = evaluate(rep.data)
    log("targets (issue 5):\n" + format_table(rep.data["targets"]))
    log(f"done; skipped: {rep.data['skipped']}; errors: {list(rep.data['errors'])}")
    rep.save()


if __name__ == "__main__":
    main()
