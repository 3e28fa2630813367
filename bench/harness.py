"""The shared timing and memory harness every benchmark uses (DESIGN.md, "Where numbers come from").

- `time_fn`: CUDA events around each call (host timers would measure launch time, not GPU time), warm-up excluded,
  inputs rotated so that no cache (allocator, autotuner, a conditioning cache) sees the same tensor twice in a row.
- `measure_peak`: `torch.cuda.max_memory_allocated` after a reset, plus NVML device-used as a second view (it also
  counts the CUDA context, cuBLAS workspaces and the caching allocator's reserve).
- `environment_info`: what every result JSON records (GPU, CPU, library versions, commit, date; no hostname), and
  `provenance`: the part of it every result row repeats.
- `ceilings`: measured copy bandwidth and matmul throughput, the denominators of the roofline columns.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import platform
import resource
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

_GIB = float(1 << 30)
_REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Timing:
    """Per-call latencies in milliseconds, warm-up excluded. Build with `Timing.from_samples`."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    max_ms: float
    n: int
    samples_ms: tuple[float, ...]

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> Timing:
        if not samples_ms:
            raise ValueError("Timing needs at least one sample")
        ordered = sorted(float(s) for s in samples_ms)
        return cls(
            median_ms=statistics.median(ordered),
            p10_ms=_quantile(ordered, 0.1),
            p90_ms=_quantile(ordered, 0.9),
            min_ms=ordered[0],
            max_ms=ordered[-1],
            n=len(ordered),
            samples_ms=tuple(float(s) for s in samples_ms),
        )

    def per_image(self, batch: int) -> Timing:
        """The same timing divided by the batch size: per-image latency = batch time / batch."""
        if batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch!r}")
        return Timing.from_samples([s / batch for s in self.samples_ms])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["samples_ms"] = list(self.samples_ms)
        return d


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted sequence (numpy's default 'linear' method)."""
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _as_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def time_fn(
    fn: Callable[[Any], Any],
    inputs: Sequence[Any],
    *,
    warmup: int = 3,
    iters: int = 10,
    device: str | torch.device,
) -> Timing:
    """Time `fn(inputs[i % len(inputs)])`, one sample per call.

    Warm-up call `i` (i < warmup) and timed call `i` (i < iters) both take `inputs[i % len(inputs)]`, so with
    several inputs consecutive calls never repeat a tensor. On CUDA each call sits between two events recorded on
    the current stream and the host synchronises once at the end (a sync per call would add its own latency between
    calls); elsewhere `time.perf_counter` brackets each call.
    """
    if len(inputs) == 0:
        raise ValueError("time_fn needs at least one input")
    if iters < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    device = _as_device(device)
    n_inputs = len(inputs)

    for i in range(warmup):
        fn(inputs[i % n_inputs])

    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.synchronize()
            events = [
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)
            ]
            for i, (start, end) in enumerate(events):
                start.record()
                fn(inputs[i % n_inputs])
                end.record()
            torch.cuda.synchronize()
            samples = [start.elapsed_time(end) for start, end in events]
    else:
        samples = []
        for i in range(iters):
            t0 = time.perf_counter()
            fn(inputs[i % n_inputs])
            samples.append((time.perf_counter() - t0) * 1e3)
    return Timing.from_samples(samples)


@dataclass(frozen=True)
class MemoryPeak:
    """Memory of one call, GiB. CUDA: `allocated_gib`/`reserved_gib` are the allocator's peaks during the call,
    `nvml_used_gib` the device-used snapshot right after it (None without nvidia-ml-py). CPU: only `rss_gib`, the
    process's resident high-water mark since start (the OS offers no reset, so it bounds the call from above)."""

    allocated_gib: float | None
    reserved_gib: float | None
    nvml_used_gib: float | None
    rss_gib: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_peak(fn: Callable[..., Any], *args: Any, device: str | torch.device) -> MemoryPeak:
    """Run `fn(*args)` once and report its memory peak (see `MemoryPeak`)."""
    device = _as_device(device)
    if device.type != "cuda":
        fn(*args)
        # ru_maxrss is KiB on Linux (bytes on macOS).
        scale = 1.0 if platform.system() == "Darwin" else 1024.0
        return MemoryPeak(None, None, None, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / _GIB)
    with torch.cuda.device(device):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn(*args)
        torch.cuda.synchronize()
        allocated = torch.cuda.max_memory_allocated() / _GIB
        reserved = torch.cuda.max_memory_reserved() / _GIB
    return MemoryPeak(allocated, reserved, _nvml_used_gib(device), None)


def _nvml_handle(device: torch.device) -> Any:
    """The NVML handle of a torch CUDA device, or None. Matched by UUID because CUDA_VISIBLE_DEVICES renumbers
    torch's indices but not NVML's."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    with contextlib.suppress(pynvml.NVMLError):
        if uuid is not None:
            return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
    with contextlib.suppress(pynvml.NVMLError):
        return pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
    return None


def _nvml_used_gib(device: torch.device) -> float | None:
    handle = _nvml_handle(device)
    if handle is None:
        return None
    import pynvml

    return pynvml.nvmlDeviceGetMemoryInfo(handle).used / _GIB


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str:
    if os.environ.get("DITREWARD_COMMIT"):  # the device machine receives a working tree without .git
        return os.environ["DITREWARD_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=_REPO_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def cpu_name() -> str | None:
    """The CPU model (Linux /proc/cpuinfo), for labelling CPU results."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def environment_info(device: str | torch.device | None = None) -> dict[str, Any]:
    """What a result JSON records about the machine and software. No hostname, user or path.

    Keys: gpu, gpu_memory_gib, gpu_count, driver, cpu (model name, None where unknown), cpu_count, cuda, torch,
    triton, diffusers, transformers, python, git_commit, date (ISO 8601, UTC).
    """
    info: dict[str, Any] = {"gpu": None, "gpu_memory_gib": None, "gpu_count": 0, "driver": None}
    if torch.cuda.is_available():
        dev = _as_device(device if device is not None else "cuda")
        if dev.type == "cuda":
            props = torch.cuda.get_device_properties(dev)
            info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / _GIB, 2))
            handle = _nvml_handle(dev)
            if handle is not None:
                import pynvml

                driver = pynvml.nvmlSystemGetDriverVersion()
                info["driver"] = driver.decode() if isinstance(driver, bytes) else driver
        info["gpu_count"] = torch.cuda.device_count()
    info.update(
        cpu=cpu_name(),
        cpu_count=os.cpu_count(),
        cuda=torch.version.cuda,
        torch=torch.__version__,
        triton=_package_version("triton") or _package_version("pytorch-triton"),
        diffusers=_package_version("diffusers"),
        transformers=_package_version("transformers"),
        python=platform.python_version(),
        git_commit=_git_commit(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    return info


def provenance(env: dict[str, Any]) -> dict[str, Any]:
    """The fields of `environment_info` each result row carries: device (the GPU's name, or "cpu"), torch, commit,
    date."""
    return {"device": env["gpu"] or "cpu", "torch": env["torch"], "commit": env["git_commit"], "date": env["date"]}


def ceilings(device: str | torch.device) -> dict[str, Any]:
    """Measured ceilings for the roofline columns.

    copy_tb_s: a large device-to-device `copy_`, counting read + write bytes. matmul_tflop_s: an n³ matmul at
    2·n³ flop. On CUDA: 1 GiB copies and bf16 n=8192 (large enough to leave launch overhead and L2 out of the
    figure), and on FP8 hardware fp8_matmul_tflop_s (e4m3 `torch._scaled_mm`, rowwise scales). Elsewhere: small
    fp32 sizes so that a CPU run finishes in about a second; those are sanity numbers, not ceilings to quote.
    """
    device = _as_device(device)
    on_cuda = device.type == "cuda"
    copy_bytes = (1 << 30) if on_cuda else (64 << 20)
    n = 8192 if on_cuda else 512
    dtype = torch.bfloat16 if on_cuda else torch.float32
    iters = 10 if on_cuda else 3

    # Operands travel as the input (not closed over) so that `del` frees the copy buffers before the matmul.
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device).fill_(1)
    copy_pair = [(src, torch.empty_like(src))]
    copy = time_fn(lambda pair: pair[1].copy_(pair[0]), copy_pair, warmup=3, iters=iters, device=device)
    del src, copy_pair

    gen = torch.Generator(device=device).manual_seed(0)
    operands = [tuple(torch.randn(n, n, device=device, dtype=dtype, generator=gen) for _ in range(2))]
    mm = time_fn(lambda ab: ab[0] @ ab[1], operands, warmup=3, iters=iters, device=device)
    del operands

    out = {
        "copy_tb_s": 2 * copy_bytes / (copy.median_ms * 1e-3) / 1e12,
        "copy_bytes": copy_bytes,
        "matmul_tflop_s": 2 * n**3 / (mm.median_ms * 1e-3) / 1e12,
        "matmul_n": n,
        "matmul_dtype": str(dtype).removeprefix("torch."),
    }
    if on_cuda and torch.cuda.get_device_capability(device) >= (8, 9):  # e4m3 GEMM, rowwise scales (as the engine)
        a, b = (torch.randn(n, n, device=device, generator=gen).to(torch.float8_e4m3fn) for _ in range(2))
        sa, sb = torch.ones(n, 1, device=device), torch.ones(1, n, device=device)
        mm8 = time_fn(
            lambda ab: torch._scaled_mm(ab[0], ab[1].t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16),
            [(a, b)],
            warmup=3,
            iters=iters,
            device=device,
        )
        out["fp8_matmul_tflop_s"] = 2 * n**3 / (mm8.median_ms * 1e-3) / 1e12
    return out


__all__ = [
    "MemoryPeak",
    "Timing",
    "ceilings",
    "cpu_name",
    "environment_info",
    "measure_peak",
    "provenance",
    "time_fn",
]
