"""Compile every Triton kernel for a GPU on a machine that has none (ptxas ships inside the triton wheel).

CI has no GPU, and its interpreter accepts programs the GPU compiler rejects and never allocates a register. This
module drives the public ops on the CPU interpreter, at SD3.5-Large's widths (D = 2432, 38 heads of 64, FFN 9728)
and at odd shapes, records each kernel launch they make (``kernels.backend.observe_launches``), and compiles every
distinct specialisation for a CUDA target, default sm_90 (H100/H200): the same signature, constexprs, divisibility
attributes and launch options (``num_warps``) that Triton's own launcher would derive from those arguments on the
GPU. Each compiled kernel's resource use (registers, spilled bytes, shared memory) is read from its cubin with the
bundled ``cuobjdump``: a kernel that spills is slow before anyone has timed it.

    python -m tools.cross_compile [--arch 90 ...] [--json PATH]

Run it without ``TRITON_INTERPRET``: triton decorates its own library in one mode per process, so the recording
runs in a subprocess with ``TRITON_INTERPRET=1`` and hands over each launch's arguments as descriptions (a tensor's
dtype and 16-byte alignment, scalars by value), which is all a specialisation depends on. Launch values that exist
only for the interpreter are compiled as the GPU sets them (`GPU_LAUNCH_VALUES`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Field

from engine.io.files import read_json
from engine.schema import Schema, parse_cli
from kernels import adaln, adaln_backward, noise, pooling, qknorm, quant
from kernels.backend import ENV_VAR, LazyKernel, interpreting, observe_launches

KERNEL_MODULES = (adaln, adaln_backward, noise, pooling, qknorm, quant)

# constexprs the launchers set from `interpreting()` (a CPU-interpreter workaround): the GPU launches them like this
GPU_LAUNCH_VALUES = {"EXACT_ROUNDING": False, "FAST_TANH": True, "WELFORD": True}


@dataclass(frozen=True)
class Shapes:
    """One set of widths to drive the ops at."""

    name: str
    dim: int
    heads: int
    ffn: int
    tokens: tuple[int, ...]  # image-token counts (each also gets `text` text tokens)
    text: int


SHAPES = (
    Shapes("sd3.5-large", dim=2432, heads=38, ffn=9728, tokens=(16, 21), text=5),
    Shapes("odd", dim=224, heads=7, ffn=808, tokens=(7,), text=3),
)
POOL_TOKENS = 300  # more tokens than one BLOCK_N tile at every strip width


@dataclass
class Launch:
    """One recorded launch: positional arguments described by `describe_arg`, keyword arguments by value."""

    kernel: str
    shapes: str
    args: list[dict]
    kwargs: dict


def describe_arg(arg: Any) -> dict:
    """What Triton specialises a kernel argument on: a tensor's dtype and 16-byte alignment, a scalar's value."""
    if isinstance(arg, torch.Tensor):
        return {"tensor": str(arg.dtype).removeprefix("torch."), "align16": arg.data_ptr() % 16 == 0}
    if arg is None or isinstance(arg, (bool, int, float)):
        return {"value": arg}
    raise TypeError(f"cannot describe kernel argument of type {type(arg).__name__}")


def _stand_in(desc: dict) -> Any:
    """The argument `describe_arg` described: a pointer stand-in with the tensor's dtype and alignment, or the value."""
    if "tensor" not in desc:
        return desc["value"]
    from triton.runtime.jit import MockTensor

    class Pointer(MockTensor):
        def data_ptr(self) -> int:
            return 0 if desc["align16"] else 8

    return Pointer(getattr(torch, desc["tensor"]))


@dataclass
class Compiled:
    """One specialisation compiled for one arch."""

    kernel: str
    shapes: str
    constexprs: dict  # name -> value (Triton also makes ints equal to 1 constexpr)
    divisible_by_16: list  # pointers 16-byte aligned and ints divisible by 16 (how Triton vectorises)
    num_warps: int
    arch: int = 90
    seconds: float = 0.0
    # REG, SHARED, LOCAL, STACK from cuobjdump (LOCAL > 0: spills); LD_BITS, ST_BITS: widest global access in the PTX
    resources: dict = field(default_factory=dict)
    sfu: dict = field(default_factory=dict)  # special-function instructions: see `_sfu_counts`
    error: str | None = None


def kernel_names() -> dict[LazyKernel, str]:
    """Every Triton kernel of the package, by its module-qualified name."""
    names = {}
    for module in KERNEL_MODULES:
        for name, obj in vars(module).items():
            if isinstance(obj, LazyKernel):
                names[obj] = f"{module.__name__}.{name}"
    return names


def record_launches(shapes: tuple[Shapes, ...] = SHAPES, seed: int = 0) -> list[Launch]:
    """Run every public op (forward and, where differentiable, backward) on the CPU interpreter at `shapes`; return
    the launches they made."""
    if not interpreting():
        raise RuntimeError("record_launches runs the ops on the CPU interpreter: set TRITON_INTERPRET=1 before import")
    names = kernel_names()
    launches: list[Launch] = []
    current = [""]

    def record(kernel, args, kwargs):
        launches.append(Launch(names[kernel], current[0], [describe_arg(a) for a in args], dict(kwargs)))

    gen = torch.Generator().manual_seed(seed)
    previous = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = "triton"  # every op's Triton path, whatever the caller's setting
    try:
        with observe_launches(record):
            for s in shapes:
                current[0] = s.name
                _drive_ops(s, gen)
    finally:
        if previous is None:
            del os.environ[ENV_VAR]
        else:
            os.environ[ENV_VAR] = previous
    return launches


def _drive_ops(s: Shapes, gen: torch.Generator) -> None:
    import kernels

    def randn(*shape, dtype=torch.bfloat16, grad=False):
        return torch.randn(*shape, generator=gen).to(dtype).requires_grad_(grad)

    for i, n in enumerate(s.tokens):  # later token counts vary the divisibility of the token count (bf16 only)
        for dtype in (torch.bfloat16, torch.float32) if i == 0 else (torch.bfloat16,):
            x, y = randn(2, n, s.dim, dtype=dtype, grad=True), randn(2, n, s.dim, dtype=dtype, grad=True)
            gate, shift, scale = (randn(2, s.dim, dtype=dtype, grad=True) for _ in range(3))
            out = kernels.layernorm_modulate(x, shift, scale)
            x_new, out2 = kernels.gated_residual_layernorm_modulate(x, y, gate, shift, scale)
            (out.float().sum() + out2.float().sum() + x_new.float().sum()).backward()
            _, out3 = kernels.gated_residual_layernorm_modulate(x, y, gate, shift, scale)
            out3.float().sum().backward()  # the backward without a gradient for x_new
            kernels.gated_residual(x, y, gate).float().sum().backward()
            if i == 0:
                kernels.mean_pool(randn(2, POOL_TOKENS, s.dim, dtype=dtype, grad=True)).sum().backward()
            z0 = randn(2, 16, 8, 6, dtype=dtype, grad=True)
            kernels.near_clean(z0, 0.1, noise=randn(*z0.shape, dtype=dtype)).float().sum().backward()
            kernels.near_clean(z0, 0.1, seed=2**40 + 3).float().sum().backward()
        with torch.no_grad():
            x, y = randn(2, n, s.dim), randn(2, n, s.dim)
            gate, shift, scale = randn(2, s.dim), randn(2, s.dim), randn(2, s.dim)
            kernels.layernorm_modulate_fp8(x, shift, scale)
            kernels.gated_residual_layernorm_modulate_fp8(x, y, gate, shift, scale)
            kernels.quantize_rowwise(randn(2 * n, s.ffn), gelu=True)
            joint = randn(2, n + s.text, s.dim)
            kernels.quantize_rowwise(joint[:, :n])  # the attention output's image rows, read in place
            feats = torch.empty(2, 3, s.dim)
            kernels.mean_pool_into(joint[:, :n], feats, 1)
            head_dim = s.dim // s.heads
            norms = tuple(randn(head_dim) for _ in range(4))
            img, txt = randn(2, n, 3 * s.dim), randn(2, s.text, 3 * s.dim)
            kernels.joint_qkv(img, txt, s.heads, norms)
            kernels.joint_qkv(img, txt[..., : 2 * s.dim], s.heads, (*norms[:2], None, norms[3]))
            kernels.joint_qkv(img, None, s.heads, None)


def _specialise(launch: Launch, kernel: LazyKernel, arch: int):
    """Triton's launcher's first step for `launch` on a GPU of compute capability `arch`: (jit function, target,
    backend, keyword arguments, bound arguments, specialisation, options), interpreter-only values replaced by the
    GPU's."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    jit = kernel.jitted(False)  # the compiled-mode function, its helpers compiled too
    kwargs = {k: GPU_LAUNCH_VALUES.get(k, v) for k, v in launch.kwargs.items()}
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound_args, specialization, options = binder(*map(_stand_in, launch.args), **kwargs)
    return jit, target, backend, kwargs, bound_args, specialization, options


def _key(launch: Launch, kernel: LazyKernel) -> tuple:
    """What Triton keys its cache on: the specialisation (types, divisibility, constexpr values) and options."""
    *_, specialization, options = _specialise(launch, kernel, 90)
    return launch.kernel, repr(specialization), repr(sorted(options.items()))


def compile_launch(launch: Launch, kernel: LazyKernel, arch: int) -> Compiled:
    """Compile `launch` for CUDA compute capability `arch` as Triton's launcher would on such a GPU."""
    import triton
    from triton.compiler import ASTSource

    jit, target, backend, kwargs, bound_args, specialization, options = _specialise(launch, kernel, arch)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound_args, specialization, options)
    names = [p.name for p in jit.params]
    result = Compiled(
        launch.kernel,
        launch.shapes,
        {names[path[0]]: repr(value) for path, value in constexprs.items()},
        sorted(names[path[0]] for path, attr in attrs.items() if ["tt.divisibility", 16] in attr),
        options.num_warps,
        arch,
    )
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target, options=options.__dict__)
    except Exception as e:  # noqa: BLE001 (reported per kernel: one failure must not hide the others)
        result.error = f"{type(e).__name__}: {e}"
        return result
    finally:
        result.seconds = time.perf_counter() - start
    result.resources = _resources(compiled.asm["cubin"]) | _access_widths(compiled.asm["ptx"])
    result.sfu = _sfu_counts(compiled.asm["cubin"], compiled.asm["ptx"])
    return result


# PTX instructions the special-function unit executes (or, for the IEEE division and square root, starts with a
# MUFU.RCP / MUFU.RSQ and refines in FMAs)
_PTX_SFU = (
    r"\b((?:ex2|lg2|rcp|rsqrt|sqrt|sin|cos|tanh)\.approx|div\.(?:rn|full|approx)|sqrt\.rn|rcp\.rn)(?:\.ftz)?\.f32\b"
)


def _sfu_counts(cubin: bytes, ptx: str) -> dict:
    """Special-function instructions in the kernel, counted statically (each occurrence once, loops not unrolled):
    SASS `MUFU.<op>` by op from the bundled cuobjdump (key `SASS`), and the PTX instructions that lower to them (key
    `PTX`). Per element = count x threads per program / elements a program handles per pass (the caller knows those)."""
    counts: dict = {"PTX": {}}
    for op in re.findall(_PTX_SFU, ptx):
        counts["PTX"][op] = counts["PTX"].get(op, 0) + 1
    sass = _sass(cubin)
    if sass is not None:
        counts["SASS"] = {}
        for op in re.findall(r"\bMUFU\.([A-Z0-9_]+)", sass):
            counts["SASS"][op] = counts["SASS"].get(op, 0) + 1
    return counts


def _sass(cubin: bytes) -> str | None:
    """The cubin's SASS from the cuobjdump bundled with triton (None without it)."""
    tool = _nvidia_tool("cuobjdump")
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        done = subprocess.run([str(tool), "--dump-sass", f.name], capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else None


def _nvidia_tool(name: str) -> Path | None:
    import triton.backends.nvidia as nvidia

    tool = Path(nvidia.__file__).parent / "bin" / name
    return tool if tool.exists() else None


def _access_widths(ptx: str) -> dict:
    """Widest global load and store in the PTX, in bits (128: fully vectorised; 16 for a bf16 kernel: one element per
    instruction, a memory-bound kernel running far below bandwidth)."""
    widths = {"LD_BITS": 0, "ST_BITS": 0}
    for op, vec, bits in re.findall(r"\b(ld|st)\.global(?:\.[A-Za-z0-9_:]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b", ptx):
        key = "LD_BITS" if op == "ld" else "ST_BITS"
        widths[key] = max(widths[key], int(vec or 1) * int(bits))
    return widths


def _resources(cubin: bytes) -> dict:
    """REG/SHARED/LOCAL/STACK of the cubin's function, from the cuobjdump bundled with triton ({} without it)."""
    tool = _nvidia_tool("cuobjdump")
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    line = next((ln for ln in text.splitlines() if "REG:" in ln), "")
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}


def recorded_launches() -> list[Launch]:
    """`record_launches` run in a subprocess with ``TRITON_INTERPRET=1`` (this process compiles)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "launches.json"
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        cmd = [sys.executable, "-m", "tools.cross_compile", "--record", str(path)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"recording the launches failed:\n{done.stdout}{done.stderr}")
        return [Launch(**d) for d in json.loads(path.read_text())]


def cross_compile(arches: tuple[int, ...] = (90,), launches: list[Launch] | None = None) -> list[Compiled]:
    """Compile each distinct launch for every arch in `arches`; `launches` defaults to those the ops make at `SHAPES`
    (recorded in a subprocess)."""
    if interpreting():
        raise RuntimeError(
            "tools.cross_compile compiles for the GPU: run it without TRITON_INTERPRET (it records the launches in "
            "a subprocess that sets it)"
        )
    by_name = {name: kernel for kernel, name in kernel_names().items()}
    unique: dict[tuple, Launch] = {}
    for launch in recorded_launches() if launches is None else launches:
        unique.setdefault(_key(launch, by_name[launch.kernel]), launch)
    return [compile_launch(launch, by_name[launch.kernel], arch) for arch in arches for launch in unique.values()]


def _mufu(sfu: dict) -> str:
    """`EX2:32 RCP:48`: the kernel's static SASS MUFU instructions by op ('-' without them, '?' without SASS)."""
    if "SASS" not in sfu:
        return "?"
    return " ".join(f"{op}:{n}" for op, n in sorted(sfu["SASS"].items())) or "-"


class CrossCompileArgs(Schema):
    """The command line of `python -m tools.cross_compile`."""

    arch: list[Annotated[int, Field(ge=70, le=200)]] = Field(
        [90], min_length=1, description="CUDA compute capabilities (90: H100/H200)"
    )
    json_out: str | None = Field(None, min_length=1, description="write every compiled specialisation here",
                                 json_schema_extra={"cli": {"flag": "--json"}})  # fmt: skip
    record: str | None = Field(
        None, min_length=1, description="only record the launches to this file (needs TRITON_INTERPRET=1)"
    )
    launches: str | None = Field(
        None, min_length=1, description="compile the launches recorded in this file (e.g. by another triton version)"
    )


def main(argv: list[str] | None = None) -> list[Compiled]:
    args = parse_cli(CrossCompileArgs, argv, "python -m tools.cross_compile", __doc__.split("\n\n")[0])
    if args.record:
        Path(args.record).write_text(json.dumps([asdict(launch) for launch in record_launches()]))
        return []
    import triton

    launches = [Launch(**d) for d in read_json(args.launches, "launch record")] if args.launches else None
    results = cross_compile(tuple(args.arch), launches)
    print(f"triton {triton.__version__}: {len(results)} specialisations for sm_{'/sm_'.join(map(str, args.arch))}")
    head = (
        f"{'kernel':22} {'shapes':12} {'sm':>3} {'warps':>5} {'REG':>4} {'LOCAL':>5} {'SHARED':>6} {'LD/ST bits':>10}"
    )
    print(f"{head}  {'SASS MUFU':24} constexprs")
    for r in results:
        res = r.resources
        consts = ", ".join(f"{k}={v}" for k, v in r.constexprs.items())
        print(
            f"{r.kernel.rsplit('.', 1)[1]:22} {r.shapes:12} {r.arch:3} {r.num_warps:5} {res.get('REG', '-'):>4} "
            f"{res.get('LOCAL', '-'):>5} {res.get('SHARED', '-'):>6} "
            f"{res.get('LD_BITS', '-'):>5}/{res.get('ST_BITS', '-'):<4}  {_mufu(r.sfu):24} "
            f"{f'ERROR {r.error}' if r.error else consts}"
        )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps([asdict(r) for r in results], indent=1, default=str))
    failed = [r for r in results if r.error]
    if failed:
        print(f"{len(failed)} of {len(results)} failed to compile", file=sys.stderr)
        sys.exit(1)
    return results


if __name__ == "__main__":
    main()
