"""Aspect-ratio buckets and the bucketed pair sampler.

Preference data mixes generators, cameras, resolutions and aspect ratios, and the two images of a pair often differ
in size. As in SD3-family training, each image is resized to the bucket (sides multiples of 16 px, about `area`
pixels) nearest its aspect ratio; each image of a pair keeps its own bucket. Resizing straight to the bucket changes
the aspect ratio only by the gap between the image's ratio and its nearest bucket's, which is what the grid forces.

The sampler keeps each batch to the pairs of one (winner bucket, loser bucket) combination where it can, so a step
runs one or two forward shapes; the schedule is a pure function of (step, seed) — the same on every rank (FSDP2 needs
every rank to run the same sequence of block forwards) and exact on resume.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Sequence

import torch

from engine.config import BackboneConfig

VAE_DOWNSAMPLING = 8  # px per latent pixel: SD3's VAE
BUCKET_MULTIPLE = 16  # px: the VAE's 8x downsampling times the MMDiT's 2x2 patches
MAX_ASPECT = 4.0  # widest bucket, 4:1 (and 1:4); wider images go to the extreme bucket


def aspect_buckets(area: int, multiple: int = BUCKET_MULTIPLE, max_aspect: float = MAX_ASPECT) -> list[tuple[int, int]]:
    """(height, width) buckets of about `area` pixels, sides multiples of `multiple`, aspect within
    [1/max_aspect, max_aspect], sorted by aspect ratio h/w."""
    if not isinstance(area, int) or isinstance(area, bool) or area < multiple * multiple:
        raise ValueError(f"area must be an int >= {multiple * multiple} px, got {area!r}")
    if max_aspect < 1:
        raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
    by_ratio: dict[float, tuple[int, int]] = {}
    h = multiple
    while h <= math.sqrt(area * max_aspect) + multiple:
        w = max(multiple, round(area / h / multiple) * multiple)
        # Both orientations: stepping h alone would give tall images finer buckets than wide ones at small areas.
        for bucket in ((h, w), (w, h)):
            ratio = bucket[0] / bucket[1]
            if max(bucket) / min(bucket) <= max_aspect:
                best = by_ratio.setdefault(ratio, bucket)
                if abs(bucket[0] * bucket[1] - area) < abs(best[0] * best[1] - area):
                    by_ratio[ratio] = bucket  # one bucket per ratio: the one nearest the area
        h += multiple
    return sorted(by_ratio.values(), key=lambda b: b[0] / b[1])


def max_image_side(backbone: BackboneConfig) -> int:
    """The longest image side in pixels `backbone` takes: its position embedding covers pos_embed_max_size patches."""
    return backbone.pos_embed_max_size * backbone.patch_size * VAE_DOWNSAMPLING


def largest_area(max_side: int) -> int:
    """The largest `area` whose buckets all have sides of at most `max_side` px (the longest side grows with the area,
    so a bisection finds it)."""
    longest = lambda area: max(max(b) for b in aspect_buckets(area))
    low, high = BUCKET_MULTIPLE * BUCKET_MULTIPLE, max_side * max_side
    if longest(low) > max_side:
        raise ValueError(f"no bucket area fits images of at most {max_side} px per side")
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if longest(middle) <= max_side else (low, middle - 1)
    return low


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log ratio) to height/width's."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    target = math.log(height / width)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1]))


class BucketSampler:
    """Global batches of pair indices grouped by shape key.

    Per epoch (seeded by (seed, epoch)): each key's pairs are permuted and cut into full batches; the leftovers of
    all keys are pooled, permuted and cut into mixed batches (the last partial one, < batch_size pairs, sits the epoch
    out — a different one each epoch); then the epoch's batches are permuted. `batch(step)` is a pure function."""

    def __init__(self, keys: Sequence[Hashable], batch_size: int, seed: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(keys) < batch_size:
            raise ValueError(f"{len(keys)} pairs cannot fill one batch of {batch_size}")
        groups: dict[Hashable, list[int]] = defaultdict(list)
        for i, key in enumerate(keys):
            groups[key].append(i)
        self.groups = [groups[k] for k in sorted(groups, key=repr)]  # a fixed order, whatever the hash seed
        self.batch_size, self.seed = batch_size, seed
        self.batches_per_epoch = len(keys) // batch_size
        self._epoch: tuple[int, list[list[int]]] | None = None

    def _generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)

    def epoch(self, epoch: int) -> list[list[int]]:
        if self._epoch is not None and self._epoch[0] == epoch:
            return self._epoch[1]
        g, b = self._generator(epoch), self.batch_size
        batches, leftovers = [], []
        for members in self.groups:
            order = [members[i] for i in torch.randperm(len(members), generator=g).tolist()]
            full = len(order) // b * b
            batches += [order[i : i + b] for i in range(0, full, b)]
            leftovers += order[full:]
        pool = [leftovers[i] for i in torch.randperm(len(leftovers), generator=g).tolist()]
        batches += [pool[i : i + b] for i in range(0, len(pool) // b * b, b)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        assert len(batches) == self.batches_per_epoch
        self._epoch = (epoch, batches)
        return batches

    def batch(self, step: int) -> list[int]:
        """Pair indices of global batch `step` (0-based)."""
        epoch, k = divmod(step, self.batches_per_epoch)
        return list(self.epoch(epoch)[k])


__all__ = [
    "BUCKET_MULTIPLE",
    "MAX_ASPECT",
    "VAE_DOWNSAMPLING",
    "BucketSampler",
    "aspect_buckets",
    "largest_area",
    "max_image_side",
    "nearest_bucket",
]
