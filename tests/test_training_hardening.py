"""The trainer against hostile or unlucky surroundings: pickles planted where resume looks, a full disk, two runs on
one out_dir, data changed under a checkpoint, and problems that must be refused before the first step."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_training import Killed, kill_at, make_split

from bench.tiny_base import default_tiny_base
from training.cache import build_cache
from training.checkpoint import latest_checkpoint
from training.config import TrainConfig
from training.train import train

# Helpers that only the hardened trainer has are imported inside the tests that use them, so that each test fails on
# its own assertion, not at collection, when run against a trainer without them.


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("small")
    train_json, val_json = make_split(root, "train", 24, seed=0), make_split(root, "val", 8, seed=1)
    base = default_tiny_base()
    cache = build_cache(
        [train_json, val_json], base, root / "cache", max_sequence_length=16, area=64 * 64, progress=False
    )
    return {"root": root, "train": train_json, "val": val_json, "base": base, "cache": cache}


def config(small: dict, out_dir: Path, **overrides) -> TrainConfig:
    values = {
        "cache": str(small["cache"]),
        "train_json": [str(small["train"])],
        "val_json": [str(small["val"])],
        "base": str(small["base"]),
        "head_hidden": [16],
        "mode": "frozen",
        "steps": 4,
        "batch_size": 4,
        "checkpoint_every": 1,
        "keep_checkpoints": 10,
        "eval_batch_size": 8,
        "out_dir": str(out_dir),
    }
    return TrainConfig(**{**values, **overrides})


# ------------------------------------------------------------------------------------------------ no unpickling


class _Payload:
    """Unpickling this writes `marker`: what a planted checkpoint could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_resume_never_unpickles_a_planted_file(small: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    with pytest.raises(Killed):
        train(config(small, out), on_step=kill_at(2))
    marker = tmp_path / "pwned"
    evil = lambda path: torch.save({"step": 9, "model": {}, "optimizer": {}, "x": _Payload(marker)}, path)
    checkpoints = out / "checkpoints"
    names = [
        "step_00000009.safetensors",  # the names resume reads, newer than the real checkpoints ...
        "step_00000010.pt",  # ... the pickled format of older versions ...
        "step_00000003.pt",
        ".step_00000011.safetensors.tmp-1",  # ... and a crashed writer's temp files
        ".step_00000011.pt.tmp-1",
        "latest.pt",
    ]
    for name in names:
        evil(checkpoints / name)
    evil(out / "reward.pt")

    path, payload = latest_checkpoint(out)
    printed = capsys.readouterr().out
    assert not marker.exists()
    assert path.name == "step_00000002.safetensors" and payload["step"] == 2
    assert f"skipping unreadable checkpoint {checkpoints / 'step_00000009.safetensors'}" in printed
    assert f"ignoring {checkpoints / 'step_00000010.pt'}: pickled checkpoints are never loaded" in printed

    train(config(small, out))  # resumes from step 2 past every planted file
    assert not marker.exists()
    assert "resumed from" in capsys.readouterr().out


def test_no_code_outside_tests_can_unpickle() -> None:
    """Nothing unpickles, except DiNa-LRM's published rm_head.pt, read by torch's restricted unpickler only."""
    repo = Path(__file__).resolve().parents[1]
    sanctioned = repo / "engine" / "io" / "dina.py"
    hits = []
    for folder in ("engine", "kernels", "bench", "training"):
        for path in (repo / folder).rglob("*.py"):
            text = path.read_text()
            if path == sanctioned:
                loads = text.split("torch.load(")[1:]
                assert len(loads) == 1 and "weights_only=True" in loads[0].split(")")[0], "rm_head.pt: weights_only"
                text = text.replace("torch.load(", "")
            hits += [
                f"{path}: {word}" for word in ("weights_only=False", "torch.load(", "import pickle") if word in text
            ]
    assert not hits, hits


def test_checkpoint_state_round_trips_exactly(tmp_path: Path) -> None:
    from training.checkpoint import read_checkpoint_file, write_checkpoint_file

    payload = {
        "step": 3,
        "config": {"betas": [0.9, 0.999], "lr": 1e-4, "layers": None, "name": "x"},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 2)}}, "groups": ({"a": 1},)},
        "rng": {"torch": torch.get_rng_state(), "cuda": None},
        "bf16": torch.randn(3, dtype=torch.bfloat16),
    }
    write_checkpoint_file(tmp_path / "c.safetensors", payload)
    back = read_checkpoint_file(tmp_path / "c.safetensors")
    assert back.keys() == payload.keys() and back["config"] == payload["config"]
    assert list(back["optimizer"]["state"]) == [0] and back["optimizer"]["groups"] == ({"a": 1},)
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], payload["optimizer"]["state"][0]["exp_avg"])
    assert torch.equal(back["rng"]["torch"], payload["rng"]["torch"]) and back["bf16"].dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------- disk and lock


def test_a_full_disk_is_reported_with_the_bytes_needed(
    small: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.checkpoint
    from engine.io.atomic import DiskFullError

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(training.checkpoint, "save_file", no_space)
    out = tmp_path / "run"
    with pytest.raises(
        DiskFullError, match=r"disk full writing .*step_00000001\.safetensors: it needs about \d+ bytes"
    ):
        train(config(small, out))
    assert not list((out / "checkpoints").glob(".*tmp*"))  # the temp file is removed


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 256 KiB tmpfs (needs root and mount permission; skipped otherwise)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_real_full_disk_keeps_the_old_file(tiny_disk: Path) -> None:
    from engine.io.atomic import DiskFullError, atomic_write_text
    from training.cache import _save_shard
    from training.checkpoint import read_checkpoint_file, write_checkpoint_file

    target = tiny_disk / "step_00000001.safetensors"
    write_checkpoint_file(target, {"step": 1, "w": torch.zeros(1000)})
    with pytest.raises(DiskFullError, match=r"needs about 4\d{6} bytes and \d+ bytes are free"):
        write_checkpoint_file(target, {"step": 2, "w": torch.zeros(1_000_000)})  # 4 MB onto a 256 KiB disk
    assert read_checkpoint_file(target)["step"] == 1  # old-or-new: the old file is whole
    with pytest.raises(DiskFullError, match="disk full writing .*images-00000.safetensors"):
        _save_shard({"0": torch.zeros(1_000_000)}, tiny_disk / "images-00000.safetensors")
    with pytest.raises(DiskFullError, match="index.json"):
        atomic_write_text(tiny_disk / "index.json", "x" * 1_000_000)
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["step_00000001.safetensors"]


def test_two_trainers_on_one_out_dir_are_refused(small: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    hold = (
        "import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
        "f.truncate(0); f.write(str(os.getpid())); f.flush(); print('locked', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"in use by another training run \(process {holder.pid} holds"):
            train(config(small, out))
        assert not (out / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    # The dead holder's lock file stays behind, with its pid: the kernel released the lock, so it does not block.
    assert (out / ".lock").read_text() == str(holder.pid)
    train(config(small, out, steps=1))


# ------------------------------------------------------------------------------------------- data fingerprint


def test_resume_on_changed_data_is_refused_unless_told(small: dict, tmp_path: Path) -> None:
    data = small["root"] / "edited-train.json"  # beside the original, so its relative paths resolve the same
    records = json.loads(small["train"].read_text())
    data.write_text(json.dumps(records))
    common = {"train_json": [str(data)]}
    out = tmp_path / "run"
    with pytest.raises(Killed):
        train(config(small, out, **common), on_step=kill_at(2))

    edited = [dict(r) for r in records]
    edited[0]["confidence"] = 0.97  # still kept by the 0.95 filter: the same pairs, another label
    data.write_text(json.dumps(edited))
    with pytest.raises(
        ValueError, match=rf"training inputs changed .*train_json {data}: changed.*resume_on_changed_data"
    ):
        train(config(small, out, **common))
    data.write_text(json.dumps(records[:-1]))  # one pair fewer
    with pytest.raises(ValueError, match=r"training pairs: changed"):
        train(config(small, out, **common))
    assert max(int(p.stem[5:]) for p in (out / "checkpoints").glob("step_*.safetensors")) == 2  # nothing ran

    from training.checkpoint import read_checkpoint_file

    metrics = train(config(small, out, **common, resume_on_changed_data=True))
    assert "val_accuracy" in metrics
    assert read_checkpoint_file(out / "checkpoints" / "step_00000004.safetensors")["step"] == 4


# ------------------------------------------------------------------------------------------- before step one


def test_a_stray_file_in_the_export_folder_is_refused_before_training(small: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    (out / "reward").mkdir(parents=True)
    (out / "reward" / "notes.txt").write_text("mine")
    steps = []
    with pytest.raises(ValueError, match=r"reward holds files that are not part of a reward checkpoint \(notes\.txt\)"):
        train(config(small, out), on_step=lambda step, metrics: steps.append(step))
    assert steps == [] and not (out / "checkpoints").exists()


def test_the_trainer_applies_the_path_rule(small: dict, tmp_path: Path) -> None:
    records = json.loads(small["train"].read_text())
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))  # relative paths, now resolved against tmp_path: missing
    with pytest.raises(ValueError, match=r"record 0: missing image"):
        train(config(small, tmp_path / "a", train_json=[str(data)]))
    for r in records:
        r["path1"], r["path2"] = str(small["root"] / r["path1"]), str(small["root"] / r["path2"])
    data.write_text(json.dumps(records))  # absolute paths outside the JSON's folder
    with pytest.raises(ValueError, match=rf"{data} record 0: path1 .* outside the image root {tmp_path}"):
        train(config(small, tmp_path / "b", train_json=[str(data)]))
    train(config(small, tmp_path / "c", train_json=[str(data)], allow_outside_root=True, steps=1))
