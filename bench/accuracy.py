"""Pairwise preference accuracy of a reward checkpoint on HPSv3-format test files.

    python -m bench.accuracy --test-json A.json [B.json ...] --checkpoint DIR --base SD35_DIR [--json OUT]

A pair counts as correct when r(path1) > r(path2); a tie counts as wrong, as HPSv3 counts. Images go through the
same encoding as `training.cache` (each image resized to its aspect bucket at the area recorded in the checkpoint, so
the latents equal the cache's), batches of mixed sizes run one forward per latent shape (`training.batching`), and
the reward's noise uses the checkpoint's validation seed with the trainer's stream layout (image 2i / 2i+1 of a file
= pair i's path1 / path2), so on a file the trainer validated on this reports the trainer's logged accuracy. Prints one
row per file and the mean over files (test sets are separate files: HPDv3-, HPDv2-, ImageReward-style).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from engine.api import RewardEngine
from engine.io.checkpoint import read_reward_config
from engine.schema import Seed, parse_cli
from training.cache import encode_image_files
from training.data import PathRule, PreferencePair, read_file
from training.evaluation import PairBatch, accuracy, pair_rewards

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_JSON_FLAG = {"cli": {"flag": "--json"}}


def evaluate_file(
    engine: RewardEngine,
    front: Any,
    path: str | Path,
    seed: int,
    batch_size: int = 32,
    area: int | None = None,
    image_root: str | Path | None = None,
    allow_outside_root: bool = False,
) -> dict[str, Any]:
    """Accuracy and reward statistics of every pair in one file (no confidence filter: a benchmark counts all).
    `area`: the pixel area of the aspect buckets the checkpoint was trained at (its cache's). `image_root` /
    `allow_outside_root`: the path rule of `training.data`."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    pairs = read_file(path, None, on_bad_image="error", image_root=image_root, allow_outside_root=allow_outside_root)
    if not pairs:
        raise ValueError(f"test file {path} holds no preference pairs")
    if area is None:
        raise ValueError("area is required: the bucket area the checkpoint's cache was built at (settings 'area')")
    score = lambda z0, embeds, pooled, noise: engine.score(z0, (embeds, pooled), noise=noise)

    def encode(chunk: list[PreferencePair]) -> PairBatch:
        names = {image: f"{p.source} record {p.index}" for p in chunk for image in (p.winner, p.loser)}
        latents = encode_image_files(front, [image for p in chunk for image in (p.winner, p.loser)], area, names)
        embeds, pooled = front.encode_prompts([p.prompt for p in chunk], progress=False)
        return latents[0::2], latents[1::2], embeds, pooled  # encoded interleaved: winner i, loser i

    r = pair_rewards(score, pairs, encode, batch_size, seed, engine.device)  # [n, 2]
    return {
        "file": str(Path(path).resolve()),
        "pairs": len(pairs),
        "accuracy": accuracy(r),
        "ties": int((r[:, 0] == r[:, 1]).sum()),
        "mean_margin": float((r[:, 0] - r[:, 1]).mean()),
    }


def run(
    test_json: Sequence[str | Path],
    checkpoint: str | Path,
    base: str | Path,
    device: str | None = None,
    dtype: str = "fp32",
    batch_size: int = 32,
    seed: int | None = None,
    image_root: str | Path | None = None,
    allow_outside_root: bool = False,
    area: int | None = None,
) -> dict[str, Any]:
    """Score every file; returns {"checkpoint", "results": [per-file dicts], "mean": the mean over files of each
    figure, "seconds"}. `area` defaults to the one the checkpoint records (`training.area`)."""
    from engine.pixel import PixelFrontEnd

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    meta, _, _ = read_reward_config(checkpoint)
    training = meta["metadata"].get("training", {})
    engine = RewardEngine.from_pretrained(checkpoint, base, dtype=_DTYPES[dtype], device=device)
    front = PixelFrontEnd.from_pretrained(
        base,
        device=device,
        dtype=_DTYPES.get(training.get("cache_dtype", "fp32"), torch.float32),
        max_sequence_length=engine.prompt_length.t5_tokens,  # the checkpoint's, as the engine reads it
    )
    seed = int(training.get("eval_seed", 1234)) if seed is None else seed
    area = training.get("area") if area is None else area
    if area is None:
        raise ValueError(
            f"checkpoint {checkpoint} does not record the bucket area of its training cache: pass area= (--area), the "
            "--area the cache was built with"
        )
    start = time.perf_counter()
    roots = {"image_root": image_root, "allow_outside_root": allow_outside_root}
    results = [evaluate_file(engine, front, f, seed, batch_size, area, **roots) for f in test_json]
    figures = ("accuracy", "ties", "mean_margin")
    return {
        "checkpoint": str(checkpoint),
        "base": str(base),
        "seed": seed,
        "area": area,
        "results": results,
        "mean": {k: sum(r[k] for r in results) / len(results) for k in ("pairs", *figures)},
        "seconds": time.perf_counter() - start,
    }


def format_table(report: dict[str, Any]) -> str:
    rows = [("benchmark", "pairs", "accuracy", "ties", "mean margin")]
    rows += [
        (
            Path(r["file"]).name,
            f"{r['pairs']:g}",
            f"{100 * r['accuracy']:.2f}%",
            f"{r['ties']:g}",
            f"{r['mean_margin']:.4f}",
        )
        for r in [*report["results"], {"file": "mean", **report["mean"]}]
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)


class AccuracyArgs(PathRule):
    """The command line of `python -m bench.accuracy` (and `PathRule`'s: --image-root, --allow-outside-root)."""

    test_json: list[str] = Field(min_length=1, description="HPSv3-format test files (path1 preferred)")
    checkpoint: str = Field(min_length=1, description="reward checkpoint directory (training.train's reward/)")
    base: str = Field(min_length=1, description="local SD3/SD3.5 diffusers directory")
    json_out: str | None = Field(
        None, min_length=1, description="also write the results here", json_schema_extra=_JSON_FLAG
    )
    device: str | None = Field(None, description="torch device (default: cuda if available)")
    dtype: Literal["fp32", "bf16"] = Field("fp32", description="backbone dtype")
    batch_size: int = Field(32, ge=1, le=65536, description="pairs per forward")
    seed: Seed | None = Field(None, description="noise seed (default: the checkpoint's eval seed)")
    area: int | None = Field(None, ge=256, le=4096**2, description="bucket pixel area (default: the checkpoint's)")


def main(argv: list[str] | None = None) -> None:
    args = parse_cli(AccuracyArgs, argv, "python -m bench.accuracy", __doc__.split("\n\n")[0])
    report = run(
        args.test_json,
        args.checkpoint,
        args.base,
        args.device,
        args.dtype,
        args.batch_size,
        args.seed,
        image_root=args.image_root,
        allow_outside_root=args.allow_outside_root,
        area=args.area,
    )
    print(format_table(report))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()


__all__ = ["AccuracyArgs", "evaluate_file", "format_table", "run"]
