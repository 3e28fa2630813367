"""Kernels vs their torch references (forward and backward), the backend switch, and argument checks.

Triton kernels run in the CPU interpreter here; shapes are small on purpose (the interpreter is slow).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import FP32_REL_TOL, assert_within_rule, check_against_reference, outputs_and_grads, rel_err

import kernels
from kernels import backend as kernel_backend
from kernels.adaln import (
    gated_residual,
    gated_residual_layernorm_modulate,
    gated_residual_layernorm_modulate_ref,
    gated_residual_ref,
    layernorm_modulate,
    layernorm_modulate_ref,
)
from kernels.pooling import mean_pool, mean_pool_into, mean_pool_ref

pytestmark = pytest.mark.skipif(not kernel_backend.triton_available(), reason="triton is not installed")

SHAPES = [(2, 37, 48), (1, 1, 152), (5, 3, 64)]  # odd token counts, D not a power of two, batch 1 and 5
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture
def poisoned_alloc(monkeypatch):
    """Fill every float tensor from torch.empty/empty_like with NaN, so unwritten kernel outputs show up."""
    for name in ("empty", "empty_like"):
        original = getattr(torch, name)

        def poisoned(*args, _original=original, **kwargs):
            out = _original(*args, **kwargs)
            return out.fill_(float("nan")) if out.is_floating_point() else out

        monkeypatch.setattr(torch, name, poisoned)


def make(shape, dtype, requires_grad=True):
    return torch.randn(shape).to(dtype).requires_grad_(requires_grad)


# ----------------------------------------------------------------------------------------------------------------------
# adaLN
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_layernorm_modulate(shape, dtype, poisoned_alloc):
    torch.manual_seed(0)
    b, _, d = shape
    inputs = [make(shape, dtype), make((b, d), dtype), make((b, d), dtype)]
    check_against_reference(layernorm_modulate, layernorm_modulate_ref, inputs, 1, dtype, "layernorm_modulate")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gated_residual_layernorm_modulate(shape, dtype, poisoned_alloc):
    torch.manual_seed(0)
    b, _, d = shape
    inputs = [make(shape, dtype), make(shape, dtype), *(make((b, d), dtype) for _ in range(3))]
    check_against_reference(
        gated_residual_layernorm_modulate, gated_residual_layernorm_modulate_ref, inputs, 2, dtype, "gated_residual_ln"
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gated_residual(shape, dtype, poisoned_alloc):
    torch.manual_seed(0)
    b, _, d = shape
    inputs = [make(shape, dtype), make(shape, dtype), make((b, d), dtype)]
    check_against_reference(gated_residual, gated_residual_ref, inputs, 1, dtype, "gated_residual")


@pytest.mark.parametrize("used", ["x_new", "out"])
def test_gated_residual_layernorm_modulate_one_output_used(used):
    torch.manual_seed(0)
    shape, b, d = (2, 5, 48), 2, 48
    inputs = [make(shape, torch.float32), make(shape, torch.float32), *(make((b, d), torch.float32) for _ in range(3))]

    def grads(op):
        x_new, out = op(*inputs)
        loss = (x_new if used == "x_new" else out).square().sum()
        return torch.autograd.grad(loss, inputs, allow_unused=True)

    kernel = grads(lambda *a: gated_residual_layernorm_modulate(*a, backend="triton"))
    reference = grads(lambda *a: gated_residual_layernorm_modulate_ref(*a, upcast=True))
    for k, r in zip(kernel, reference, strict=True):
        expected = torch.zeros_like(k) if r is None else r
        assert rel_err(k, expected) <= FP32_REL_TOL or expected.abs().max() == 0 == k.abs().max()


def test_layernorm_modulate_torch_backend_matches_upcast_reference():
    torch.manual_seed(0)
    x, shift, scale = make((2, 7, 48), torch.bfloat16), make((2, 48), torch.bfloat16), make((2, 48), torch.bfloat16)
    out = layernorm_modulate(x, shift, scale, backend="torch")
    assert torch.equal(out, layernorm_modulate_ref(x, shift, scale, upcast=True))


def test_adaln_non_contiguous_inputs():
    torch.manual_seed(0)
    x = torch.randn(7, 2, 48).transpose(0, 1)  # [2, 7, 48], not contiguous
    shift, scale = torch.randn(48, 2).t(), torch.randn(2, 48)
    out = layernorm_modulate(x, shift, scale, backend="triton")
    assert rel_err(out, layernorm_modulate_ref(x.double(), shift.double(), scale.double())) <= FP32_REL_TOL


@pytest.mark.parametrize(
    ("shift_shape", "device", "error"),
    [((2, 47), "cpu", ValueError), ((48,), "cpu", ValueError), ((2, 48), "meta", ValueError)],
)
def test_adaln_rejects_bad_modulation(shift_shape, device, error):
    x, scale = torch.randn(2, 5, 48), torch.randn(2, 48)
    shift = torch.randn(shift_shape, device=device)
    with pytest.raises(error, match="shift"):
        layernorm_modulate(x, shift, scale, backend="triton")
    with pytest.raises(error, match="shift"):
        gated_residual_layernorm_modulate(x, x, scale, shift, scale, backend="triton")


def test_adaln_rejects_bad_tokens():
    with pytest.raises(TypeError, match=r"\[B, N, D\]"):
        layernorm_modulate(torch.randn(5, 48), torch.randn(5, 48), torch.randn(5, 48), backend="triton")
    with pytest.raises(ValueError, match="y must match x"):
        gated_residual(torch.randn(2, 5, 48), torch.randn(2, 4, 48), torch.randn(2, 48), backend="triton")


# ----------------------------------------------------------------------------------------------------------------------
# Mean pooling
# ----------------------------------------------------------------------------------------------------------------------

POOL_SHAPES = [*SHAPES, (1, 600, 48)]  # the last one loops over tokens: 600 > one 512-token tile of 8 columns


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", POOL_SHAPES)
def test_mean_pool(shape, dtype, poisoned_alloc):
    torch.manual_seed(0)
    h = make(shape, dtype)
    cotangent = torch.randn(shape[0], shape[2], dtype=torch.float64)
    (k_out,), (k_grad,) = outputs_and_grads(lambda a: mean_pool(a, backend="triton"), [h], [cotangent])
    (low_out,), (low_grad,) = outputs_and_grads(mean_pool_ref, [h], [cotangent])
    (truth_out,), (truth_grad,) = outputs_and_grads(mean_pool_ref, [h.detach().double()], [cotangent])
    assert k_out.dtype == torch.float32 and k_out.shape == (shape[0], shape[2])
    assert k_grad.dtype == dtype and k_grad.shape == shape
    assert_within_rule([k_out], [low_out], [truth_out], torch.float32, "mean_pool forward")  # fp32 accumulation
    assert_within_rule([k_grad], [low_grad], [truth_grad], dtype, "mean_pool backward")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_mean_pool_into_writes_only_its_slot(backend):
    torch.manual_seed(0)
    joint = torch.randn(2, 600 + 11, 48, dtype=torch.bfloat16)
    h = joint[:, :600]  # the image tokens of [image | text]: strided along N, not copied
    out = torch.full((2, 3, 48), float("nan"))
    mean_pool_into(h, out, 1, backend=backend)
    assert out[:, 0].isnan().all() and out[:, 2].isnan().all()
    assert rel_err(out[:, 1], h.double().mean(dim=1)) <= FP32_REL_TOL


def test_mean_pool_is_deterministic():
    torch.manual_seed(0)
    h = torch.randn(1, 900, 48)
    assert torch.equal(mean_pool(h, backend="triton"), mean_pool(h, backend="triton"))


def test_mean_pool_is_one_launch_of_at_least_two_waves():
    from kernels import pooling

    # SD3.5-L's D = 2432 at 512² (1024 image tokens): >= 264 programs (2 waves of 132 SMs) at batch 1 and 8
    for batch, strip in ((1, 8), (8, 64)):
        assert pooling._strip_width(batch, 2432) == strip and batch * -(-2432 // strip) >= 264
    launches = []
    with kernel_backend.observe_launches(lambda kernel, args, kwargs: launches.append(kernel)):
        with torch.no_grad():
            out = mean_pool(torch.randn(1, 700, 40), backend="triton")
        mean_pool_into(torch.randn(2, 700, 40), torch.empty(2, 2, 40), 0, backend="triton")
    assert len(launches) == 2 and out.grad_fn is None


def test_mean_pool_into_rejects_bad_buffers():
    h = torch.randn(2, 5, 48)
    with pytest.raises(TypeError, match="float32"):
        mean_pool_into(h, torch.zeros(2, 3, 48, dtype=torch.bfloat16), 0, backend="triton")
    with pytest.raises(ValueError, match="D=48"):
        mean_pool_into(h, torch.zeros(2, 3, 47), 0, backend="triton")
    with pytest.raises(ValueError, match="slot"):
        mean_pool_into(h, torch.zeros(2, 3, 48), 3, backend="triton")
    with pytest.raises(ValueError, match="at least one token"):
        mean_pool(torch.randn(2, 0, 48), backend="triton")


# ----------------------------------------------------------------------------------------------------------------------
# Backend switch
# ----------------------------------------------------------------------------------------------------------------------


def test_resolve_explicit_and_env(monkeypatch):
    monkeypatch.delenv(kernel_backend.ENV_VAR, raising=False)
    assert kernels.resolve("torch") == "torch"
    assert kernels.resolve("triton", "cpu") == "triton"  # TRITON_INTERPRET=1 here
    assert kernels.resolve("auto", "cuda") == "triton"
    assert kernels.resolve(None, "cuda") == "triton"
    monkeypatch.setenv(kernel_backend.ENV_VAR, "torch")
    assert kernels.resolve(None, "cuda") == "torch"
    assert kernels.resolve("triton", "cuda") == "triton"  # the argument wins over the environment


def test_resolve_rejects_unknown_backend(monkeypatch):
    with pytest.raises(ValueError, match="'auto', 'triton', 'torch'"):
        kernels.resolve("cuda")
    monkeypatch.setenv(kernel_backend.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="fast"):
        kernels.resolve(None, "cpu")


def test_auto_on_cpu_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(kernel_backend, "_warned_fallback", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kernels.resolve("auto", "cpu") == "torch"
        assert kernels.resolve("auto", "cpu") == "torch"
        mean_pool(torch.randn(1, 3, 8), backend="auto")
    assert len([w for w in caught if "torch reference" in str(w.message)]) == 1


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.resolve("triton", "cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        mean_pool(torch.randn(1, 3, 8), backend="triton")


def test_missing_triton(monkeypatch):
    monkeypatch.setattr(kernel_backend, "triton_available", lambda: False)
    monkeypatch.setattr(kernel_backend, "_warned_fallback", True)
    with pytest.raises(RuntimeError, match="pip install triton"):
        kernels.resolve("triton", "cuda")
    assert kernels.resolve("auto", "cuda") == "torch"


def test_import_without_triton():
    code = (
        "import sys, torch; sys.modules['triton'] = None\n"
        "import kernels\n"
        "assert kernels.resolve('auto', 'cpu') == 'torch'\n"
        "z = kernels.near_clean(torch.randn(2, 4, 3, 3), 0.1, seed=0)\n"
        "assert 'triton' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
