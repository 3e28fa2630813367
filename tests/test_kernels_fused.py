"""Joint qk-norm/concat, rowwise FP8 quantisation and the FP8-output adaLN ops: Triton (interpreted on CPU) vs the
torch references."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from conftest import assert_e4m3_agreement, rel_err

from kernels.adaln import (
    gated_residual_layernorm_modulate,
    gated_residual_layernorm_modulate_fp8,
    gated_residual_layernorm_modulate_fp8_ref,
    layernorm_modulate_fp8,
    layernorm_modulate_fp8_ref,
)
from kernels.qknorm import joint_qkv, joint_qkv_ref
from kernels.quant import quantize_rowwise, quantize_rowwise_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("text", ["qkv", "kv", "none"])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("batch, n_img, n_txt, heads", [(1, 37, 5, 3), (3, 4, 1, 1), (2, 9, 13, 5)])
def test_joint_qkv_matches_reference(dtype, text, norm, batch, n_img, n_txt, heads):
    head_dim = 16
    dim = heads * head_dim
    g = torch.Generator().manual_seed(batch * 100 + n_img)
    img = torch.randn(batch, n_img, 3 * dim, generator=g).to(dtype)
    txt = {
        "qkv": torch.randn(batch, n_txt, 3 * dim, generator=g),
        "kv": torch.randn(batch, n_txt, 2 * dim, generator=g),
        "none": None,
    }[text]
    txt = None if txt is None else txt.to(dtype)
    norms = None
    if norm:
        norms = tuple((1 + 0.3 * torch.randn(head_dim, generator=g)).to(dtype) for _ in range(4))
        if text != "qkv":
            norms = (norms[0], norms[1], None, norms[3])
    with torch.no_grad():
        fast = joint_qkv(img, txt, heads, norms, backend="triton")
        exact = joint_qkv_ref(
            *(None if t is None else t.double() for t in (img, txt)),
            heads,
            None if norms is None else tuple(None if w is None else w.double() for w in norms),
        )
        low = joint_qkv_ref(img, txt, heads, norms)
    n_q = n_img + (n_txt if text == "qkv" else 0)
    n_k = n_img + (0 if text == "none" else n_txt)
    assert [t.shape for t in fast] == [(batch, n_q, heads, head_dim), (batch, n_k, heads, head_dim)] * 1 + [
        (batch, n_k, heads, head_dim)
    ]
    for f, e, lo in zip(fast, exact, low, strict=True):
        assert f.dtype == dtype and torch.isfinite(f).all()
        assert rel_err(f, e) <= 2 * rel_err(lo, e) + (1e-6 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, cols", [(7, 48), (1, 100), (5, 257), (3, 4097)])  # 4097: three 2048-wide chunks
def test_quantize_rowwise_matches_reference(gelu, dtype, rows, cols):
    g = torch.Generator().manual_seed(rows * cols)
    x = (torch.randn(rows, cols, generator=g) * torch.logspace(-2, 2, rows)[:, None]).to(dtype)
    x[0, :3] = 0.0  # exact zeros stay zero
    q, scale = quantize_rowwise(x, gelu=gelu, backend="triton")
    q_ref, scale_ref = quantize_rowwise_ref(x, gelu=gelu)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (rows, 1)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    if not gelu:  # same fp32 math, explicit RNE onto the e4m3 grid: identical bits
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    target = torch.nn.functional.gelu(x.double(), approximate="tanh") if gelu else x.double()
    err_fast = rel_err(q.double() * scale.double(), target)
    err_ref = rel_err(q_ref.double() * scale_ref.double(), target)
    assert err_fast <= 2 * err_ref + 1e-6 and err_ref < 0.05  # e4m3: 3 mantissa bits
    assert (q.float()[0, :3] == 0).all()


@pytest.mark.parametrize("batch, n_img, n_txt, cols", [(1, 5, 3, 48), (3, 7, 2, 100), (2, 1, 4, 257)])
def test_quantize_rowwise_reads_a_strided_row_slice_in_place(batch, n_img, n_txt, cols):
    """The image rows of a joint [B, N_img + N_txt, K] attention output, quantised without copying them out first."""
    g = torch.Generator().manual_seed(cols)
    joint = torch.randn(batch, n_img + n_txt, cols, generator=g).to(torch.bfloat16)
    rows = joint[:, :n_img]
    assert batch == 1 or not rows.is_contiguous()
    q, scale = quantize_rowwise(rows, backend="triton")
    q_ref, scale_ref = quantize_rowwise_ref(rows.reshape(-1, cols))
    assert q.shape == (batch * n_img, cols) and scale.shape == (batch * n_img, 1)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def test_quantize_rowwise_rejects_bad_input():
    with pytest.raises(TypeError, match=r"floating-point \[M, K\] or \[B, M, K\]"):
        quantize_rowwise(torch.ones(2, 3, 4, 5))
    with pytest.raises(TypeError, match=r"floating-point \[M, K\]"):
        quantize_rowwise(torch.ones(2, 3, dtype=torch.int32))


ADALN_FP8_SHAPES = [(1, 1, 48), (2, 7, 100), (3, 5, 257), (1, 3, 2048)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ADALN_FP8_SHAPES)
@pytest.mark.parametrize("residual", [False, True])
def test_adaln_fp8_output_matches_reference(shape, dtype, residual):
    batch, tokens, dim = shape
    g = torch.Generator().manual_seed(batch * tokens * dim + residual)
    x, y = ((torch.randn(shape, generator=g) * 3).to(dtype) for _ in range(2))
    gate, shift, scale = (torch.randn(batch, dim, generator=g).to(dtype) for _ in range(3))
    if residual:
        x_new, q, s = gated_residual_layernorm_modulate_fp8(x, y, gate, shift, scale, backend="triton")
        x_new_ref, q_ref, s_ref = gated_residual_layernorm_modulate_fp8_ref(x, y, gate, shift, scale)
        # the residual stream is exactly what the bf16 op writes
        assert torch.equal(x_new, gated_residual_layernorm_modulate(x, y, gate, shift, scale, backend="triton")[0])
        torch.testing.assert_close(x_new, x_new_ref)  # to 1 ulp: the CPU interpreter's bf16 cast is not RNE
        x_truth = x.double() + gate.double()[:, None] * y.double()
    else:
        q, s = layernorm_modulate_fp8(x, shift, scale, backend="triton")
        q_ref, s_ref = layernorm_modulate_fp8_ref(x, shift, scale)
        x_truth = x.double()
    assert q.dtype == torch.float8_e4m3fn and q.shape == (batch * tokens, dim) and s.shape == (batch * tokens, 1)
    assert_e4m3_agreement(q, s, q_ref, s_ref)
    # STYLE.md rule against the fp64 truth: the fused op's error at most twice its reference's
    truth = (
        torch.nn.functional.layer_norm(x_truth, (dim,), eps=1e-6) * (1 + scale.double()[:, None])
    ) + shift.double()[:, None]
    truth = truth.reshape(-1, dim)
    err_fast, err_ref = rel_err(q.double() * s.double(), truth), rel_err(q_ref.double() * s_ref.double(), truth)
    assert err_fast <= 2 * err_ref + 1e-6 and err_ref < 0.05


def test_adaln_fp8_refuses_autograd():
    x = torch.randn(1, 3, 16, requires_grad=True)
    shift, scale = torch.zeros(1, 16), torch.zeros(1, 16)
    with pytest.raises(ValueError, match="FP8 output has no gradient.*x require grad"):
        layernorm_modulate_fp8(x, shift, scale, backend="triton")
    with torch.no_grad():
        layernorm_modulate_fp8(x, shift, scale, backend="triton")


def test_joint_qkv_rejects_bad_shapes():
    with pytest.raises(ValueError, match="img_qkv must be"):
        joint_qkv(torch.randn(1, 4, 50), None, 3, None)
    with pytest.raises(ValueError, match="txt_qkv must be"):
        joint_qkv(torch.randn(1, 4, 48), torch.randn(1, 2, 20), 1, None)


def test_joint_qkv_with_a_head_size_that_is_not_a_power_of_two():
    """The kernel's head axis is one power-of-two block; other head sizes take the reference path."""
    g = torch.Generator().manual_seed(5)
    img, txt = torch.randn(2, 5, 3 * 2 * 24, generator=g), torch.randn(2, 3, 3 * 2 * 24, generator=g)
    norms = tuple(1 + 0.1 * torch.randn(24, generator=g) for _ in range(4))
    with torch.no_grad():
        fast = joint_qkv(img, txt, 2, norms, backend="triton")
    for a, b in zip(fast, joint_qkv_ref(img, txt, 2, norms), strict=True):
        torch.testing.assert_close(a, b)


def test_quantize_rowwise_refuses_empty_rows():
    with pytest.raises(ValueError, match="at least one element"):
        quantize_rowwise(torch.ones(3, 0), backend="triton")


@pytest.mark.parametrize("offset", [0.0, 300.0])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 96), (1, 5, 64), (3, 2, 224)])
def test_adaln_one_pass_welford_statistics_match_the_reference(monkeypatch, shape, residual, offset):
    # the GPU computes mean and variance in one reduction (Welford/Chan merges, WELFORD=True), the interpreter by
    # default two sums: run the GPU's path in the interpreter. Rows of std 1 around `offset`: at 0, STYLE.md's rule
    # against torch in fp32; at 300, an error of a few fp32 roundings of the mean (4 * 2^-24 * 300 relative to the
    # std), where the naive one-pass E[x^2] - E[x]^2 would lose 2^-24 * 300^2 of the variance: ~100x more
    import kernels.adaln as adaln

    monkeypatch.setattr(adaln, "interpreting", lambda: False)  # (the kernel itself still runs interpreted)
    torch.manual_seed(0)
    x, y = offset + torch.randn(shape), torch.randn(shape)
    gate, shift, scale = (torch.randn(shape[0], shape[2]) for _ in range(3))
    inputs = (x, y, gate, shift, scale) if residual else (x, shift, scale)
    op = gated_residual_layernorm_modulate if residual else adaln.layernorm_modulate
    ref = adaln.gated_residual_layernorm_modulate_ref if residual else adaln.layernorm_modulate_ref
    got = op(*inputs, backend="triton")
    low = ref(*inputs, upcast=True)  # torch in fp32 (two-pass LayerNorm)
    truth = ref(*(t.double() for t in inputs), upcast=True)
    got, low, truth = ((v,) if isinstance(v, torch.Tensor) else v for v in (got, low, truth))
    for g, lo, w in zip(got, low, truth, strict=True):
        bound = 2 * rel_err(lo, w) + 1e-6 if offset == 0 else 4 * 2**-24 * offset
        assert rel_err(g, w) <= bound
