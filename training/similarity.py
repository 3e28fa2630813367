"""Layer similarity (paper Fig. 4a/b, Appendix B): linear CKA between the pooled features of every pair of blocks.

Linear CKA (Kornblith et al., 2019) of two feature matrices over the same n images, X [n, d1] and Y [n, d2]:

    CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F),   Xc, Yc centred over the n images

1 for representations equal up to rotation and isotropic scale, near 0 for unrelated ones. Two blocks with CKA near 1
carry the same information: pooling both adds width to the head, not signal — which is what a user needs to pick
`layers` for a new backbone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """x [n, d1], y [n, d2] (rows: the same n images) -> linear CKA in [0, 1], computed in float64."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"expected x [n, d1] and y [n, d2] over the same n, got {list(x.shape)} and {list(y.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"CKA needs at least 2 images, got {x.shape[0]}")
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    # The n x n Gram form is cheaper when n < d (a few hundred images, D = 2432 features).
    kx, ky = x @ x.T, y @ y.T
    cross = (kx * ky).sum()  # = ||y^T x||_F^2
    norm = kx.norm() * ky.norm()
    if norm == 0:
        raise ValueError("CKA is undefined for a constant feature matrix (zero variance over the images)")
    return float(cross / norm)


def cka_matrix(features: torch.Tensor) -> torch.Tensor:
    """features [n, L, D] (one row per image, L pooled blocks) -> [L, L] float64 CKA matrix (symmetric, ones on
    the diagonal). Each block's Gram matrix is computed once."""
    if features.ndim != 3:
        raise ValueError(f"features must be [n_images, n_layers, D], got {list(features.shape)}")
    n, n_layers, _ = features.shape
    if n < 2:
        raise ValueError(f"CKA needs at least 2 images, got {n}")
    centred = features.double() - features.double().mean(0)
    grams = torch.einsum("ild,jld->lij", centred, centred)  # [L, n, n]
    flat = grams.reshape(n_layers, -1)
    norms = flat.norm(dim=1)
    if bool((norms == 0).any()):
        raise ValueError("CKA is undefined for a block whose features are constant over the images")
    return (flat @ flat.T) / (norms[:, None] * norms[None, :])


def most_redundant(matrix: torch.Tensor, layers: Sequence[int], top: int = 5) -> list[tuple[int, int, float]]:
    """The `top` (>= 1) off-diagonal block pairs with the highest CKA, as (layer_a, layer_b, cka), highest first."""
    if top < 1:  # a negative count would slice from the end: "all but the last 3"
        raise ValueError(f"top: got {top}, expected a count >= 1")
    n = matrix.shape[0]
    pairs = [(layers[i], layers[j], float(matrix[i, j])) for i in range(n) for j in range(i + 1, n)]
    return sorted(pairs, key=lambda p: -p[2])[:top]


def write_similarity(
    out_dir: str | Path, matrices: dict[float, torch.Tensor], layers: Sequence[int], top: int = 5
) -> dict[str, Any]:
    """Write similarity.json (one CKA matrix per t, and the most redundant pairs) and similarity.png (one heatmap
    per t) under `out_dir`; returns the JSON payload."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "layers": list(layers),
        "by_t": {
            f"{t:g}": {"cka": m.tolist(), "most_redundant": [list(p) for p in most_redundant(m, layers, top)]}
            for t, m in matrices.items()
        },
    }
    (out / "similarity.json").write_text(json.dumps(payload, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the JSON is the result; the picture is optional
        return payload
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.2 * len(matrices), 3.8), squeeze=False)
    for ax, (t, m) in zip(axes[0], matrices.items(), strict=True):
        image = ax.imshow(m.numpy(), vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"linear CKA, t = {t:g}")
        ticks = range(0, len(layers), max(1, len(layers) // 8))
        ax.set_xticks(list(ticks), [str(layers[i]) for i in ticks])
        ax.set_yticks(list(ticks), [str(layers[i]) for i in ticks])
        ax.set_xlabel("block")
        ax.set_ylabel("block")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(out / "similarity.png", dpi=120)
    plt.close(fig)
    return payload


__all__ = ["cka_matrix", "linear_cka", "most_redundant", "write_similarity"]
