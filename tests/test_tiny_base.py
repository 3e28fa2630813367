"""The tiny random SD3.5 base directory: layout, loadability with diffusers, config == the ``tiny`` preset."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from bench.tiny_base import TINY_BASE_VERSION, default_tiny_base, main, make_tiny_base
from engine.config import PRESETS, SD3_LATENT_SCALE, SD3_LATENT_SHIFT, BackboneConfig


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_base(tmp_path_factory.mktemp("tiny-base") / "base", seed=0)


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_layout_matches_sd35(tiny_dir: Path) -> None:
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    expected = {
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"],
    }
    for name, entry in expected.items():
        assert index[name] == entry, name
        assert (tiny_dir / name).is_dir(), name
    for name in ("tokenizer", "tokenizer_2"):
        assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {p.name for p in (tiny_dir / name).iterdir()}
    assert (tiny_dir / "tokenizer_3" / "tokenizer.json").is_file()
    scheduler = json.loads((tiny_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["shift"] == 3.0
    # A few MB at most: the point is a fast fixture.
    assert sum(p.stat().st_size for p in tiny_dir.rglob("*") if p.is_file()) < 8 << 20


def test_transformer_is_sharded_and_is_the_tiny_preset(tiny_dir: Path) -> None:
    from diffusers import SD3Transformer2DModel

    index = json.loads((tiny_dir / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2
    assert all((tiny_dir / "transformer" / s).is_file() for s in shards)
    assert not (tiny_dir / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    model = SD3Transformer2DModel.from_pretrained(tiny_dir, subfolder="transformer")
    assert BackboneConfig.from_diffusers(model.config) == PRESETS["tiny"]


def test_pipeline_loads_and_generates(tiny_dir: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_dir)
    assert (pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor) == (SD3_LATENT_SHIFT, SD3_LATENT_SCALE)
    assert pipe.vae.config.latent_channels == 16 and pipe.vae_scale_factor == 8
    assert pipe.tokenizer.model_max_length == pipe.tokenizer_2.model_max_length == 77
    # Widths chain as in SD3.5: pooled = CLIP-L proj + CLIP-G proj; T5 d_model = joint_attention_dim.
    tiny = PRESETS["tiny"]
    proj = pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    assert proj == tiny.pooled_projection_dim
    assert pipe.text_encoder_3.config.d_model == tiny.joint_attention_dim
    ids = pipe.tokenizer_3("a photo of a cat").input_ids
    assert ids[-1] == pipe.tokenizer_3.eos_token_id == 1 and pipe.tokenizer_3.unk_token_id not in ids
    with torch.no_grad():
        out = pipe("a cat", num_inference_steps=2, height=64, width=48, max_sequence_length=16, output_type="latent")
    assert out.images.shape == (1, 16, 8, 6)


def test_deterministic_per_seed(tiny_dir: Path, tmp_path: Path) -> None:
    again = make_tiny_base(tmp_path / "again", seed=0)
    assert _digests(again) == _digests(tiny_dir)
    other = _digests(make_tiny_base(tmp_path / "other", seed=1))
    shard = next(k for k in other if k.startswith("transformer/") and k.endswith(".safetensors"))
    assert other[shard] != _digests(tiny_dir)[shard]


def test_refuses_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        make_tiny_base(tmp_path)


def test_default_tiny_base_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_dir: Path) -> None:
    monkeypatch.setenv("DIT_REWARD_CACHE", str(tmp_path))
    first = default_tiny_base()
    assert first == tmp_path / TINY_BASE_VERSION
    assert _digests(first) == _digests(tiny_dir)
    stamp = (first / "model_index.json").stat().st_mtime_ns
    assert default_tiny_base() == first
    assert (first / "model_index.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [TINY_BASE_VERSION]  # no scratch left behind


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main([str(tmp_path / "cli"), "--seed", "3"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    assert (tmp_path / "cli" / "model_index.json").is_file()
