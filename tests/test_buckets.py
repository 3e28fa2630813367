"""Aspect-ratio buckets and the bucketed sampler."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from training.buckets import BucketSampler, aspect_buckets, nearest_bucket


@pytest.mark.parametrize("area", [1024 * 1024, 512 * 512, 128 * 128])
def test_buckets_cover_the_area_on_the_grid(area):
    buckets = aspect_buckets(area)
    assert (int(math.sqrt(area)) // 16 * 16,) * 2 in buckets or area % 256  # the square bucket when sqrt fits
    for h, w in buckets:
        assert h % 16 == 0 and w % 16 == 0
        assert max(h, w) / min(h, w) <= 4.0
        assert abs(h * w - area) / area < 0.5 * 16 / min(h, w) + 16 / max(h, w)  # rounding one side to the grid
    ratios = [h / w for h, w in buckets]
    assert ratios == sorted(ratios) and len(set(ratios)) == len(ratios)
    assert len(buckets) >= 6


def test_nearest_bucket_distorts_no_more_than_the_grid_forces():
    buckets = aspect_buckets(1024 * 1024)
    log_ratios = [math.log(h / w) for h, w in buckets]
    widest_gap = max(b - a for a, b in zip(log_ratios, log_ratios[1:], strict=False))
    for height, width in [(1024, 1024), (768, 1344), (1344, 768), (2000, 1001), (333, 997), (4000, 3000)]:
        h, w = nearest_bucket(height, width, buckets)
        distortion = abs(math.log(h / w) - math.log(height / width))
        assert distortion <= widest_gap / 2 + 1e-12
        assert distortion == min(abs(r - math.log(height / width)) for r in log_ratios)
    assert nearest_bucket(1024, 1024, buckets) == (1024, 1024)
    assert nearest_bucket(100, 10_000, buckets) == buckets[0]  # beyond 1:4 goes to the extreme bucket


def test_bucket_errors():
    with pytest.raises(ValueError, match="area"):
        aspect_buckets(100)
    with pytest.raises(ValueError, match="area"):
        aspect_buckets(1024.0 * 1024)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        nearest_bucket(0, 5, aspect_buckets(4096))


def _keys(n_keys: int, sizes: list[int]) -> list[tuple[int, int]]:
    return [(k, k + 1) for k in range(n_keys) for _ in range(sizes[k])]


def test_sampler_epoch_is_a_partition_and_mostly_single_key():
    keys = _keys(5, [37, 20, 9, 50, 3])  # 119 pairs
    sampler = BucketSampler(keys, batch_size=8, seed=3)
    assert sampler.batches_per_epoch == 119 // 8
    seen = Counter()
    single = 0
    for step in range(sampler.batches_per_epoch):
        batch = sampler.batch(step)
        assert len(batch) == 8
        seen.update(batch)
        single += len({keys[i] for i in batch}) == 1
    assert max(seen.values()) == 1 and len(seen) == 119 - 119 % 8
    full = sum(s // 8 for s in [37, 20, 9, 50, 3])
    assert single >= full  # every full per-key batch stays one shape combination


def test_sampler_is_a_pure_function_of_step_and_seed():
    keys = _keys(3, [10, 11, 12])
    a, b = BucketSampler(keys, 4, seed=0), BucketSampler(keys, 4, seed=0)
    steps = [0, 17, 3, 30, 17, 8]  # out of order and across epochs, as a resumed run reads them
    assert [a.batch(s) for s in steps] == [BucketSampler(keys, 4, seed=0).batch(s) for s in steps]
    assert [b.batch(s) for s in range(20)] == [a.batch(s) for s in range(20)]
    assert a.batch(0) != a.batch(a.batches_per_epoch) or a.batch(1) != a.batch(a.batches_per_epoch + 1)
    assert [BucketSampler(keys, 4, seed=1).batch(s) for s in range(8)] != [a.batch(s) for s in range(8)]


def test_sampler_errors():
    with pytest.raises(ValueError, match="batch_size"):
        BucketSampler([(1, 1)] * 4, 0, 0)
    with pytest.raises(ValueError, match="cannot fill"):
        BucketSampler([(1, 1)] * 3, 4, 0)


@pytest.mark.parametrize("area", [64 * 64, 128 * 128, 1024 * 1024])
def test_buckets_are_symmetric_one_per_ratio(area):
    buckets = aspect_buckets(area)
    assert sorted((w, h) for h, w in buckets) == sorted(buckets)  # wide images get the buckets tall ones get
    assert aspect_buckets(64 * 64) == [
        (32, 128), (32, 112), (48, 96), (48, 80), (64, 64), (80, 48), (96, 48), (112, 32), (128, 32)
    ]  # fmt: skip
