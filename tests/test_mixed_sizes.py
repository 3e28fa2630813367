"""Mixed sizes and aspect ratios end to end: the demo set, bucketed caching, grouped forwards (== one forward per
image), the per-rank split, bad images recorded by the cache, and cache -> train (full, frozen) -> bench.accuracy on a
set whose pairs mix sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from bench.tiny_base import default_tiny_base
from engine.api import RewardEngine
from training.batching import grouped_forward, pair_forward, rank_positions, shape_schedule
from training.buckets import aspect_buckets, nearest_bucket
from training.cache import LatentCache, build_cache
from training.data import read_file
from training.make_demo_set import make_demo_set

AREA = 64 * 64  # 9 buckets from 32x128 to 128x32: latents of 4x16 .. 16x4 on the tiny base


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("demo")
    stats = make_demo_set(root, n_train=48, n_val=(12, 12), seed=0)
    base = default_tiny_base()
    cache = build_cache(
        [stats["train"]],
        base,
        root / "cache",
        max_sequence_length=16,
        shard_size=32,
        area=AREA,
        progress=False,
        val_json=stats["val"],
        image_root=stats["image_root"],
    )
    return {**stats, "root": root, "base": base, "cache": cache}


@pytest.fixture(scope="module")
def engine(demo: dict) -> RewardEngine:
    torch.manual_seed(0)
    return RewardEngine.from_base(demo["base"], dtype=torch.float32, head_hidden=[16])


# ------------------------------------------------------------------------------------------------- the data set


def test_demo_set_mixes_buckets_sizes_and_path_kinds(demo: dict) -> None:
    cache = LatentCache(demo["cache"])
    assert len(set(cache.buckets.values())) >= 6
    train = read_file(demo["train"], None, image_root=demo["image_root"])
    mixed = sum(cache.bucket(p.winner) != cache.bucket(p.loser) for p in train)
    assert mixed / len(train) >= 0.25
    records = json.loads(Path(demo["train"]).read_text())
    assert any(not Path(r["path1"]).is_absolute() for r in records) and any(
        Path(r["path1"]).is_absolute() for r in records
    )
    assert not Path(demo["train"]).resolve().is_relative_to(Path(demo["image_root"]).resolve())
    with pytest.raises(ValueError, match="missing image"):  # the relative paths need --image-root
        read_file(demo["train"], None)


def test_cache_records_each_images_bucket_and_encodes_at_it(demo: dict) -> None:
    cache = LatentCache(demo["cache"])
    assert cache.settings["area"] == AREA
    buckets = aspect_buckets(AREA)
    for path, bucket in list(cache.buckets.items())[:40]:
        with Image.open(path) as image:
            width, height = image.size
        assert bucket == nearest_bucket(height, width, buckets)
        assert cache.latent_shape(path) == tuple(cache.latent(path).shape) == (16, bucket[0] // 8, bucket[1] // 8)


def test_a_cache_of_another_area_is_another_cache(demo: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="holds a cache of other inputs, settings or image contents"):
        build_cache(
            [demo["train"]],
            demo["base"],
            demo["cache"],
            max_sequence_length=16,
            shard_size=32,
            area=128 * 128,
            progress=False,
            val_json=demo["val"],
            image_root=demo["image_root"],
        )
    with pytest.raises(ValueError, match="area"):
        build_cache([demo["train"]], demo["base"], tmp_path, area=100, image_root=demo["image_root"])


# ------------------------------------------------------------------------------------------------ grouped forward


def _score(engine: RewardEngine):
    return lambda z0, embeds, pooled, noise: engine.score(z0, (embeds, pooled), noise=noise)


def test_grouped_forward_equals_one_forward_per_image(demo: dict, engine: RewardEngine) -> None:
    cache = LatentCache(demo["cache"])
    pairs = read_file(demo["val"][1], None, image_root=demo["image_root"])[:8]
    batch = cache.batch(pairs)
    assert len(shape_schedule(batch["winners"] + batch["losers"])) >= 3
    streams = list(range(100, 116))
    got = pair_forward(
        _score(engine),
        batch["winners"],
        batch["losers"],
        batch["prompt_embeds"],
        batch["pooled"],
        seed=7,
        streams=streams,
    )
    assert got.shape == (8, 2)
    for i, pair in enumerate(zip(batch["winners"], batch["losers"], strict=True)):
        for side, latent in enumerate(pair):
            prompt = (batch["prompt_embeds"][i : i + 1], batch["pooled"][i : i + 1])
            alone = engine.score(
                latent[None], prompt, seed=7, image_offset=streams[2 * i + side]
            )  # the kernel's stream
            torch.testing.assert_close(got[i, side], alone[0], rtol=1e-5, atol=1e-5)


def test_a_schedule_runs_every_shape_in_order_even_empty(engine: RewardEngine) -> None:
    torch.manual_seed(1)
    latents = [torch.randn(16, 4, 8), torch.randn(16, 8, 8), torch.randn(16, 4, 8)]
    embeds, pooled = torch.randn(3, 93, 96), torch.randn(3, 80)
    calls = []

    def forward(z0, e, p, noise):
        calls.append(tuple(z0.shape))
        return engine.score(z0, (e, p), noise=noise) if len(z0) else z0.new_zeros(0)

    plain = grouped_forward(forward, latents, embeds, pooled, seed=3)
    assert calls == [(2, 16, 4, 8), (1, 16, 8, 8)]
    calls.clear()
    schedule = [(16, 4, 8), (16, 6, 6), (16, 8, 8)]
    scheduled = grouped_forward(forward, latents, embeds, pooled, seed=3, schedule=schedule)
    assert calls == [(2, 16, 4, 8), (0, 16, 6, 6), (1, 16, 8, 8)]
    torch.testing.assert_close(scheduled, plain, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"not in the schedule"):
        grouped_forward(forward, latents, embeds, pooled, schedule=[(16, 4, 8)])


def test_rank_positions_split_evenly_with_equal_shape_lists() -> None:
    keys = ["b", "a", "b", "c", "a", "c", "b", "b"]
    parts = [rank_positions(keys, r, 2) for r in range(2)]
    assert sorted(parts[0] + parts[1]) == list(range(8)) and len(parts[0]) == len(parts[1]) == 4
    assert [keys[i] for i in parts[0]] == [keys[i] for i in parts[1]] == ["a", "b", "b", "c"]
    with pytest.raises(ValueError, match="evenly"):
        rank_positions(keys[:3], 0, 2)


# ----------------------------------------------------------------------------------------------- layer similarity


def test_probe_similarity_on_mixed_sizes(demo: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from training.probe import all_block_features, main
    from training.similarity import cka_matrix

    args = ["--cache", demo["cache"], "--train-json", demo["train"], "--val-json", *demo["val"], "--base", demo["base"]]
    args += ["--out", tmp_path, "--image-root", demo["image_root"], "--group-size", "2", "--t", "0.1", "0.5"]
    main([*map(str, args), "--similarity", "--top", "2"])
    printed = capsys.readouterr().out
    payload = json.loads((tmp_path / "similarity.json").read_text())
    assert payload["layers"] == [0, 1, 2, 3] and set(payload["by_t"]) == {"0.1", "0.5"}
    assert (tmp_path / "similarity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "t=0.5: most redundant block pairs (linear CKA):" in printed and "val acc t=0.5" in printed

    # Reference: an engine built at t = 0.5, its public features, one image at a time (no grouping).
    cache = LatentCache(demo["cache"])
    train = read_file(demo["train"], None, image_root=demo["image_root"])
    val = [p for v in demo["val"] for p in read_file(v, None, image_root=demo["image_root"])]
    reference = RewardEngine.from_base(demo["base"], layers=(0, 1, 2, 3), t=0.5, dtype=torch.float32)
    rows = []
    for pairs, seed in ((train, 0), (val, 1234)):
        for i, p in enumerate(pairs):
            embeds, pooled = (x[None] for x in cache.prompt(p.prompt))
            for side, image in enumerate((p.winner, p.loser)):
                latent = cache.latent(image)[None]
                rows.append(reference.features(latent, (embeds, pooled), seed=seed, image_offset=2 * i + side)[0])
    expected = cka_matrix(torch.stack(rows))
    torch.testing.assert_close(
        torch.tensor(payload["by_t"]["0.5"]["cka"], dtype=torch.float64), expected, atol=1e-5, rtol=0
    )
    # The probe's engine (built at t = 0.1) gives the t = 0.5 engine's features when asked for t = 0.5.
    grouped = all_block_features(reference, cache, val[:5], seed=1234)
    other = RewardEngine.from_base(demo["base"], layers=(0, 1, 2, 3), t=0.1, dtype=torch.float32)
    torch.testing.assert_close(
        all_block_features(other, cache, val[:5], seed=1234, t=0.5), grouped, rtol=1e-5, atol=1e-5
    )


# ------------------------------------------------------------------------------------ bad images, start-up cost


def test_the_cache_records_bad_images_and_the_trainer_reads_them(demo: dict, tmp_path: Path, monkeypatch) -> None:
    from training.train import TrainConfig, train

    records = json.loads(Path(demo["train"]).read_text())[:16]
    broken = Path(demo["image_root"]) / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    records[3]["path2"] = str(broken)
    data = tmp_path / "json" / "train.json"
    data.parent.mkdir()
    data.write_text(json.dumps(records))
    roots = {"image_root": demo["image_root"]}
    cache = build_cache(
        [data], demo["base"], tmp_path / "cache", max_sequence_length=16, area=AREA, progress=False,
        on_bad_image="skip", val_json=[demo["val"][0]], **roots,
    )  # fmt: skip
    index = LatentCache(cache)
    assert list(index.bad_images) == [str(broken)] and index.bad_images[str(broken)][0] == "unreadable_image"

    # The trainer never decodes an image: it reads what the cache found.
    import engine.pixel

    def no_decoding(*args, **kwargs):
        raise AssertionError("the trainer decoded an image")

    monkeypatch.setattr(engine.pixel, "load_images", no_decoding)
    common = {"cache": str(cache), "train_json": [str(data)], "val_json": [demo["val"][0]], "base": str(demo["base"])}
    common |= {"image_root": demo["image_root"], "mode": "frozen", "head_hidden": [8], "batch_size": 4, "steps": 1}
    with pytest.raises(ValueError, match=rf"{data} record 3: unreadable image path2 {broken} \(UnidentifiedImageError"):
        train(TrainConfig(**common, out_dir=str(tmp_path / "a")))
    metrics = train(TrainConfig(**common, out_dir=str(tmp_path / "b"), on_bad_image="skip"))
    assert metrics["step"] == 1
    log = (tmp_path / "b" / "log.jsonl").read_text()
    assert log  # the run went through with record 3 skipped


# ------------------------------------------------------------------------------------------------- end to end


def test_cache_train_and_bench_accuracy_on_mixed_sizes(demo: dict, tmp_path: Path) -> None:
    from bench.accuracy import format_table
    from bench.accuracy import run as bench_run
    from training.train import TrainConfig, train

    common = {"cache": str(demo["cache"]), "train_json": [demo["train"]], "val_json": demo["val"]}
    common |= {"base": str(demo["base"]), "image_root": demo["image_root"], "head_hidden": [32], "batch_size": 8}
    common |= {"log_every": 5, "checkpoint_every": 0, "eval_batch_size": 16, "lr_head": 3e-3}
    losses = {}
    for mode, steps in (("full", 10), ("frozen", 300)):
        out = tmp_path / mode
        metrics = train(TrainConfig(**common, mode=mode, steps=steps, lr_backbone=1e-3, out_dir=str(out)))
        report = bench_run(demo["val"], out / "reward", demo["base"], image_root=demo["image_root"])
        assert report["area"] == AREA
        rows = {r["file"]: r["accuracy"] for r in report["results"]}
        assert rows == pytest.approx(metrics["val_accuracy_per_file"], abs=1e-6)  # bench encodes as the cache did
        assert report["mean"]["accuracy"] == pytest.approx(sum(rows.values()) / len(rows))
        table = format_table(report)
        assert "val_a.json" in table and "val_b.json" in table and table.splitlines()[-1].startswith("mean")
        losses[mode] = [json.loads(line).get("loss") for line in (out / "log.jsonl").read_text().splitlines()]
    # The head fits the mixed-size training pairs (chance: log 2 = 0.693); held-out accuracy at scale is the README's
    # demo run (512 pairs, too slow for CI).
    assert [loss for loss in losses["frozen"] if loss is not None][-1] < 0.5


def test_fsdp_two_processes_match_one_on_mixed_sizes(demo: dict, tmp_path: Path) -> None:
    from test_training import fsdp_matches_one_process

    from training.batching import rank_positions
    from training.buckets import BucketSampler
    from training.train import TrainConfig

    values = {"cache": str(demo["cache"]), "train_json": [demo["train"]], "val_json": demo["val"]}
    values |= {"base": str(demo["base"]), "image_root": demo["image_root"], "head_hidden": [16], "steps": 4}
    values |= {"batch_size": 8, "log_every": 1, "checkpoint_every": 0, "eval_batch_size": 24, "lr_backbone": 1e-3}
    cache, pairs = LatentCache(demo["cache"]), read_file(demo["train"], None, image_root=demo["image_root"])
    keys = [cache.pair_key(p) for p in pairs]
    sampler = BucketSampler(keys, 8, seed=0)
    shapes = [
        [sorted({cache.bucket(image) for k in rank_positions([keys[i] for i in sampler.batch(s)], r, 2)
                 for image in (pairs[sampler.batch(s)[k]].winner, pairs[sampler.batch(s)[k]].loser)}) for r in (0, 1)]
        for s in range(4)
    ]  # fmt: skip
    assert any(len(a) > 1 for a, _ in shapes)  # steps that mix sizes ...
    assert any(a != b for a, b in shapes)  # ... and ranks whose own images lack a shape of the step (empty slices)
    fsdp_matches_one_process(lambda out: TrainConfig(**values, out_dir=str(out)), tmp_path, steps=4)
