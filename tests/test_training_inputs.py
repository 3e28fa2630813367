"""The training tools against inputs a careless user or an attacker gives them: values out of
the model's range refused by the schemas with the field named, image contents and hard links, non-finite losses,
FIFOs, a full disk at the final export, damaged or escaping cache files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageOps
from test_training import REPO, Killed, kill_at, make_split
from test_training_hardening import config, small  # noqa: F401 (a fixture)

from bench.tiny_base import default_tiny_base
from engine.config import PRESETS, BackboneConfig
from engine.io.backbone import base_source
from training.cache import LatentCache, build_cache
from training.checkpoint import latest_checkpoint, read_checkpoint_file
from training.config import TrainConfig, load_config
from training.data import read_file
from training.train import train

# Helpers that only the hardened tools have are imported inside the tests that use them, so that each test fails on its
# own assertion, not at collection, when run against the code before them.
REQUIRED = {"cache": "c", "base": "b", "train_json": ["t"], "val_json": ["v"]}


def tiny_backbone() -> BackboneConfig:
    return base_source(default_tiny_base())[0]


# ------------------------------------------------------------------------------------------------------- bounds


def test_lora_settings_beyond_any_model_are_refused_by_field() -> None:
    with pytest.raises(ValueError, match=r"^TrainConfig: lora_alpha: got 1e\+38, expected at most 64 x lora_rank"):
        TrainConfig(**REQUIRED, mode="lora", lora_alpha=1e38)
    with pytest.raises(ValueError, match=r"^key=value arguments: lora_rank: got 100000000, expected a value <= 2432$"):
        load_config(None, ["cache=c", "base=b", "train_json=t", "val_json=v", "lora_rank=100000000"])
    with pytest.raises(ValueError, match=r"lora_alpha: got 'Infinity', expected a number"):
        load_config(None, ["cache=c", "base=b", "train_json=t", "val_json=v", "lora_alpha=Infinity"])
    for field, value in {"head_hidden": [10**9], "layers": [10**6], "seed": -1, "eval_batch_size": 0}.items():
        with pytest.raises(ValueError, match=rf"^TrainConfig: {field}(\[0\])?: got"):
            TrainConfig(**REQUIRED, **{field: value})


def test_a_rank_wider_than_the_base_is_refused_before_any_work(small: dict, tmp_path: Path) -> None:  # noqa: F811
    width = tiny_backbone().hidden_size
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=rf"lora_rank: got {width + 1}, expected at most {width}, the base's width"):
        train(config(small, out, mode="lora", lora_rank=width + 1, lora_alpha=float(width + 1)))
    assert not out.exists()


def test_the_train_command_line_goes_through_the_schema(tmp_path: Path) -> None:
    from training.train import main

    with pytest.raises(ValueError, match=r"key=value arguments: lora_alpha: got 1e\+38"):
        main([*(f"{k}={v if isinstance(v, str) else v[0]}" for k, v in REQUIRED.items()), "lora_alpha=1e38"])
    with pytest.raises(SystemExit):
        main(["--config", ""])  # an empty path: refused naming --config


def test_the_probe_refuses_a_negative_top(capsys: pytest.CaptureFixture) -> None:
    from training.probe import main

    common = ["--cache", "c", "--train-json", "t.json", "--val-json", "v.json", "--base", "b", "--similarity"]
    with pytest.raises(SystemExit) as exit_:
        main([*common, "--top", "-3"])
    assert exit_.value.code == 2 and "--top: got -3, expected a value >= 1" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- cache area


def test_the_cache_area_defaults_to_what_the_base_takes(tmp_path: Path) -> None:
    """On the tiny base (no --area) the cache builds at the largest area whose buckets fit its position embedding;
    SD3.5-L's default stays 1024^2."""
    data = make_split(tmp_path, "d", 2, seed=0)
    out = build_cache([data], default_tiny_base(), tmp_path / "cache", max_sequence_length=8, progress=False)

    from training.buckets import aspect_buckets, largest_area, max_image_side
    from training.cache import DEFAULT_AREA

    side = max_image_side(tiny_backbone())
    area = largest_area(side)
    assert max(max(b) for b in aspect_buckets(area)) <= side < max(max(b) for b in aspect_buckets(area + 1))
    assert min(DEFAULT_AREA, largest_area(max_image_side(PRESETS["sd35-large"]))) == 1024 * 1024
    cache = LatentCache(out)
    assert cache.settings["area"] == min(DEFAULT_AREA, area)
    pair = read_file(data, None)[0]
    height, width = cache.bucket(pair.winner)
    assert cache.latent(pair.winner).shape[-2:] == (height // 8, width // 8)


def test_an_area_the_base_cannot_take_is_refused_before_any_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import engine.pixel
    from training.buckets import largest_area, max_image_side
    from training.cache import main

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(engine.pixel.PixelFrontEnd, "from_pretrained", never)
    data = make_split(tmp_path, "d", 2, seed=0)
    limit = largest_area(max_image_side(tiny_backbone()))
    for area in (10**10, limit + 1):
        args = ["--json", str(data), "--base", str(default_tiny_base()), "--out", str(tmp_path / "c"), "--area"]
        with pytest.raises(ValueError, match=rf"--area: got {area}, expected at most {limit}, the largest area"):
            main([*args, str(area)])
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------------------------------------ image contents


def test_changed_image_contents_refuse_resume_unless_told(tmp_path: Path) -> None:
    root = tmp_path / "data"
    train_json, val_json = make_split(root, "train", 16, seed=0), make_split(root, "val", 8, seed=1)
    base = default_tiny_base()
    build = lambda: build_cache([train_json, val_json], base, root / "cache", 16, area=64 * 64, progress=False)
    build()
    cfg = {"cache": str(root / "cache"), "train_json": [str(train_json)], "val_json": [str(val_json)]}
    small_data = {"cache": root / "cache", "train": train_json, "val": val_json, "base": base}
    out = tmp_path / "run"
    with pytest.raises(Killed):
        train(config(small_data, out, **cfg), on_step=kill_at(2))
    for image in (root / "train").glob("*.png"):  # every image inverted in place, names and JSON unchanged
        with Image.open(image) as pixels:
            inverted = ImageOps.invert(pixels.convert("RGB"))
        inverted.save(image)
    shutil.rmtree(root / "cache")
    build()  # the cache rebuilt from the changed images
    with pytest.raises(ValueError, match=r"training inputs changed .*image contents: changed"):
        train(config(small_data, out, **cfg))
    train(config(small_data, out, **cfg, resume_on_changed_data=True))
    assert read_checkpoint_file(out / "checkpoints" / "step_00000004.safetensors")["step"] == 4


def test_hard_links_and_copies_are_the_same_image(tmp_path: Path) -> None:
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    os.link(tmp_path / "a.png", tmp_path / "link.png")
    shutil.copyfile(tmp_path / "a.png", tmp_path / "copy.png")
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "p", "path1": "a.png", "path2": "link.png"}]))
    with pytest.raises(ValueError, match=r"record 0: path1 and path2 are the same image .*hard links"):
        read_file(path, None)
    path.write_text(json.dumps([{"prompt": "p", "path1": "a.png", "path2": "copy.png"}]))
    assert len(read_file(path, None)) == 1  # two files: only their bytes say they are one image
    with pytest.raises(ValueError, match=r"record 0: path1 .*a\.png and path2 .*copy\.png hold the same image"):
        build_cache([path], default_tiny_base(), tmp_path / "cache", 8, area=64 * 64, progress=False)


# ------------------------------------------------------------------------------------------------- the run


def test_a_non_finite_loss_stops_the_run_and_keeps_the_checkpoints(
    small: dict,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import training.train

    poisoned = []
    real = training.train.preference_loss
    monkeypatch.setattr(training.train, "preference_loss", lambda *a: real(*a) * (float("nan") if poisoned else 1.0))
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"^step 3: the loss is nan .*checkpoints already written are intact"):
        train(config(small, out), on_step=lambda step, metrics: poisoned.append(step) if step == 2 else None)
    found = latest_checkpoint(out)
    assert found is not None and found[1]["step"] == 2
    assert all(torch.isfinite(v).all() for v in found[1]["model"].values())


def test_latest_checkpoint_never_opens_a_fifo(tmp_path: Path) -> None:
    """In a child process: safetensors opens a file holding the GIL, so a blocked open would stall a thread's caller."""
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    os.mkfifo(directory / "step_00000005.safetensors")
    code = "import sys; from training.checkpoint import latest_checkpoint; print(latest_checkpoint(sys.argv[1]))"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        pytest.fail("latest_checkpoint blocked on a FIFO named like a checkpoint")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "None" and "step_00000005.safetensors" in done.stdout


def test_a_full_disk_at_the_final_export_names_the_path(
    small: dict,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from safetensors import SafetensorError

    import engine.io.checkpoint
    from engine.io.atomic import DiskFullError

    real = engine.io.checkpoint.save_file

    def backbone_fills_the_disk(tensors: dict, filename: str, *args, **kwargs) -> None:
        if Path(filename).name == engine.io.checkpoint.BACKBONE_FILE:  # the text safetensors writes on ENOSPC
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(engine.io.checkpoint, "save_file", backbone_fills_the_disk)
    out = tmp_path / "run"
    with pytest.raises(DiskFullError, match=rf"disk full writing {out / 'reward'}: it needs about \d+ bytes"):
        train(config(small, out, mode="full", steps=2))
    assert not (out / "reward").exists() and latest_checkpoint(out)[1]["step"] == 2


# ------------------------------------------------------------------------------------------------ cache files


@pytest.fixture
def cache_copy(small: dict, tmp_path: Path) -> Path:  # noqa: F811
    return Path(shutil.copytree(small["cache"], tmp_path / "cache"))


def test_a_half_truncated_shard_is_refused_naming_it(small: dict, cache_copy: Path, tmp_path: Path) -> None:  # noqa: F811
    shard = cache_copy / "images-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{shard}: cache shard cannot be read .*rerun python -m training.cache"):
        LatentCache(cache_copy)
    steps = []
    with pytest.raises(ValueError, match="images-00000.safetensors: cache shard cannot be read"):
        train(config(small, tmp_path / "run", cache=str(cache_copy)), on_step=lambda s, m: steps.append(s))
    assert steps == []


def test_cache_index_paths_stay_inside_the_cache(cache_copy: Path, tmp_path: Path) -> None:
    index_path = cache_copy / "index.json"
    index = json.loads(index_path.read_text())
    outside = tmp_path / "images-00009.safetensors"
    shutil.copyfile(cache_copy / index["shards"][0]["file"], outside)
    for name in ("../images-00009.safetensors", str(outside)):
        index_path.write_text(json.dumps({**index, "shards": [{**index["shards"][0], "file": name}]}))
        with pytest.raises(ValueError, match=rf"{index_path}: shards\[0\]\.file: got"):
            LatentCache(cache_copy)
    # a shard name of the right form that is a symlink out of the folder
    (cache_copy / "images-00009.safetensors").symlink_to(outside)
    old = index["shards"][0]["file"]
    shard = {**index["shards"][0], "file": "images-00009.safetensors"}
    images = {k: [shard["file"] if f == old else f, row] for k, (f, row) in index["images"].items()}
    index_path.write_text(json.dumps({**index, "shards": [shard, *index["shards"][1:]], "images": images}))
    with pytest.raises(ValueError, match=r"shards\[0\]\.file: 'images-00009.safetensors' resolves to .*, outside"):
        LatentCache(cache_copy)
    index_path.write_text('{"format": ' * 100_000)  # deeply nested: refused by the reader, no RecursionError
    with pytest.raises(ValueError, match=str(index_path)):
        LatentCache(cache_copy)


def test_deep_or_huge_json_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    for text, expected in [
        ("[" * 100_000, "nested too deep"),
        ('[{"prompt": "p", "path1": "a", "path2": "b", "confidence": ' + "9" * 5000 + "}]", "5000 digits"),
    ]:
        path.write_text(text)
        with pytest.raises(ValueError, match=rf"^{path}: .*{expected}"):
            read_file(path, None)
        with pytest.raises(ValueError, match=rf"^{path}: .*{expected}"):
            load_config(path)
