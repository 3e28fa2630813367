"""A small HPSv3-format preference set shaped like the real mixture: many sizes and aspect ratios, pairs whose two
images differ in size, JSON files stored outside the image root with relative and absolute image paths.

    python -m training.make_demo_set OUT [--train 512] [--val 96 96] [--seed 0]

Writes OUT/images/<split>/*.png and OUT/json/{train,val_a,val_b}.json; relative paths resolve against
``--image-root OUT/images`` (the JSON folder is not the image root, as in HPSv3's layout). The task: each pair shows
the same smooth random colour pattern twice, clean (preferred, path1) and with strong Gaussian pixel noise; the two
images take independent aspect ratios in about 40% of pairs, and which one gets which size is random, so size carries
no signal. Learnable, but a random backbone does not solve it (~50%).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from PIL import Image
from pydantic import Field

from engine.schema import Schema, Seed, parse_cli

# (height, width) of the native images: square, 3:2, 16:9, 2:1, 3:1, 4:1 and their transposes, at two scales
SHAPES = [(64, 64), (80, 120), (72, 128), (48, 96), (40, 120), (32, 128)]
SHAPES = SHAPES + [(w, h) for h, w in SHAPES if h != w]
SCALES = (1.0, 1.5)
MIXED_FRACTION = 0.4  # pairs whose loser takes its own, independent shape
NOISE_SIGMA = 100.0  # pixel noise of the dispreferred image (of 255)


def _pattern(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    grid = Image.fromarray(rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8))
    return np.asarray(grid.resize((width, height), Image.BICUBIC)).astype(np.float32)


def _shape(rng: np.random.Generator) -> tuple[int, int]:
    h, w = SHAPES[rng.integers(len(SHAPES))]
    scale = SCALES[rng.integers(len(SCALES))]
    return round(h * scale), round(w * scale)


def make_split(image_root: Path, json_path: Path, name: str, n_pairs: int, seed: int) -> dict[str, Any]:
    """Write one split's PNGs under image_root/name and its records to json_path; returns its statistics."""
    rng = np.random.default_rng(seed)
    (image_root / name).mkdir(parents=True, exist_ok=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    records, mixed = [], 0
    for i in range(n_pairs):
        shape = _shape(rng)
        other = _shape(rng) if rng.uniform() < MIXED_FRACTION else shape
        clean_shape, noisy_shape = (shape, other) if rng.uniform() < 0.5 else (other, shape)
        mixed += clean_shape != noisy_shape
        clean = _pattern(rng, *clean_shape)
        noisy = np.asarray(Image.fromarray(clean.astype(np.uint8)).resize(noisy_shape[::-1], Image.BICUBIC))
        noisy = np.clip(noisy.astype(np.float32) + rng.normal(0, NOISE_SIGMA, noisy.shape), 0, 255)
        files = [image_root / name / f"{i}_clean.png", image_root / name / f"{i}_noisy.png"]
        Image.fromarray(clean.astype(np.uint8)).save(files[0])
        Image.fromarray(noisy.astype(np.uint8)).save(files[1])
        # Every other record stores paths relative to the image root, the others absolute (both as HPSv3 files do).
        paths = [str(f.relative_to(image_root)) if i % 2 == 0 else str(f.resolve()) for f in files]
        records.append(
            {
                "prompt": f"a smooth pattern {i % 7}",
                "path1": paths[0],
                "path2": paths[1],
                "confidence": None if i % 3 else 1.0,
                "choice_dist": None,
                "model1": "clean",
                "model2": "noisy",
            }
        )
    json_path.write_text(json.dumps(records, indent=1))
    return {"file": str(json_path), "pairs": n_pairs, "mixed_size_pairs": mixed}


def make_demo_set(out: str | Path, n_train: int = 512, n_val: tuple[int, ...] = (96, 96), seed: int = 0) -> dict:
    """The set under `out` (see the module docstring): train.json plus one val file per entry of `n_val`
    (val_a.json, val_b.json, ...). Returns the paths and statistics (pairs, mixed-size pairs, native shapes)."""
    out = Path(out)
    image_root, json_dir = out / "images", out / "json"
    splits = [("train", n_train)] + [(f"val_{chr(ord('a') + k)}", n) for k, n in enumerate(n_val)]
    stats = [make_split(image_root, json_dir / f"{name}.json", name, n, seed + k) for k, (name, n) in enumerate(splits)]
    shapes = Counter(Image.open(p).size[::-1] for p in image_root.rglob("*.png"))
    return {
        "image_root": str(image_root),
        "train": str(json_dir / "train.json"),
        "val": [str(json_dir / f"{name}.json") for name, _ in splits[1:]],
        "splits": stats,
        "native_shapes": len(shapes),
    }


MAX_PAIRS = 1_000_000  # a demo set of more pairs is a typo (each pair writes two PNG files)


class DemoSetFlags(Schema):
    out: Annotated[str, Field(min_length=1)] = Field(
        description="folder to create (images/ and json/ go under it)", json_schema_extra={"cli": {"positional": True}}
    )
    train: int = Field(512, ge=1, le=MAX_PAIRS, description="training pairs")
    val: Annotated[list[Annotated[int, Field(ge=1, le=MAX_PAIRS)]], Field(min_length=1, max_length=16)] = Field(
        default_factory=lambda: [96, 96], description="pairs per validation file"
    )
    seed: Seed = Field(0, description="images, shapes and noise")


def main(argv: list[str] | None = None) -> None:
    args = parse_cli(DemoSetFlags, argv, "python -m training.make_demo_set", __doc__.split("\n\n")[0])
    print(json.dumps(make_demo_set(args.out, args.train, tuple(args.val), args.seed), indent=2))


if __name__ == "__main__":
    main()


__all__ = ["DemoSetFlags", "make_demo_set", "make_split"]
