"""Loading a base model from files an attacker or a careless user wrote: every refusal names the file and the field,
nothing outside the base directory is opened, nothing blocks."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from bench.tiny_base import default_tiny_base
from engine import RewardEngine

INDEX = "diffusion_pytorch_model.safetensors.index.json"


@pytest.fixture
def base(tmp_path):
    """A private copy of the tiny base's transformer (the shared one must stay intact)."""
    root = tmp_path / "base"
    shutil.copytree(default_tiny_base() / "transformer", root / "transformer")
    return root


def _edit_index(base, edit):
    path = base / "transformer" / INDEX
    index = json.loads(path.read_text())
    path.write_text(json.dumps(edit(index)))
    return path


def _load(base):
    return RewardEngine.from_base(base, dtype=torch.float32, kernels_backend="torch")


def test_the_untouched_copy_loads(base):
    assert _load(base).score(torch.randn(1, 16, 8, 8), (torch.randn(1, 5, 96), torch.randn(1, 80)), seed=0).isfinite()


def test_a_weight_map_cannot_reach_outside_the_base(base, tmp_path):
    first = sorted((base / "transformer").glob("*.safetensors"))[0]
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(first, outside)

    def escape(index):
        key = next(k for k, v in index["weight_map"].items() if v == first.name)
        index["weight_map"][key] = "../../elsewhere.safetensors"
        return index

    path = _edit_index(base, escape)
    with pytest.raises(
        ValueError, match=rf"{path}: weight_map\[.*\]: '../../elsewhere.safetensors' resolves to .*outside"
    ):
        _load(base)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda index: {**index, "weight_map": list(index["weight_map"])}, r"weight_map: got \[.*, expected an object"),
        (
            lambda index: {**index, "weight_map": dict.fromkeys(index["weight_map"], 3)},
            r"weight_map\..*: got 3, expected text",
        ),
        (lambda index: {**index, "weight_map": {}}, "weight_map: got {}, expected at least 1 item"),
        (lambda index: {"metadata": {}}, "weight_map: missing"),
    ],
)
def test_malformed_weight_maps_are_named(base, edit, message):
    path = _edit_index(base, edit)
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        _load(base)


def test_truncated_index_and_deep_config_are_named(base):
    path = base / "transformer" / INDEX
    path.write_text(path.read_text()[:40])
    with pytest.raises(ValueError, match=f"{path}: not valid JSON: .* at line \\d+ column"):
        _load(base)
    config = base / "transformer" / "config.json"
    config.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=f"{config}: JSON nested"):
        _load(base)


def test_a_config_cannot_ask_for_a_huge_model(base):
    config = base / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_layers": 10**9}))
    with pytest.raises(ValueError, match=f"{config}: num_layers: got 1000000000, expected a value <= 256"):
        _load(base)


def test_fifo_shards_are_refused_without_blocking(base):
    shard = sorted((base / "transformer").glob("*.safetensors"))[0]
    shard.unlink()
    os.mkfifo(shard)
    with pytest.raises(ValueError, match=f"{shard}: weights file is a FIFO"):
        _load(base)
