"""Every Triton kernel compiles for the H100/H200 (sm_90) at the specialisations the ops launch, without a GPU.

The interpreter runs kernels the GPU compiler rejects (a kernel whose constexpr parameters the compiler does not see
as constexpr interprets fine and fails to compile); `tools.cross_compile` closes that gap with the ptxas in the
triton wheel. It runs in a subprocess: this process imported triton in interpreter mode.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from kernels.backend import _bind_helpers  # noqa: E402
from tools import cross_compile  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _ptxas() -> Path:
    import triton.backends.nvidia as nvidia

    return Path(nvidia.__file__).parent / "bin" / "ptxas"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> list[dict]:
    if not _ptxas().exists():
        pytest.skip("this triton wheel ships no ptxas (not an x86-64/aarch64 Linux wheel)")
    out = tmp_path_factory.mktemp("cross_compile") / "compiled.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # it records in its own subprocess
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton's own default, stated (silences a warning in 3.9)
    cmd = [sys.executable, "-m", "tools.cross_compile", "--json", str(out)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if not out.exists():
        pytest.fail(f"tools.cross_compile wrote nothing (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    return json.loads(out.read_text())


def test_every_kernel_compiles_for_sm90(compiled):
    failed = [(r["kernel"], r["constexprs"], r["error"].splitlines()[-1]) for r in compiled if r["error"]]
    assert not failed, f"{len(failed)} specialisations failed to compile for sm_90: {failed}"
    assert {r["kernel"] for r in compiled} == set(cross_compile.kernel_names().values()), "a kernel was never launched"
    assert {r["arch"] for r in compiled} == {90}


def test_no_kernel_spills_registers(compiled):
    built = [r for r in compiled if not r["error"]]
    spilled = [(r["kernel"], r["shapes"], r["constexprs"], r["resources"]) for r in built if r["resources"]["LOCAL"]]
    assert built and not spilled, f"kernels spill to local memory on sm_90: {spilled}"
    assert all(0 < r["resources"]["REG"] <= 255 for r in built)


def test_kernels_read_sd35_large_rows_in_128_bit_accesses(compiled):
    # memory-bound kernels: at SD3.5-L's widths every one loads 16 bytes per instruction (8 bf16 values); a lost
    # alignment or divisibility hint would silently cut that to one element per instruction
    sd35 = [r for r in compiled if r["shapes"] == "sd3.5-large" and not r["error"]]
    assert sd35 and {r["resources"]["LD_BITS"] for r in sd35} == {128}


def test_compiled_as_the_gpu_launches_them(compiled):
    # interpreter-only switches are compiled with their GPU values
    for switch, gpu_value in (("EXACT_ROUNDING", "False"), ("FAST_TANH", "True"), ("WELFORD", "True")):
        values = [r["constexprs"][switch] for r in compiled if switch in r["constexprs"]]
        assert values and set(values) == {gpu_value}, switch
    # a row in two tiles: SD3.5-L's D = 2432 as 2048 + 512 lanes (5% masked, where one 4096-lane tile masked 41%)
    adaln = [r["constexprs"] for r in compiled if r["kernel"].endswith("_adaln_fwd_kernel")]
    assert {(c["BLOCK_A"], c["BLOCK_B"]) for c in adaln} == {("2048", "512"), ("128", "128")}
    # inference launches store no LayerNorm statistics; only the autograd path (for its backward) does
    assert {c["STORE_STATS"] for c in adaln if c["FP8_OUT"] == "True"} == {"False"}


def test_fp8_gelu_evaluates_tanh_once_per_element(compiled):
    # one SFU tanh per element (SASS MUFU.TANH; the two-pass kernel spent 2 EX2 + 2 RCP), the scale's reciprocal
    # once per row, no division per element
    gelu = [r for r in compiled if r["kernel"].endswith("_quantize_rows_kernel") and r["constexprs"]["APPLY_GELU"]]
    for r in (r for r in gelu if r["constexprs"]["APPLY_GELU"] == "True" and not r["error"]):
        lanes = int(r["constexprs"]["BLOCK_A"]) + int(r["constexprs"]["BLOCK_B"])
        per_thread = lanes // (32 * r["num_warps"])
        sass = r["sfu"]["SASS"]
        assert sass.get("TANH") == per_thread and "EX2" not in sass, (r["shapes"], sass)
        assert sass.get("RCP", 0) <= 4, sass  # the IEEE scale and reciprocal: per row, not per element
    # the joint attention output's image rows are read in place (a strided view, its pointer still aligned)
    assert any("x_ptr" in r["divisible_by_16"] for r in compiled if r["kernel"].endswith("_quantize_rows_kernel"))


def test_kernels_keep_their_signature_when_helpers_are_bound():
    # triton reads `tl.constexpr` parameters from the function's annotations: binding helpers must keep them
    for kernel in cross_compile.kernel_names():
        bound = _bind_helpers(kernel.fn, True)
        assert inspect.signature(bound) == inspect.signature(kernel.fn), kernel.fn.__name__
