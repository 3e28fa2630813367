"""Which blocks carry preference signal? Linear Bradley-Terry probes on the frozen backbone's pooled features.

    python -m training.probe --cache DIR --train-json T.json --val-json V.json --base SD35_DIR --out probe/ \
        [--t 0.1 0.3 0.5] [--similarity]

One forward per image and t gives the pooled features of EVERY block (the engine built with layers = all blocks;
images of several sizes run one forward per latent shape). A probe is a linear reward r(x) = w . f(x) on standardised
features, fitted with the BT loss of Eq. 6 (plus a small L2) by full-batch L-BFGS: per block at every t, and per pair
of contiguous block groups (a group alone on the diagonal) at the first t. Prints the accuracy-by-block table and
writes probe.json and probe.png. With ``--similarity``, the same features (every training and validation image) give
the linear CKA between every pair of blocks at each t (`training.similarity`, paper Fig. 4a/b): similarity.json,
similarity.png and the most redundant block pairs, printed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from engine.api import RewardEngine
from engine.io.backbone import base_source
from engine.schema import Seed, parse_cli, validate
from training.cache import LatentCache
from training.data import HPSV3_CONFIDENCE, PathRule, load_pairs
from training.evaluation import accuracy, pair_rewards
from training.model import TrainableReward
from training.similarity import cka_matrix, most_redundant, write_similarity


def all_block_features(
    engine: RewardEngine, cache: LatentCache, pairs: list, seed: int, batch_size: int = 64, t: float | None = None
) -> torch.Tensor:
    """Pooled features of every pooled block at noise level `t` (default: the engine's): [n_pairs, 2 (winner, loser),
    n_layers, D] float32 on the CPU. One engine serves every t: the backbone's forward takes t as an argument."""
    model = TrainableReward(engine)  # the engine's own weights and forward, with t as a setting
    model.t = engine.reward_config.t if t is None else t

    def features(z0: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return model.features(z0.to(engine.dtype), embeds, pooled, noise=noise.to(engine.dtype)).flatten(1)

    f = pair_rewards(features, pairs, cache, batch_size, seed, engine.device)  # [n, 2, L * D]
    return f.view(len(pairs), 2, len(engine.reward_config.layers), -1)


def fit_probe(train: torch.Tensor, val: torch.Tensor, l2: float = 1e-3, iterations: int = 100) -> float:
    """train/val features [n, 2, F] -> held-out accuracy of a linear BT probe (ties count as wrong)."""
    mean, std = train.flatten(0, 1).mean(0), train.flatten(0, 1).std(0).clamp_min(1e-6)
    diff = lambda f: ((f[:, 0] - mean) / std) - ((f[:, 1] - mean) / std)  # r_w - r_l = w . diff
    x, x_val = diff(train).double(), diff(val).double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = -F.logsigmoid(x @ w).mean() + l2 * w.square().sum()  # Eq. 6 + L2
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        scores = x_val @ w
    return accuracy(torch.stack([scores, torch.zeros_like(scores)], dim=1))


def contiguous_groups(n_layers: int, group_size: int) -> list[tuple[int, ...]]:
    """Blocks 0..n_layers-1 in runs of `group_size` (>= 1, `ProbeInputs`' rule; the last run may be shorter)."""
    return [tuple(range(i, min(i + group_size, n_layers))) for i in range(0, n_layers, group_size)]


Name = Annotated[str, Field(min_length=1)]
PROG = "python -m training.probe"


class ProbeInputs(PathRule):
    """`run_probe`'s arguments (and `PathRule`'s: the image path rule), checked before the feature pass."""

    cache: Name = Field(description="training.cache directory holding both splits")
    train_json: Annotated[list[Name], Field(min_length=1)] = Field(description="HPSv3-format training files")
    val_json: Annotated[list[Name], Field(min_length=1)] = Field(description="HPSv3-format held-out files")
    base: Name = Field(description="SD3/SD3.5 diffusers directory or single file")
    t: Annotated[list[Annotated[float, Field(gt=0.0, lt=1.0)]], Field(min_length=1)] = Field(
        default_factory=lambda: [0.1], description="noise level(s) of Eq. 1"
    )
    group_size: int = Field(4, ge=1, le=1024, description="blocks per contiguous group")
    seed: Seed = Field(0, description="training features' noise")
    eval_seed: Seed = Field(1234, description="held-out features' noise")
    device: Name | None = Field(None, description="default: cuda if available, else cpu")
    confidence_threshold: float | None = Field(
        HPSV3_CONFIDENCE, ge=0.0, le=1.0, description="drop training pairs below this confidence; null keeps all"
    )


class ProbeFlags(ProbeInputs):
    """The command line: `ProbeInputs` plus where the results go and what is printed."""

    out: Name = Field("probe", description="folder for probe.json and probe.png")
    similarity: bool = Field(False, description="also the linear CKA between every pair of blocks at each t")
    top: int = Field(5, ge=1, le=10_000, description="most redundant block pairs to print per t")
    dtype: Literal["fp32", "bf16"] = Field("fp32", description="backbone dtype")


def run_probe(
    cache_dir: str | Path,
    train_json: Sequence[str],
    val_json: Sequence[str],
    base: str | Path,
    t: float | Sequence[float] = 0.1,
    group_size: int = 4,
    seed: int = 0,
    eval_seed: int = 1234,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    confidence_threshold: float | None = HPSV3_CONFIDENCE,
    image_root: str | Path | None = None,
    allow_outside_root: bool = False,
    similarity: bool = False,
) -> dict[str, Any]:
    """Per-block probe accuracies on the validation pairs at each t in `t`, group-pair accuracies at the first, and with
    `similarity` the [L, L] linear CKA matrix of every t (over all training and validation images). `image_root` /
    `allow_outside_root`: the path rule of `training.data`. Arguments as `ProbeInputs`, refused before any work."""
    args = {
        "cache": cache_dir, "train_json": list(train_json), "val_json": list(val_json), "base": base,
        "t": [t] if isinstance(t, (int, float)) else list(t), "group_size": group_size, "seed": seed,
        "eval_seed": eval_seed, "device": device, "confidence_threshold": confidence_threshold,
        "image_root": image_root, "allow_outside_root": allow_outside_root,
    }  # fmt: skip
    inputs = validate(ProbeInputs, args, "run_probe")
    cache_dir, ts, device = inputs.cache, inputs.t, inputs.device or ("cuda" if torch.cuda.is_available() else "cpu")
    caches: list[LatentCache] = []

    def image_check(path: Path) -> tuple[str, str] | None:  # bad images as the cache recorded them: no decoding
        if not caches:
            caches.append(LatentCache(cache_dir))
        return caches[0].image_problem(path)

    roots = {
        "image_root": inputs.image_root,
        "allow_outside_root": inputs.allow_outside_root,
        "image_check": image_check,
    }
    train_pairs, _ = load_pairs(inputs.train_json, inputs.confidence_threshold, **roots)  # before the model loads
    val_pairs, _ = load_pairs(inputs.val_json, None, **roots)
    cfg, _ = base_source(inputs.base)
    engine = RewardEngine.from_base(
        inputs.base, layers=tuple(range(cfg.num_layers)), t=ts[0], dtype=dtype, device=device
    )
    cache = caches[0] if caches else LatentCache(cache_dir)  # opened by image_check unless no image was checked
    cache.check(train_pairs + val_pairs)
    groups = contiguous_groups(cfg.num_layers, inputs.group_size)
    result: dict[str, Any] = {"t": ts[0], "per_layer_by_t": {}, "groups": [list(g) for g in groups]}
    cka: dict[float, torch.Tensor] = {}
    for k, t_value in enumerate(ts):
        train_f = all_block_features(engine, cache, train_pairs, inputs.seed, t=t_value)
        val_f = all_block_features(engine, cache, val_pairs, inputs.eval_seed, t=t_value)
        per_layer = [fit_probe(train_f[:, :, i], val_f[:, :, i]) for i in range(cfg.num_layers)]
        result["per_layer_by_t"][f"{t_value:g}"] = per_layer
        if k == 0:
            pick = lambda f, a, b: f[:, :, sorted(set(a) | set(b))].flatten(2)
            result["per_layer"] = per_layer
            result["group_pairs"] = [
                [fit_probe(pick(train_f, a, b), pick(val_f, a, b)) if j >= i else None for j, b in enumerate(groups)]
                for i, a in enumerate(groups)
            ]
        if similarity:
            cka[t_value] = cka_matrix(torch.cat([train_f.flatten(0, 1), val_f.flatten(0, 1)]))  # [n_images, L, D]
    if similarity:
        result["similarity"] = {f"{t_value:g}": m for t_value, m in cka.items()}
    return {**result, "train_pairs": len(train_pairs), "val_pairs": len(val_pairs)}


def format_table(result: dict[str, Any]) -> str:
    by_t = result["per_layer_by_t"]
    lines = ["block  " + " ".join(f"{'val acc t=' + t:>12}" for t in by_t)]
    lines += [
        f"{i:>5}  " + " ".join(f"{100 * a[i]:11.2f}%" for a in by_t.values())
        for i in range(len(by_t[next(iter(by_t))]))
    ]
    names = [f"{g[0]}-{g[-1]}" for g in result["groups"]]
    lines += ["", "group pairs (row ∪ column):", "       " + " ".join(f"{n:>7}" for n in names)]
    for name, row in zip(names, result["group_pairs"], strict=True):
        lines.append(f"{name:>7}" + " ".join("       " if a is None else f"{100 * a:6.1f}%" for a in row))
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training machines
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(range(len(result["per_layer"])), [100 * a for a in result["per_layer"]], marker="o")
    left.axhline(50, color="grey", linestyle=":")
    left.set(xlabel="MMDiT block", ylabel="held-out pairwise accuracy (%)", title="linear BT probe per block")
    names = [f"{g[0]}-{g[-1]}" for g in result["groups"]]
    grid = [[float("nan") if a is None else 100 * a for a in row] for row in result["group_pairs"]]
    image = right.imshow(grid, cmap="viridis")
    right.set(
        xticks=range(len(names)),
        yticks=range(len(names)),
        xticklabels=names,
        yticklabels=names,
        title="probe on two block groups (%)",
    )
    fig.colorbar(image, ax=right)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    args = parse_cli(ProbeFlags, argv, PROG, __doc__.split("\n\n")[0])
    inputs = {name: getattr(args, name) for name in ProbeInputs.model_fields}
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    inputs["cache_dir"] = inputs.pop("cache")
    result = run_probe(**inputs, dtype=dtype, similarity=args.similarity)
    print(format_table(result))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    matrices = result.pop("similarity", None)
    (out / "probe.json").write_text(json.dumps(result, indent=2))
    print(f"plot: {plot(result, out / 'probe.png')}")
    if matrices is not None:
        layers = list(range(len(result["per_layer"])))
        write_similarity(out, {float(t): m for t, m in matrices.items()}, layers, args.top)
        for t, m in matrices.items():
            pairs = ", ".join(f"{a}-{b} {c:.3f}" for a, b, c in most_redundant(m, layers, args.top))
            print(f"t={t}: most redundant block pairs (linear CKA): {pairs}")
        print(f"similarity: {out / 'similarity.json'}, {out / 'similarity.png'}")


if __name__ == "__main__":
    main()


__all__ = [
    "ProbeFlags",
    "ProbeInputs",
    "all_block_features",
    "contiguous_groups",
    "fit_probe",
    "format_table",
    "plot",
    "run_probe",
]
