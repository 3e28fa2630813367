"""Joint qk-norm/concat and rowwise FP8 quantisation: Triton (interpreted on CPU) vs the torch references."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from kernels.qknorm import joint_qkv, joint_qkv_ref
from kernels.quant import quantize_rowwise, quantize_rowwise_ref


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


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
        assert rel(f, e) <= 2 * rel(lo, e) + (1e-6 if dtype == torch.float32 else 1e-3)


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
    err_fast = rel(q.double() * scale.double(), target)
    err_ref = rel(q_ref.double() * scale_ref.double(), target)
    assert err_fast <= 2 * err_ref + 1e-6 and err_ref < 0.05  # e4m3: 3 mantissa bits
    assert (q.float()[0, :3] == 0).all()


def test_quantize_rowwise_rejects_bad_input():
    with pytest.raises(TypeError, match=r"floating-point \[M, K\]"):
        quantize_rowwise(torch.ones(2, 3, 4))
    with pytest.raises(TypeError, match=r"floating-point \[M, K\]"):
        quantize_rowwise(torch.ones(2, 3, dtype=torch.int32))


def test_joint_qkv_rejects_bad_shapes():
    with pytest.raises(ValueError, match="img_qkv must be"):
        joint_qkv(torch.randn(1, 4, 50), None, 3, None)
    with pytest.raises(ValueError, match="txt_qkv must be"):
        joint_qkv(torch.randn(1, 4, 48), torch.randn(1, 2, 20), 1, None)
