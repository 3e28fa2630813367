"""The kernel micro-benchmarks of `python -m bench.gpu_check` (section `kernel_bench`): each memory-bound Triton op
vs its eager torch reference, and `torch.compile` of that reference, at SD3.5-Large's shapes.

Every call is an inference call (`torch.inference_mode()`: no autograd graph, so no op takes its autograd Function
path). On CUDA each function is timed twice:
- `graph_us`: `triton.testing.do_bench_cudagraph`, the calls captured in a CUDA graph and replayed, so the host's
  Python wrapper (12-30 µs per call, more than most of these kernels) is out of the timing, as it is in the engine's
  graphed forward;
- `device_us`: the device time `torch.profiler` records per call (every kernel the call launches, summed).
The two should agree within a few µs; a row where they do not says which to distrust. GB/s is computed from the bytes
the op must move (`KernelCase.nbytes`) and `graph_us`. Each row also counts the Triton launches of one call of each
side (`triton_launches`: a "triton" side with none timed a fallback). On the CPU (`--cpu-smoke`) the same code runs
with wall-clock times and the profiler's CPU time: it proves the rows, not the numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench.gpu_sections import Section, Setup, log


@dataclass(frozen=True)
class KernelCase:
    fast: Callable[[], object]  # the Triton op
    ref: Callable[[], object]  # what it replaces: the torch reference, or ("vs ...") the unfused Triton ops
    nbytes: int  # bytes the fast op must read and write


def kernel_cases(batch: int, tokens: int) -> dict[str, KernelCase]:
    """The benchmarked ops on fresh random bf16 inputs of `batch` images of `tokens` tokens (text included)."""
    import kernels
    from kernels import adaln, noise, pooling, qknorm, quant

    dev, d, n_txt, heads = Setup.device, Setup.config().hidden_size, Setup.n_text, Setup.heads
    bf16 = dict(device=dev, dtype=torch.bfloat16)
    x, y = torch.randn(batch, tokens, d, **bf16), torch.randn(batch, tokens, d, **bf16)
    shift, scale, gate = (torch.randn(batch, d, **bf16) for _ in range(3))
    side = int(round((tokens - n_txt) ** 0.5)) * 2  # latent side whose patches are the image tokens
    z0 = torch.randn(batch, 16, side, side, **bf16)
    eps = torch.randn_like(z0)
    t = torch.full((batch,), 0.1, device=dev)  # one noise level per image
    qkv, txt = torch.randn(batch, tokens - n_txt, 3 * d, **bf16), torch.randn(batch, n_txt, 3 * d, **bf16)
    norms = tuple(1 + 0.1 * torch.randn(Setup.head_dim, **bf16) for _ in range(4))
    hidden = torch.randn(batch * tokens, 4 * d, **bf16)
    image_rows = torch.randn(batch, tokens, d, **bf16)[:, : tokens - n_txt]
    xb, rows = x.numel() * 2, batch * tokens
    return {
        "layernorm_modulate": KernelCase(
            lambda: kernels.layernorm_modulate(x, shift, scale, backend="triton"),
            lambda: adaln.layernorm_modulate_ref(x, shift, scale),
            2 * xb,
        ),
        "gated_residual_layernorm_modulate": KernelCase(
            lambda: kernels.gated_residual_layernorm_modulate(x, y, gate, shift, scale, backend="triton"),
            lambda: adaln.gated_residual_layernorm_modulate_ref(x, y, gate, shift, scale),
            4 * xb,
        ),
        "mean_pool": KernelCase(
            lambda: kernels.mean_pool(x, backend="triton"), lambda: pooling.mean_pool_ref(x), xb + batch * d * 4
        ),
        "near_clean(noise)": KernelCase(
            lambda: kernels.near_clean(z0, 0.1, noise=eps, backend="triton"),
            lambda: noise.near_clean_ref(z0, 0.1, eps),
            3 * z0.numel() * 2,
        ),
        "near_clean(noise, t per image)": KernelCase(
            lambda: kernels.near_clean(z0, t, noise=eps, backend="triton"),
            lambda: noise.near_clean_ref(z0, t, eps),
            3 * z0.numel() * 2,
        ),
        "joint_qkv": KernelCase(
            lambda: kernels.joint_qkv(qkv, txt, heads, norms, backend="triton"),
            lambda: qknorm.joint_qkv_ref(qkv, txt, heads, norms),
            2 * 2 * 3 * x.numel(),
        ),
        "quantize_rowwise+gelu": KernelCase(
            lambda: kernels.quantize_rowwise(hidden, gelu=True, backend="triton"),
            lambda: quant.quantize_rowwise_ref(hidden, gelu=True),
            hidden.numel() * 3 + hidden.shape[0] * 4,
        ),
        # FP8 producers: fused (one pass, e4m3 out) vs the bf16 op then a separate quantisation pass
        "layernorm_modulate_fp8 (vs LN + quantize)": KernelCase(
            lambda: kernels.layernorm_modulate_fp8(x, shift, scale, backend="triton"),
            lambda: kernels.quantize_rowwise(
                kernels.layernorm_modulate(x, shift, scale, backend="triton"), backend="triton"
            ),
            xb + xb // 2 + rows * 4,
        ),
        "gated_residual_layernorm_modulate_fp8 (vs unfused)": KernelCase(
            lambda: kernels.gated_residual_layernorm_modulate_fp8(x, y, gate, shift, scale, backend="triton")[1:],
            lambda: kernels.quantize_rowwise(
                kernels.gated_residual_layernorm_modulate(x, y, gate, shift, scale, backend="triton")[1],
                backend="triton",
            ),
            3 * xb + xb // 2 + rows * 4,
        ),
        "quantize_rowwise(strided image rows) (vs copy + quantize)": KernelCase(
            lambda: kernels.quantize_rowwise(image_rows, backend="triton"),
            lambda: kernels.quantize_rowwise(image_rows.reshape(-1, d), backend="triton"),
            image_rows.numel() * 3,
        ),
    }


def triton_launches(fn: Callable[[], object]) -> int:
    """How many Triton kernels one call of `fn` launches."""
    from kernels.backend import observe_launches

    launched = []
    with observe_launches(lambda kernel, args, kwargs: launched.append(kernel)):
        fn()
    return len(launched)


def graph_us(fn: Callable[[], object]) -> float:
    """Median µs per call: CUDA-graph replay on CUDA (no host overhead), a short wall-clock timing elsewhere."""
    if Setup.device == "cuda":
        import triton.testing

        return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
    fn()
    start = time.perf_counter()
    for _ in range(2):
        fn()
    return 1e6 * (time.perf_counter() - start) / 2


def device_us(fn: Callable[[], object], calls: int = 20) -> float:
    """µs per call of device time that `torch.profiler` attributes to the kernels `fn` launches (CPU: CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = Setup.device == "cuda"
    calls = calls if on_cuda else 2
    with profile(activities=[ProfilerActivity.CUDA if on_cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        if on_cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    total = sum(e.self_device_time_total if on_cuda else e.self_cpu_time_total for e in events)
    return total / calls


def _rel_errs(got: object, want: object) -> float:
    got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
    pairs = zip(got, want, strict=True)
    return max(float((g.float() - w.float()).norm() / w.float().norm().clamp_min(1e-30)) for g, w in pairs)


def measure(name: str, case: KernelCase, batch: int, tokens: int, with_compile: bool) -> dict:
    """One row: accuracy, launches, both timings of both sides (and of the compiled reference), GB/s."""
    row = {"op": name, "batch": batch, "tokens": tokens, "dim": Setup.config().hidden_size, "bytes": case.nbytes}
    with torch.inference_mode():
        row["max_rel_err"] = _rel_errs(case.fast(), case.ref())
        row["triton_launches"], row["ref_triton_launches"] = triton_launches(case.fast), triton_launches(case.ref)
        for label, fn in (("triton", case.fast), ("eager", case.ref)):
            row[f"{label}_us"] = graph_us(fn)
            row[f"{label}_device_us"] = device_us(fn)
        if with_compile:
            try:
                compiled = torch.compile(case.ref, dynamic=False)
                compiled()
                row["compile_us"] = graph_us(compiled)
            except Exception as e:  # (a compile failing costs only its own number)
                row["compile_error"] = f"error: {type(e).__name__}: {str(e)[:300]}"
    row["triton_gb_s"] = case.nbytes / row["triton_us"] / 1e3
    row["triton_device_gb_s"] = case.nbytes / max(row["triton_device_us"], 1e-3) / 1e3
    return row


def kernel_bench(sec: Section, compile_batches: tuple[int, ...], cases: tuple[str, ...] | None = None) -> dict:
    """Rows at each `Setup.kernel_shapes`; `torch.compile` of the reference at `compile_batches` (of the ops in
    `cases`, default all). Every row stands alone: an error becomes an "error" row, and no row starts once the
    section's budget is spent."""
    for batch, tokens in Setup.kernel_shapes:
        for name, case in kernel_cases(batch, tokens).items():
            if sec.stopped(f"{name} b{batch}", op=name, batch=batch, tokens=tokens):
                return {}
            with_compile = batch in compile_batches and (cases is None or name in cases)
            try:
                row = measure(name, case, batch, tokens, with_compile)
            except Exception as e:
                row = {"op": name, "batch": batch, "tokens": tokens, "error": f"error: {type(e).__name__}: {e}"[:500]}
                log(f"{name:<36} b{batch} n{tokens}: {row['error']}")
            else:
                log(
                    f"{name:<36} b{batch} n{tokens}: triton {row['triton_us']:.1f}us graph / "
                    f"{row['triton_device_us']:.1f}us profiler ({row['triton_gb_s']:.0f} GB/s, "
                    f"{row['triton_launches']} launches) eager {row['eager_us']:.1f}us "
                    f"compile {row.get('compile_us', float('nan')):.1f}us err {row['max_rel_err']:.1e}"
                )
            sec.row(row)
    return {}
