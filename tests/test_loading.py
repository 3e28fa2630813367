"""Loading paths give the same engine: diffusers directory (sharded), original single file, in-memory model, and our
reward checkpoint; broken files fail with errors that name the key and the file."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_diffusers_transformer, random_inputs
from safetensors.torch import load_file, save_file

from engine import RewardEngine
from engine.io.single_file import diffusers_to_original

LAYERS = (1, 3)


@pytest.fixture(scope="module")
def model():
    return make_diffusers_transformer(seed=11)


@pytest.fixture(scope="module")
def inputs():
    return random_inputs(batch=2, h=8, w=10, text_len=13, seed=12)


@pytest.fixture(scope="module")
def expected(model, inputs):
    z0, pe, po, noise = inputs
    return RewardEngine.from_diffusers(model, layers=LAYERS, kernels_backend="torch").features(
        z0, (pe, po), noise=noise
    )


@pytest.fixture(scope="module")
def diffusers_dir(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("sd3") / "transformer"
    model.save_pretrained(path, max_shard_size="100KB")
    return path.parent


@pytest.fixture(scope="module")
def single_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("sd3file") / "sd3_tiny.safetensors"
    original = diffusers_to_original(model.state_dict(), model.config.num_layers)
    save_file({k: v.contiguous() for k, v in original.items()}, str(path))
    return path


def features(engine, inputs):
    z0, pe, po, noise = inputs
    return engine.features(z0, (pe, po), noise=noise)


def test_diffusers_directory_is_sharded_and_loads_identically(diffusers_dir, inputs, expected):
    assert (diffusers_dir / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    engine = RewardEngine.from_base(diffusers_dir, layers=LAYERS, dtype=torch.float32, kernels_backend="torch")
    assert engine.config.preset_name() == "tiny"  # preset inferred from transformer/config.json
    assert torch.equal(features(engine, inputs), expected)


def test_inverse_key_mapping_agrees_with_diffusers_converter(model, single_file):
    """Our diffusers->original inverse, fed to diffusers' own converter, gives back the diffusers state dict."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    converted = convert_sd3_transformer_checkpoint_to_diffusers(load_file(str(single_file)))
    state = model.state_dict()
    assert set(converted) == set(state)
    for key, value in state.items():
        assert torch.equal(converted[key], value), key


def test_single_file_loads_identically(single_file, inputs, expected):
    engine = RewardEngine.from_base(single_file, layers=LAYERS, dtype=torch.float32, kernels_backend="torch")
    assert torch.equal(features(engine, inputs), expected)


def test_reward_checkpoint_round_trip(diffusers_dir, single_file, inputs, tmp_path):
    z0, pe, po, noise = inputs
    engine = RewardEngine.from_base(diffusers_dir, layers=LAYERS, dtype=torch.float32, kernels_backend="torch")
    with torch.no_grad():
        for p in engine.head.parameters():
            p.add_(torch.randn_like(p))
    before = engine.score(z0, (pe, po), noise=noise)
    engine.save_pretrained(tmp_path / "reward")
    meta = json.loads((tmp_path / "reward" / "reward_config.json").read_text())
    assert meta["reward"]["layers"] == list(LAYERS) and meta["backbone_weights"] is None
    for base in (diffusers_dir, single_file):
        again = RewardEngine.from_pretrained(
            tmp_path / "reward", base=base, dtype=torch.float32, kernels_backend="torch"
        )
        assert torch.equal(again.score(z0, (pe, po), noise=noise), before)
    # A checkpoint carrying its (fine-tuned) backbone needs no base; the second save replaces the first atomically.
    with torch.no_grad():
        engine.backbone.transformer_blocks[0].ff.net[2].bias.add_(0.5)
    tuned = engine.score(z0, (pe, po), noise=noise)
    engine.save_pretrained(tmp_path / "reward", include_backbone=True)
    again = RewardEngine.from_pretrained(tmp_path / "reward", dtype=torch.float32, kernels_backend="torch")
    assert torch.equal(again.score(z0, (pe, po), noise=noise), tuned)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reward"]  # no temp or old dirs left behind


def test_checkpoint_without_backbone_needs_a_base(diffusers_dir, tmp_path):
    RewardEngine.from_base(diffusers_dir, layers=LAYERS, dtype=torch.float32).save_pretrained(tmp_path / "r")
    with pytest.raises(ValueError, match="base="):
        RewardEngine.from_pretrained(tmp_path / "r")


def test_corrupt_file_is_named(diffusers_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(diffusers_dir, broken)
    shard = sorted((broken / "transformer").glob("*.safetensors"))[0]
    shard.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match=shard.name):
        RewardEngine.from_base(broken, layers=LAYERS)


@pytest.mark.parametrize("damage", ["missing", "unexpected", "shape"])
def test_bad_keys_are_named(single_file, tmp_path, damage):
    state = load_file(str(single_file))
    key = "model.diffusion_model.joint_blocks.1.x_block.mlp.fc2.bias"
    if damage == "missing":
        del state[key]
        match = "missing key 'transformer_blocks.1.ff.net.2.bias'"
    elif damage == "unexpected":
        state["model.diffusion_model.joint_blocks.1.x_block.mlp.fc3.bias"] = torch.zeros(3)
        match = "unexpected key 'joint_blocks.1.x_block.mlp.fc3.bias'"
    else:
        state[key] = torch.zeros(7)
        match = "shape mismatch for 'transformer_blocks.1.ff.net.2.bias'"
    path = tmp_path / "damaged.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match=match) as info:
        RewardEngine.from_base(path, layers=LAYERS)
    assert "damaged.safetensors" in str(info.value)


def test_unused_blocks_are_not_loaded(diffusers_dir):
    engine = RewardEngine.from_base(diffusers_dir, layers=(0, 1), dtype=torch.float32)
    names = {n for n, _ in engine.backbone.named_parameters()}
    assert not any(
        n.startswith(("transformer_blocks.2", "transformer_blocks.3", "norm_out", "proj_out")) for n in names
    )
    assert "transformer_blocks.1.attn.add_q_proj.weight" not in names
    assert "transformer_blocks.1.ff_context.net.2.weight" not in names


def test_from_diffusers_copies_the_weights(model, inputs):
    """The engine must not follow later edits of the model it was built from (e.g. the policy being trained)."""
    engine = RewardEngine.from_diffusers(model, layers=LAYERS, kernels_backend="torch")
    own = {p.data_ptr() for p in engine.backbone.parameters()} | {b.data_ptr() for b in engine.backbone.buffers()}
    theirs = {p.data_ptr() for p in model.parameters()} | {b.data_ptr() for b in model.buffers()}
    assert not own & theirs
    before = features(engine, inputs)
    with torch.no_grad():
        model.context_embedder.weight.mul_(3)
    try:
        assert torch.equal(features(engine, inputs), before)
    finally:
        with torch.no_grad():
            model.context_embedder.weight.div_(3)


def test_new_head_follows_the_backbone_device(diffusers_dir):
    engine = RewardEngine.from_base(diffusers_dir, layers=LAYERS, dtype=torch.float32, device="meta")
    assert {p.device.type for p in engine.parameters()} == {"meta"}


def test_save_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path, monkeypatch):
    engine = RewardEngine.from_preset("tiny", dtype=torch.float32)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "train_log.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"not part of a reward checkpoint \(train_log.txt\)"):
        engine.save_pretrained(tmp_path / "outputs")
    assert (tmp_path / "outputs" / "train_log.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        engine.save_pretrained(tmp_path / "file")
    # "." (a path with no name of its own) works; an existing checkpoint is replaced
    (tmp_path / "ckpt").mkdir()
    monkeypatch.chdir(tmp_path / "ckpt")
    engine.save_pretrained(".")
    monkeypatch.chdir(tmp_path)  # (the save swapped the directory the process stood in)
    engine.save_pretrained("ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["head.safetensors", "reward_config.json"]


def test_fp8_engine_does_not_save_its_e4m3_backbone(tmp_path):
    from engine.runtime.fp8 import quantize_fp8

    engine = RewardEngine.from_preset("tiny", dtype="bf16")
    quantize_fp8(engine.backbone, require_fp8_gpu=False)
    engine.fp8 = True  # what dtype="fp8" sets on a capable GPU
    with pytest.raises(ValueError, match="save the backbone from an engine built with dtype='bf16'"):
        engine.save_pretrained(tmp_path / "r", include_backbone=True)
    engine.save_pretrained(tmp_path / "r")  # the head alone is fine
