"""Compiled Triton kernels on CUDA at the real model's sizes (SD3.5-Large D = 2432). Skipped without a GPU.

Run as ``TRITON_INTERPRET=0 pytest tests/test_kernels_gpu.py``: tests/conftest.py and the CPU kernel tests default
TRITON_INTERPRET to 1 (the CPU interpreter), and under the interpreter these are skipped.
"""

import math

import pytest
import torch
from conftest import assert_e4m3_agreement, check_against_reference, rel_err

from kernels import backend as kernel_backend
from kernels.adaln import (
    gated_residual,
    gated_residual_layernorm_modulate,
    gated_residual_layernorm_modulate_fp8,
    gated_residual_layernorm_modulate_fp8_ref,
    gated_residual_layernorm_modulate_ref,
    gated_residual_ref,
    layernorm_modulate,
    layernorm_modulate_fp8,
    layernorm_modulate_fp8_ref,
    layernorm_modulate_ref,
)
from kernels.noise import near_clean, noise_ref
from kernels.pooling import mean_pool, mean_pool_into, mean_pool_ref
from kernels.quant import quantize_rowwise, quantize_rowwise_ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(kernel_backend.interpreting(), reason="TRITON_INTERPRET=1: run with TRITON_INTERPRET=0"),
]

D = 2432


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["layernorm_modulate", "gated_residual_layernorm_modulate", "gated_residual"])
def test_adaln_cuda(op, dtype):
    torch.manual_seed(0)
    b, n = 2, 1031

    def make(*shape):
        return torch.randn(*shape, device="cuda").to(dtype)

    if op == "layernorm_modulate":
        check_against_reference(
            layernorm_modulate, layernorm_modulate_ref, [make(b, n, D), make(b, D), make(b, D)], 1, dtype, op
        )
    elif op == "gated_residual":
        check_against_reference(
            gated_residual, gated_residual_ref, [make(b, n, D), make(b, n, D), make(b, D)], 1, dtype, op
        )
    else:
        inputs = [make(b, n, D), make(b, n, D), make(b, D), make(b, D), make(b, D)]
        check_against_reference(
            gated_residual_layernorm_modulate, gated_residual_layernorm_modulate_ref, inputs, 2, dtype, op
        )


@pytest.mark.parametrize("shape", [(2, 4096, D), (1, 16384, D), (8, 1024, 1536), (3, 37, 48)])
def test_mean_pool_cuda(shape):
    torch.manual_seed(0)
    joint = torch.randn(shape[0], shape[1] + 333, shape[2], device="cuda", dtype=torch.bfloat16)
    h = joint[:, : shape[1]]
    truth = mean_pool_ref(h.double())
    assert rel_err(mean_pool(h, backend="triton"), truth) <= 1e-5
    out = torch.full((shape[0], 4, shape[2]), float("nan"), device="cuda")
    mean_pool_into(h, out, 2, backend="triton")
    assert out[:, :2].isnan().all() and out[:, 3].isnan().all()
    assert rel_err(out[:, 2], truth) <= 1e-5


def test_near_clean_cuda():
    torch.manual_seed(0)
    z0 = torch.randn(4, 16, 128, 128, device="cuda", dtype=torch.bfloat16)
    noise = torch.randn_like(z0)
    truth = 0.9 * z0.double() + 0.1 * noise.double()
    assert rel_err(near_clean(z0, 0.1, noise=noise, backend="triton"), truth) <= 2 * rel_err(
        0.9 * z0 + 0.1 * noise, truth
    )
    z0 = z0.float()
    eps = (near_clean(z0, 0.5, seed=99, backend="triton").double() - 0.5 * z0.double()) / 0.5
    n = eps.numel()
    assert abs(eps.mean().item()) < 5 / math.sqrt(n) and abs(eps.std().item() - 1) < 5 / math.sqrt(2 * n)
    assert (eps - noise_ref(z0.shape, 99, device="cuda").double()).abs().max() < 1e-4
    alone = near_clean(z0[3:], 0.5, seed=99, image_offset=3, backend="triton")
    assert torch.equal(alone, near_clean(z0, 0.5, seed=99, backend="triton")[3:])


def test_near_clean_per_image_t_cuda_and_in_a_cuda_graph():
    # t as a float32 [B] tensor: against the fp64 formula, and captured in a CUDA graph (no host sync while capturing),
    # replayed with new values written into the same t buffer
    torch.manual_seed(0)
    z0 = torch.randn(3, 16, 65, 67, device="cuda", dtype=torch.bfloat16)
    noise = torch.randn_like(z0)
    t = torch.tensor([0.05, 0.5, 0.9], device="cuda")
    t64 = t.double()[:, None, None, None]
    truth = (1 - t64) * z0.double() + t64 * noise.double()
    low = ((1 - t[:, None, None, None]) * z0 + t[:, None, None, None] * noise).to(torch.bfloat16)
    assert rel_err(near_clean(z0, t, noise=noise, backend="triton"), truth) <= 2 * rel_err(low, truth) + 1e-6
    near_clean(z0, t, seed=5, backend="triton")  # compiled before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = near_clean(z0, t, seed=5, backend="triton")
    t.copy_(torch.tensor([0.2, 0.3, 0.4], device="cuda"))
    graph.replay()
    assert torch.equal(out, near_clean(z0, t, seed=5, backend="triton"))


@pytest.mark.parametrize("gelu", [False, True])
def test_quantize_rowwise_cuda(gelu):
    """The compiled kernel (hardware e4m3 rounding) on the image rows of a joint tensor, read in place."""
    torch.manual_seed(0)
    width = 4 * D if gelu else D
    joint = torch.randn(3, 1357, width, device="cuda", dtype=torch.bfloat16) * 4
    rows = joint[:, :1024]
    q, scale = quantize_rowwise(rows, gelu=gelu, backend="triton")
    q_ref, scale_ref = quantize_rowwise_ref(rows.reshape(-1, width), gelu=gelu)
    if not gelu:  # the same fp32 values: the same codes but for rare boundary cases
        assert_e4m3_agreement(q, scale, q_ref, scale_ref)
    # GELU: the kernel's tanh is the SFU's tanh.approx (relative error <= 2^-11, far below e4m3's 2^-4 step) and
    # torch's is exact-ish, so the codes may differ at rounding boundaries: judge both against the fp64 truth
    # (STYLE.md: at most twice the reference's error)
    x = rows.reshape(-1, width).double()
    truth = torch.nn.functional.gelu(x, approximate="tanh") if gelu else x
    assert rel_err(q.double() * scale, truth) <= 2 * rel_err(q_ref.double() * scale_ref, truth) + 1e-6


@pytest.mark.parametrize("residual", [False, True])
def test_adaln_fp8_cuda(residual):
    torch.manual_seed(0)
    b, n = 2, 1031
    x, y = (torch.randn(b, n, D, device="cuda", dtype=torch.bfloat16) * 3 for _ in range(2))
    gate, shift, scale = (torch.randn(b, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    if residual:
        x_new, q, s = gated_residual_layernorm_modulate_fp8(x, y, gate, shift, scale, backend="triton")
        x_new_ref, q_ref, s_ref = gated_residual_layernorm_modulate_fp8_ref(x, y, gate, shift, scale)
        assert torch.equal(x_new, gated_residual_layernorm_modulate(x, y, gate, shift, scale, backend="triton")[0])
        assert rel_err(x_new, x_new_ref) <= 1e-5 + 2 * rel_err(x_new_ref, x.double() + gate.double()[:, None] * y)
    else:
        q, s = layernorm_modulate_fp8(x, shift, scale, backend="triton")
        q_ref, s_ref = layernorm_modulate_fp8_ref(x, shift, scale)
    assert_e4m3_agreement(q, s, q_ref, s_ref)
