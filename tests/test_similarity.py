"""Linear CKA against its definition and its invariances."""

from __future__ import annotations

import json

import pytest
import torch

from training.similarity import cka_matrix, linear_cka, most_redundant, write_similarity


def _cka_by_definition(x: torch.Tensor, y: torch.Tensor) -> float:
    """HSIC form with the centring matrix H: tr(K H L H) / sqrt(tr(K H K H) tr(L H L H)), K = x x^T, L = y y^T."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l_ = x.double() @ x.double().T, y.double() @ y.double().T
    hsic = lambda a, b: torch.trace(a @ h @ b @ h)
    return float(hsic(k, l_) / torch.sqrt(hsic(k, k) * hsic(l_, l_)))


def test_linear_cka_matches_the_hsic_definition():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(13, 7, generator=g), torch.randn(13, 5, generator=g)
    y = y + x[:, :5]  # partly shared
    assert linear_cka(x, y) == pytest.approx(_cka_by_definition(x, y), rel=1e-10)


def test_linear_cka_invariances():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 6, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 3.5 * x @ q + 2.0) == pytest.approx(1.0, abs=1e-12)  # rotation, scale, shift
    unrelated = torch.randn(20, 6, generator=g, dtype=torch.float64)
    assert linear_cka(x, unrelated) < 0.7


def test_cka_matrix_equals_pairwise_cka():
    g = torch.Generator().manual_seed(2)
    f = torch.randn(11, 4, 9, generator=g)
    f[:, 3] = 2 * f[:, 1]  # block 3 duplicates block 1
    m = cka_matrix(f)
    for i in range(4):
        for j in range(4):
            assert float(m[i, j]) == pytest.approx(linear_cka(f[:, i], f[:, j]), rel=1e-10)
    assert most_redundant(m, [5, 6, 7, 8], top=1)[0][:2] == (6, 8)


def test_cka_errors_name_the_shape():
    with pytest.raises(ValueError, match="same n"):
        linear_cka(torch.ones(3, 2), torch.ones(4, 2))
    with pytest.raises(ValueError, match="constant"):
        cka_matrix(torch.ones(5, 2, 3))
    with pytest.raises(ValueError, match=r"\[n_images, n_layers, D\]"):
        cka_matrix(torch.ones(5, 3))


def test_write_similarity(tmp_path):
    g = torch.Generator().manual_seed(3)
    m = {0.1: cka_matrix(torch.randn(8, 3, 4, generator=g)), 0.3: cka_matrix(torch.randn(8, 3, 4, generator=g))}
    payload = write_similarity(tmp_path, m, [0, 1, 2], top=2)
    stored = json.loads((tmp_path / "similarity.json").read_text())
    assert stored == payload and set(stored["by_t"]) == {"0.1", "0.3"}
    assert len(stored["by_t"]["0.1"]["most_redundant"]) == 2
    assert (tmp_path / "similarity.png").stat().st_size > 0
