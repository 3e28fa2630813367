"""Hub ids where a local path is expected, resolved offline against a cache in the real huggingface_hub layout."""

from __future__ import annotations

import hashlib
import os
import shutil

import huggingface_hub
import huggingface_hub.constants
import huggingface_hub.errors
import pytest
import torch

from bench.tiny_base import default_tiny_base
from engine import RewardEngine
from engine.io import hub

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(cache, repo_id, source, skip=()):
    """Copy `source` into `cache` as huggingface_hub stores a download: content-addressed blobs, a snapshot of
    relative symlinks into them, and refs/main naming the snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    for path in sorted(source.rglob("*")):
        if path.is_dir() or any(path.match(p) for p in skip):
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, repo / "blobs" / digest)
        link = snapshot / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / digest, link.parent))
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_checkpoint_and_base_resolve_from_the_cache(offline_cache, tmp_path):
    base = default_tiny_base()
    engine = RewardEngine.from_base(base, dtype=torch.float32, kernels_backend="torch")
    torch.manual_seed(0)
    for p in engine.head.parameters():
        p.data.normal_()
    engine.save_pretrained(tmp_path / "ckpt", include_backbone=False)
    _cache_repo(offline_cache, "org/reward", tmp_path / "ckpt")
    snapshot = _cache_repo(offline_cache, "stabilityai/tiny-sd35", base)

    loaded = RewardEngine.from_pretrained(
        "org/reward", base="stabilityai/tiny-sd35", dtype=torch.float32, kernels_backend="torch"
    )
    assert loaded.base_path == snapshot  # the pixel front end finds the VAE and encoders there too
    z, prompt = torch.randn(2, 16, 8, 8), (torch.randn(2, 5, 96), torch.randn(2, 80))
    torch.testing.assert_close(loaded.score(z, prompt, seed=3), engine.score(z, prompt, seed=3), rtol=0, atol=0)


def test_a_local_folder_wins_over_a_hub_id(offline_cache, tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub.resolve("org/name", "base model") == hub.Path("org/name")


def test_missing_ids_say_what_to_do(offline_cache, monkeypatch):
    with pytest.raises(FileNotFoundError, match="'org/absent' is neither a local path nor in the local Hugging Face"):
        RewardEngine.from_pretrained("org/absent")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def no_network(*args, local_files_only=False, **kwargs):
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(FileNotFoundError, match=r"downloading it failed \(ConnectionError: Failed to resolve"):
        RewardEngine.from_base("org/absent")


def test_pickles_and_the_single_file_copy_are_not_fetched(offline_cache, monkeypatch):
    seen = {}

    def record(**kwargs):
        seen.update(kwargs)
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", record)
    with pytest.raises(FileNotFoundError):
        hub.resolve("stabilityai/stable-diffusion-3.5-large", "base model", hub.BASE_FILES)
    assert "*.bin" in seen["ignore_patterns"] and "*.safetensors" not in seen["allow_patterns"]
    assert "transformer/*" in seen["allow_patterns"]


def test_a_dina_checkpoint_resolves_from_the_cache(offline_cache, tmp_path):
    """`from_pretrained("liuhuohuo/DiNa-LRM-SD35M-12layers", base="stabilityai/stable-diffusion-3.5-medium")` is the
    whole set-up: their layout (rm_head.pt included) and the base both come from the hub cache."""
    pytest.importorskip("peft")
    from test_dina import write_base, write_dina

    base = write_base(tmp_path)
    ckpt = write_dina(tmp_path, base, [1, 3], [3])
    _cache_repo(offline_cache, "liuhuohuo/DiNa-LRM-SD35M-12layers", ckpt)
    _cache_repo(offline_cache, "stabilityai/stable-diffusion-3.5-medium", base)
    kw = dict(dtype=torch.float32, kernels_backend="torch")
    local = RewardEngine.from_pretrained(ckpt, base=base, **kw)
    hubbed = RewardEngine.from_pretrained(
        "liuhuohuo/DiNa-LRM-SD35M-12layers", base="stabilityai/stable-diffusion-3.5-medium", **kw
    )
    z, prompt = torch.randn(2, 16, 8, 10), (torch.randn(2, 5, 96), torch.randn(2, 80))
    for t in (0.1, 0.7):
        torch.testing.assert_close(hubbed.score(z, prompt, seed=1, t=t), local.score(z, prompt, seed=1, t=t))


def test_a_reward_checkpoint_fetches_its_files_and_no_other_pickle():
    from huggingface_hub.utils import filter_repo_objects

    repo = [
        "reward_config.json", "head.safetensors", "backbone.safetensors", "config.json", "README.md",
        "checkpoint/backbone_lora/adapter_config.json", "checkpoint/backbone_lora/adapter_model.safetensors",
        "checkpoint/rm_head.pt", "checkpoint/optimizer.pt", "rm_head.pt", "pytorch_model.bin", "ema.pkl",
    ]  # fmt: skip
    fetched = set(filter_repo_objects(repo, allow_patterns=hub.REWARD_FILES, ignore_patterns=hub.PICKLES))
    assert fetched == {
        "reward_config.json", "head.safetensors", "backbone.safetensors", "config.json",
        "checkpoint/backbone_lora/adapter_config.json", "checkpoint/backbone_lora/adapter_model.safetensors",
        "checkpoint/rm_head.pt",
    }  # fmt: skip
