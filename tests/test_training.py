"""Training stack on the tiny base: data filtering, the cache, BT training (full and frozen), resume, FSDP2 on two CPU
processes, export -> from_pretrained, bench.accuracy and the layer probe.

The synthetic task: smooth random colour patterns at 64x64; the preferred image of each pair is the clean pattern,
the other is the same pattern with strong Gaussian pixel noise (sigma 100/255). Learnable, but the random tiny
backbone does not solve it at init (~50%)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.tiny_base import default_tiny_base
from engine.api import RewardEngine
from training.cache import LatentCache, build_cache
from training.checkpoint import latest_checkpoint, read_checkpoint_file
from training.config import TrainConfig, load_config
from training.data import load_pairs, read_file
from training.model import TrainableReward
from training.train import get_lr, train

REPO = Path(__file__).resolve().parents[1]


def make_split(
    root: Path, name: str, n_pairs: int, seed: int, sigma: float = 100.0, size: int = 64, ties_every: int = 0
) -> Path:
    """Write PNGs under root/name and an HPSv3-format root/name.json with relative paths. With `ties_every`, every
    such pair's `choice_dist` is balanced (a tie for `btt`) and every other pair's decided."""
    rng = np.random.default_rng(seed)
    (root / name).mkdir(parents=True)
    records = []
    for i in range(n_pairs):
        grid = Image.fromarray(rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8))
        clean = np.asarray(grid.resize((size, size), Image.BICUBIC)).astype(np.float32)
        noisy = np.clip(clean + rng.normal(0, sigma, clean.shape), 0, 255)
        Image.fromarray(clean.astype(np.uint8)).save(root / name / f"{i}_clean.png")
        Image.fromarray(noisy.astype(np.uint8)).save(root / name / f"{i}_noisy.png")
        records.append(
            {
                "prompt": f"a smooth pattern {i % 5}",
                "path1": f"{name}/{i}_clean.png",
                "path2": f"{name}/{i}_noisy.png",
                "confidence": None if i % 2 else 1.0,
                "choice_dist": ([5, 5] if i % ties_every == 0 else [9, 1]) if ties_every else None,
                "model1": "clean",
                "model2": "noisy",
            }
        )
    path = root / f"{name}.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="session")
def task(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("prefs")
    train_json, val_json = make_split(root, "train", 256, seed=0), make_split(root, "val", 40, seed=1)
    base = default_tiny_base()
    cache = build_cache(
        [train_json, val_json],
        base,
        root / "cache",
        max_sequence_length=16,
        shard_size=64,
        area=64 * 64,
        progress=False,
    )
    return {"root": root, "train": train_json, "val": val_json, "base": base, "cache": cache}


def config(task: dict, out_dir: Path, **overrides) -> TrainConfig:
    values = {
        "cache": str(task["cache"]),
        "train_json": [str(task["train"])],
        "val_json": [str(task["val"])],
        "base": str(task["base"]),
        "head_hidden": [64],
        "steps": 80,
        "batch_size": 16,
        "lr_backbone": 1e-3,
        "lr_head": 3e-3,
        "log_every": 10,
        "eval_every": 0,
        "checkpoint_every": 0,
        "eval_batch_size": 40,
        "out_dir": str(out_dir),
    }
    values.update(overrides)
    return TrainConfig(**values)


def read_log(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


class Killed(Exception):
    pass


def kill_at(step: int):
    """An `on_step` that stops training after `step`, as a kill would (the checkpoint of that step is written)."""

    def on_step(current: int, metrics: dict) -> None:
        if current == step:
            raise Killed

    return on_step


# ------------------------------------------------------------------------------------------------------------ data


def test_data_filtering_weights_and_bad_images(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (16, 16)).save(tmp_path / "img" / f"{name}.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png")
    rec = lambda conf, p2="img/b.png": {"prompt": "p", "path1": "img/a.png", "path2": p2, "confidence": conf}
    good = tmp_path / "good.json"
    good.write_text(json.dumps([rec(0.99), rec(None), rec(0.5), rec(0.96)]))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([rec(1.0), rec(1.0, "img/missing.png"), rec(1.0, "img/broken.png")]))

    pairs, report = load_pairs([good, (bad, 2.0)], on_bad_image="skip")
    assert [p.index for p in pairs if p.source == str(good)] == [0, 1, 3]  # 0.5 < 0.95 dropped, null passes
    assert [p.index for p in pairs if p.source == str(bad)] == [0, 0]  # weight 2 doubles the kept record
    assert pairs[0].winner == (tmp_path / "img" / "a.png").resolve()  # relative to the JSON file's folder
    assert report.total_dropped("low_confidence") == 1
    assert report.total_dropped("missing_image") == report.total_dropped("unreadable_image") == 1
    assert "missing.png" in str(report)

    half, _ = load_pairs([f"{good}:0.34"], on_bad_image="skip")
    assert len(half) == 1
    with pytest.raises(ValueError, match="record 1: missing image"):
        read_file(bad, on_bad_image="error")
    with pytest.raises(ValueError, match="on_bad_image"):
        read_file(good, on_bad_image="ignore")
    with pytest.raises(ValueError, match="mixing weight"):
        load_pairs([(good, 0.0)])


def test_data_rejects_malformed_records_and_reads_weights(tmp_path: Path) -> None:
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "b.png")
    rec = lambda **kw: {"prompt": "p", "path1": "a.png", "path2": "b.png", "confidence": None, **kw}
    path = tmp_path / "f.json"
    for bad, match in [
        (rec(path2=None), "record 1: path2: got None, expected text"),
        (rec(path1=3), "record 1: path1: got 3, expected text"),
        (rec(confidence=float("nan")), "record 1: confidence: got nan, expected a finite number"),
        (rec(confidence=True), "record 1: confidence: got True, expected a number"),
    ]:
        path.write_text(json.dumps([rec(), bad]))
        with pytest.raises(ValueError, match=match):
            read_file(path)
    path.write_text(json.dumps([rec()] * 10))
    assert len(load_pairs([f"{path}:1e-1"])[0]) == 1
    path.write_text(json.dumps([rec()] * 5))
    assert len(load_pairs([f"{path}:1.5"])[0]) == 5 + 2  # one whole copy + round(0.5 * 5), as documented
    with pytest.raises(ValueError, match="mixing weight"):
        load_pairs([f"{path}:-1"])


def test_cache_resumes_and_rejects_other_inputs(task: dict, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    build_cache([task["val"]], task["base"], out, max_sequence_length=16, shard_size=16, area=64 * 64, progress=False)
    shards = sorted(out.glob("images-*.safetensors"))
    reference = {p.name: p.read_bytes() for p in shards}
    shards[1].unlink()  # as if interrupted before this shard was renamed into place ...
    (out / f".{shards[1].name}.tmp-99").write_bytes(b"partial")  # ... leaving its temp file
    untouched = shards[0].stat().st_mtime_ns
    build_cache([task["val"]], task["base"], out, max_sequence_length=16, shard_size=16, area=64 * 64, progress=False)
    assert shards[0].stat().st_mtime_ns == untouched  # complete shards are skipped
    assert {p.name: p.read_bytes() for p in sorted(out.glob("images-*.safetensors"))} == reference
    assert not list(out.glob(".*.tmp-*"))
    pair = read_file(task["val"], None)[0]
    assert LatentCache(out).latent(pair.winner).shape == (16, 8, 8)
    with pytest.raises(ValueError, match="other inputs, settings or image contents"):
        build_cache(
            [task["val"]], task["base"], out, max_sequence_length=32, shard_size=16, area=64 * 64, progress=False
        )


def test_cache_holds_every_pair_a_fractional_weight_can_draw(task: dict, tmp_path: Path) -> None:
    records = json.loads(task["val"].read_text())[:8]
    for record in records:
        record["path1"], record["path2"] = (str(task["root"] / record[k]) for k in ("path1", "path2"))
    half = f"{tmp_path / 'part.json'}:0.5"
    (tmp_path / "part.json").write_text(json.dumps(records))
    root = {"image_root": task["root"]}  # absolute paths into the dataset, a JSON file elsewhere
    cache = build_cache(
        [half], task["base"], tmp_path / "cache", max_sequence_length=16, area=64 * 64, progress=False, **root
    )
    cache = LatentCache(cache)
    for seed in range(4):  # the trainer draws the half with its own seed
        pairs, _ = load_pairs([half], seed=seed, **root)
        assert len(pairs) == 4
        cache.check(pairs)


def test_cache_holds_every_validation_pair(task: dict, tmp_path: Path) -> None:
    from training.cache import main

    records = json.loads(task["val"].read_text())[:6]
    for record in records:  # held out, but below the training confidence threshold
        record["path1"], record["path2"] = (str(task["root"] / record[k]) for k in ("path1", "path2"))
        record["confidence"] = 0.5
    held_out = tmp_path / "held_out.json"
    held_out.write_text(json.dumps(records))
    args = ["--json", task["val"], "--val-json", held_out, "--base", task["base"], "--out", tmp_path / "cache"]
    main([*map(str, args), "--max-sequence-length", "16", "--area", "4096", "--image-root", str(task["root"])])
    LatentCache(tmp_path / "cache").check(read_file(held_out, None, image_root=task["root"]))  # what the trainer reads


REQUIRED = {"cache": "c", "base": "b", "train_json": ["t"], "val_json": ["v"]}


def test_config_validation_and_schedule(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="key=value arguments: stepz: an unknown field, expected one of"):
        load_config(None, ["cache=x", "stepz=3"])
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**REQUIRED, "mode": "partial"}))
    with pytest.raises(ValueError, match=rf"{path}: mode: got 'partial', expected one of 'full', 'frozen' or 'lora'"):
        load_config(path)
    cfg = TrainConfig(**REQUIRED, steps=100, warmup_ratio=0.05, min_lr_ratio=0.1)
    assert get_lr(0, cfg) == pytest.approx(0.2) and get_lr(4, cfg) == pytest.approx(1.0)
    assert get_lr(99, cfg) == pytest.approx(0.1)
    assert all(get_lr(s, cfg) >= get_lr(s + 1, cfg) for s in range(5, 99))
    assert get_lr(50, TrainConfig(**REQUIRED, steps=100, schedule="constant")) == 1.0


def test_config_fields_are_type_checked_and_finite(task: dict, tmp_path: Path) -> None:
    required = ["cache=c", "base=b", "val_json=v.json"]
    # One path for a list of files, as the command line naturally gives it; Python-style literals parse.
    cfg = load_config(None, [*required, "train_json=/data/train.json:0.5", "grad_checkpointing=False"])
    assert cfg.train_json == ["/data/train.json:0.5"] and cfg.val_json == ["v.json"]
    assert cfg.grad_checkpointing is False
    cfg = load_config(None, [*required, "train_json=t.json", "confidence_threshold=None", "out_dir=2024"])
    assert cfg.confidence_threshold is None and cfg.out_dir == "2024"
    one = TrainConfig(**{**REQUIRED, "train_json": tmp_path / "t.json"})
    assert one.train_json == [str(tmp_path / "t.json")]

    required.append("train_json=t.json")
    overrides = {
        "lr_head": "NaN",
        "lr_backbone": "Infinity",
        "grad_clip": "NaN",
        "weight_decay": "-Infinity",
        "peak_flops": "NaN",
        "betas": "[0.9]",
        "layers": "3",
        "steps": "0",
        "eval_every": "true",
        "grad_checkpointing": "yes",
        "t": "0",
        "seed": "-1",
        "confidence_threshold": "2",
    }
    for key, raw in overrides.items():
        with pytest.raises(ValueError, match=rf"key=value arguments: {key}: got"):
            load_config(None, [*required, f"{key}={raw}"])
    path = tmp_path / "c.json"
    for key, value in {"head_hidden": "64", "betas": "0.9", "warmup_ratio": "0.1", "cache": 123, "layers": []}.items():
        path.write_text(json.dumps({**REQUIRED, key: value}))
        with pytest.raises(ValueError, match=rf"{path}: {key}: got"):
            load_config(path)
    # train() checks before it does any work.
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="lr_head"):
        train(TrainConfig(cache="c", base="b", train_json="t", val_json="v", lr_head=float("nan"), out_dir=str(out)))
    assert not out.exists()
    with pytest.raises(ValueError, match=r"layers: got \[1, 9\], expected block indices below 4 \(the base has 4"):
        train(config(task, out, layers=[1, 9], train_json=[str(tmp_path / "not-read.json")]))


# -------------------------------------------------------------------------------------------------------- training


def test_full_backbone_learns_exports_and_bench_agrees(task: dict, tmp_path: Path) -> None:
    from bench.accuracy import run as bench_run

    out = tmp_path / "full"
    metrics = train(config(task, out))
    log = read_log(out)
    before, after = log[0]["val_accuracy"], metrics["val_accuracy"]
    print(f"full backbone: held-out accuracy {before:.3f} -> {after:.3f}")
    assert 0.3 <= before <= 0.7 and after >= 0.9
    assert {"loss", "accuracy", "lr_backbone", "lr_head", "pairs_per_s", "mfu"} <= set(log[-1])

    # The exported checkpoint, loaded the public way, gives the trainer's rewards.
    engine = RewardEngine.from_pretrained(out / "reward", task["base"], dtype=torch.float32)
    assert engine.reward_config.reward_mean == pytest.approx(metrics["reward_mean"])
    assert engine.reward_config.reward_std == pytest.approx(metrics["reward_std"])
    trained = RewardEngine.from_base(task["base"], dtype=torch.float32, head_hidden=[64])
    trained.backbone.load_state_dict(engine.backbone.state_dict())
    trained.head.load_state_dict(engine.head.state_dict())
    cache, pairs = LatentCache(task["cache"]), read_file(task["val"], None)[:6]
    batch = cache.batch(pairs)
    winners = torch.stack(batch["winners"])  # one bucket: 64x64 images at area 64x64
    noise = torch.randn_like(winners)
    ckpt = read_checkpoint_file(sorted((out / "checkpoints").glob("step_*.safetensors"))[-1])["model"]
    model = TrainableReward(trained)
    model.load_state_dict(ckpt, strict=False)  # the trainer's final weights, in the trainer's module
    with torch.no_grad():
        expected = model(winners, batch["prompt_embeds"], batch["pooled"], noise=noise)[:, 0]
    got = engine.score(winners, (batch["prompt_embeds"], batch["pooled"]), noise=noise)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    normalized = engine.score(winners, (batch["prompt_embeds"], batch["pooled"]), noise=noise, normalize=True)
    torch.testing.assert_close(normalized, (got - metrics["reward_mean"]) / metrics["reward_std"])

    report = bench_run([task["val"]], out / "reward", task["base"])
    assert report["results"][0]["accuracy"] == pytest.approx(after)


def test_frozen_backbone_learns(task: dict, tmp_path: Path) -> None:
    out = tmp_path / "frozen"
    metrics = train(config(task, out, mode="frozen", steps=150))
    before = read_log(out)[0]["val_accuracy"]
    print(f"frozen backbone: held-out accuracy {before:.3f} -> {metrics['val_accuracy']:.3f}")
    assert metrics["val_accuracy"] >= before + 0.1
    assert not (out / "reward" / "backbone.safetensors").exists()  # head-only checkpoint


def test_empty_validation_file_is_named(task: dict, tmp_path: Path) -> None:
    empty, skipped = tmp_path / "empty.json", tmp_path / "skipped.json"
    empty.write_text("[]")
    skipped.write_text(json.dumps([{"prompt": "p", "path1": "gone.png", "path2": "gone2.png"}]))
    val_json = [str(task["val"]), str(empty), str(skipped)]
    with pytest.raises(ValueError, match=r"empty\.json', '.*skipped\.json'\] hold no pairs"):
        train(config(task, tmp_path / "run", mode="frozen", val_json=val_json, on_bad_image="skip"))


def test_kill_and_resume_is_exact(task: dict, tmp_path: Path) -> None:
    common = {"steps": 8, "batch_size": 8, "checkpoint_every": 2, "keep_checkpoints": 3, "log_every": 1}
    train(config(task, tmp_path / "straight", **common))
    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        train(config(task, out, **common), on_step=kill_at(5))
    checkpoints = out / "checkpoints"
    # A writer killed mid-write leaves its temp file; a damaged file at a final name is skipped as well.
    (checkpoints / ".step_00000006.safetensors.tmp-4242").write_bytes(b"half a checkpoint")
    (checkpoints / "step_00000006.safetensors").write_bytes(
        (checkpoints / "step_00000004.safetensors").read_bytes()[:1000]
    )
    path, payload = latest_checkpoint(out)
    assert path.name == "step_00000004.safetensors" and payload["data_position"] == 4 * 8
    train(config(task, out, **common, eval_batch_size=16))  # validation batching is free to change in full mode
    assert not list(checkpoints.glob(".*.tmp-*"))  # the crashed writer's temp file is cleaned up at start

    final = lambda d: read_checkpoint_file(d / "checkpoints" / "step_00000008.safetensors")
    a, b = final(tmp_path / "straight"), final(out)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    # The log reads as the uninterrupted run's: step 5, logged before the kill, is not logged twice.
    straight_losses = [(r["step"], r.get("loss")) for r in read_log(tmp_path / "straight")]
    assert [(r["step"], r.get("loss")) for r in read_log(out)] == straight_losses


def test_frozen_resume_keeps_the_feature_batching(task: dict, tmp_path: Path) -> None:
    # Frozen mode extracts the training features in eval_batch_size batches: resuming with another size would not
    # reproduce them bit for bit, so it is refused like any other change that makes a different run.
    common = {"mode": "frozen", "steps": 2, "batch_size": 8}
    train(config(task, tmp_path, **common))
    with pytest.raises(ValueError, match=r"\['eval_batch_size'\] differ"):
        train(config(task, tmp_path, **common, eval_batch_size=16))


def test_pruning_keeps_the_newest_valid_checkpoint(task: dict, tmp_path: Path) -> None:
    common = {"mode": "frozen", "steps": 6, "batch_size": 8, "checkpoint_every": 1, "keep_checkpoints": 1}
    checkpoints = tmp_path / "checkpoints"
    names = lambda: sorted(p.name for p in checkpoints.glob("step_*.safetensors"))
    with pytest.raises(Killed):
        train(config(task, tmp_path, **common), on_step=kill_at(3))
    assert names() == ["step_00000003.safetensors"]
    # A damaged file at a later name (resume skips it) must not count as the one to keep.
    damaged = (checkpoints / "step_00000003.safetensors").read_bytes()[:1000]
    (checkpoints / "step_00000005.safetensors").write_bytes(damaged)
    with pytest.raises(Killed):
        train(config(task, tmp_path, **common), on_step=kill_at(4))
    assert names() == ["step_00000004.safetensors", "step_00000005.safetensors"]
    assert latest_checkpoint(tmp_path)[0].name == "step_00000004.safetensors"
    train(config(task, tmp_path, **common))
    assert names() == ["step_00000006.safetensors"]


def fsdp_matches_one_process(config_for: Callable[[Path], TrainConfig], tmp_path: Path, steps: int) -> None:
    """Train `config_for(out_dir)` in one process and with FSDP2 on two CPU processes (gloo): same losses and weights
    (only reduction order differs), and the FSDP export loads."""
    train(config_for(tmp_path / "one"))
    cfg_path = tmp_path / "fsdp.json"
    cfg_path.write_text(json.dumps(config_for(tmp_path / "two").to_dict()))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "training.train",
            "--config",
            str(cfg_path),
        ],
        cwd=REPO,
        env=env,
        check=True,
        timeout=300,
    )
    one = [r["loss"] for r in read_log(tmp_path / "one") if "loss" in r]
    two = [r["loss"] for r in read_log(tmp_path / "two") if "loss" in r]
    assert len(one) == len(two) == steps
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-5)  # same global batch; only reduction order differs
    a = read_checkpoint_file(tmp_path / "one" / "checkpoints" / f"step_{steps:08d}.safetensors")["model"]
    b = read_checkpoint_file(tmp_path / "two" / "checkpoints" / f"step_{steps:08d}.safetensors")["model"]
    last_bias = "head.mlp.2.bias"  # BT gradients cancel on it (r_w - r_l): Adam turns rounding noise into steps
    for key in a:
        if key != last_bias:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-4, msg=key)
    # The FSDP run's exported checkpoint loads like any other.
    base = config_for(tmp_path / "two").base
    RewardEngine.from_pretrained(tmp_path / "two" / "reward", base, dtype=torch.float32)


def test_fsdp_two_processes_match_one(task: dict, tmp_path: Path) -> None:
    common = {"steps": 6, "batch_size": 8, "log_every": 1}
    fsdp_matches_one_process(lambda out: config(task, out, **common), tmp_path, steps=6)


def test_probe_prints_layers_and_plots(task: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from training.probe import main

    main(
        [
            "--cache",
            str(task["cache"]),
            "--train-json",
            str(task["train"]),
            "--val-json",
            str(task["val"]),
            "--base",
            str(task["base"]),
            "--out",
            str(tmp_path),
            "--group-size",
            "2",
        ]
    )
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "probe.json").read_text())
    assert len(result["per_layer"]) == 4 and all(0.0 <= a <= 1.0 for a in result["per_layer"])
    assert "val acc t=0.1" in printed and "2-3" in printed
    assert (tmp_path / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gradient_checkpointing_gives_the_same_gradients(task: dict) -> None:
    torch.manual_seed(0)
    engine = RewardEngine.from_base(task["base"], dtype=torch.float32, head_hidden=[16])
    engine.requires_grad_(True)
    batch = LatentCache(task["cache"]).batch(read_file(task["val"], None)[:4])
    args = (torch.stack(batch["winners"]), batch["prompt_embeds"], batch["pooled"])
    noise = torch.randn_like(args[0])
    grads = []
    for checkpointing in (False, True):
        engine.zero_grad(set_to_none=True)
        TrainableReward(engine, grad_checkpointing=checkpointing)(*args, noise=noise).sum().backward()
        grads.append({n: p.grad.clone() for n, p in engine.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 100
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)
