"""The trainer's objectives and modes on the tiny base: the three losses (bt, uncertainty, btt) learn, the uncertainty
head's export scores (mean, std) as the trainer does, gradient accumulation equals one large batch (one process and
FSDP2 on two CPU processes) and resumes exactly, LoRA trains adapters + head only and exports a plain checkpoint, and
the training memory count of a preset. Learning runs: frozen for each loss (seconds), LoRA + uncertainty (80 steps).

The task is test_training's (clean vs. strongly noised colour patterns at 64x64), smaller; every fourth training
pair carries a balanced `choice_dist` (a tie for `btt`), the others a decided one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_training import make_split

from bench.tiny_base import default_tiny_base
from engine.api import RewardEngine
from training.cache import LatentCache, build_cache
from training.checkpoint import read_checkpoint_file
from training.config import TrainConfig
from training.data import read_file
from training.lora import DEFAULT_LORA_TARGETS, add_lora
from training.losses import bt_loss, btt_loss, uncertainty_loss
from training.model import TrainableReward
from training.train import pair_ties, preference_loss, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("objectives")
    train_json = make_split(root, "train", 128, seed=0, ties_every=4)
    val_a, val_b = make_split(root, "val_a", 24, seed=1), make_split(root, "val_b", 24, seed=2)
    base = default_tiny_base()
    cache = build_cache(
        [train_json, val_a, val_b],
        base,
        root / "cache",
        max_sequence_length=16,
        shard_size=64,
        area=64 * 64,
        progress=False,
    )
    return {"train": train_json, "val": [val_a, val_b], "base": base, "cache": cache}


def config(task: dict, out_dir: Path, **overrides) -> TrainConfig:
    values = {
        "cache": str(task["cache"]),
        "train_json": [str(task["train"])],
        "val_json": [str(v) for v in task["val"]],
        "base": str(task["base"]),
        "head_hidden": [64],
        "steps": 4,
        "batch_size": 8,
        "lr_backbone": 1e-3,
        "lr_head": 3e-3,
        "log_every": 1,
        "checkpoint_every": 0,
        "eval_batch_size": 16,
        "out_dir": str(out_dir),
    }
    return TrainConfig(**(values | overrides))


def read_log(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def final_state(out_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return read_checkpoint_file(out_dir / "checkpoints" / f"step_{step:08d}.safetensors")["model"]


# ----------------------------------------------------------------------------------------------------- losses


def test_preference_loss_dispatches_to_the_losses_module() -> None:
    g = torch.Generator().manual_seed(0)
    w, lo = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    ties = torch.tensor([True, False, False, True, False, False])
    torch.testing.assert_close(preference_loss("bt", w[:, :1], lo[:, :1], ties), bt_loss(w[:, 0], lo[:, 0]))
    torch.testing.assert_close(preference_loss("btt", w[:, :1], lo[:, :1], ties), btt_loss(w[:, 0], lo[:, 0], ties))
    torch.testing.assert_close(
        preference_loss("uncertainty", w, lo, ties), uncertainty_loss(w[:, 0], w[:, 1], lo[:, 0], lo[:, 1])
    )


def test_ties_come_from_choice_dist(task: dict, tmp_path: Path) -> None:
    pairs = read_file(task["train"], None)
    ties = pair_ties(pairs, tied_threshold=0.1)
    assert ties.tolist() == [i % 4 == 0 for i in range(len(pairs))]  # [5, 5] ties, [9, 1] is decided (0.8 > 0.1)
    assert pair_ties(pairs, tied_threshold=0.85).all()  # |9 - 1| / 10 = 0.8 <= 0.85
    no_votes = tmp_path / "no_votes.json"
    no_votes.write_text(json.dumps([{**json.loads(task["train"].read_text())[0], "choice_dist": None}]))
    plain = read_file(no_votes, None, image_root=task["train"].parent)
    assert plain[0].choice_dist is None and not pair_ties(plain, 0.5).any()  # no votes: a decided pair
    for bad, expected in [
        ([1], r"choice_dist: got \[1\], expected at least 2 item"),
        ([1, -1], r"choice_dist\[1\]: got -1, expected a value >= 0"),
        ([0, 0], r"choice_dist: got \[0, 0\], expected votes for path1 and path2 with a positive sum"),
        (["a", 1], r"choice_dist\[0\]: got 'a', expected a number"),
        (3, r"choice_dist: got 3, expected a list"),
    ]:
        no_votes.write_text(json.dumps([{**json.loads(task["train"].read_text())[0], "choice_dist": bad}]))
        with pytest.raises(ValueError, match=rf"no_votes.json record 0: {expected}"):
            read_file(no_votes, None, image_root=task["train"].parent)


@pytest.mark.parametrize("loss", ["bt", "uncertainty", "btt"])
def test_each_loss_learns_and_reports_each_validation_file(task: dict, tmp_path: Path, loss: str) -> None:
    out = tmp_path / loss
    metrics = train(config(task, out, mode="frozen", loss=loss, steps=150, batch_size=16, lr_head=1e-2, log_every=50))
    before = read_log(out)[0]
    print(f"{loss}: held-out accuracy {before['val_accuracy']:.3f} -> {metrics['val_accuracy']:.3f}")
    assert metrics["val_accuracy"] >= before["val_accuracy"] + 0.15 and metrics["val_accuracy"] >= 0.7
    per_file = metrics["val_accuracy_per_file"]
    assert list(per_file) == [str(v) for v in task["val"]]
    assert metrics["val_accuracy_mean"] == pytest.approx(sum(per_file.values()) / 2)
    assert metrics["val_accuracy"] == pytest.approx(metrics["val_accuracy_mean"])  # two files of 24 pairs each
    saved = json.loads((out / "reward" / "reward_config.json").read_text())
    assert saved["reward"]["head_outputs"] == (2 if loss == "uncertainty" else 1)
    assert saved["metadata"]["training"]["loss"] == loss
    assert saved["metadata"]["training"]["val_accuracy_per_file"] == per_file


# -------------------------------------------------------------------------------------------- uncertainty + LoRA


@pytest.mark.slow
def test_lora_uncertainty_learns_and_exports_scores_like_the_trainer(task: dict, tmp_path: Path) -> None:
    out = tmp_path / "lora"
    common = {"steps": 80, "batch_size": 16, "log_every": 80, "lr_backbone": 3e-3, "lr_head": 1e-2}
    cfg = config(task, out, mode="lora", loss="uncertainty", lora_rank=4, lora_alpha=8.0, save_adapter=True, **common)
    metrics = train(cfg)
    before = read_log(out)[0]["val_accuracy"]
    print(f"lora + uncertainty: held-out accuracy {before:.3f} -> {metrics['val_accuracy']:.3f}")
    assert metrics["val_accuracy"] >= before + 0.15

    # Only the adapters and the head train: the checkpoint holds exactly those.
    state = final_state(out, cfg.steps)
    assert state and all(".lora_A." in k or ".lora_B." in k or k.startswith("head.") for k in state)
    assert any(k.startswith("head.") for k in state) and any(".lora_B." in k for k in state)
    assert any(v.abs().max() > 0 for k, v in state.items() if ".lora_B." in k)  # B moved off its zero init

    # The merged export loads without peft and gives the trainer's (mean, std).
    reward = out / "reward"
    from safetensors import safe_open

    with safe_open(str(reward / "backbone.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k or "base_layer" in k]  # noqa: SIM118
    engine = RewardEngine.from_pretrained(reward, task["base"], dtype=torch.float32)
    assert engine.reward_config.head_outputs == 2
    trained = RewardEngine.from_base(task["base"], dtype=torch.float32, head_hidden=[64], head_outputs=2)
    add_lora(trained.backbone, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    model = TrainableReward(trained)
    missing, unexpected = model.load_state_dict(state, strict=False)  # the trainer's weights, in the trainer's module
    assert not unexpected
    batch = LatentCache(task["cache"]).batch(read_file(task["val"][0], None)[:6])
    batch["winners"] = torch.stack(batch["winners"])  # one bucket: 64x64 images at area 64x64
    noise = torch.randn_like(batch["winners"])
    with torch.no_grad():
        expected = model(batch["winners"], batch["prompt_embeds"], batch["pooled"], noise=noise)
    prompt = (batch["prompt_embeds"], batch["pooled"])
    mean, std = engine.score(batch["winners"], prompt, noise=noise, return_std=True)
    torch.testing.assert_close(mean, expected[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std, expected[:, 1].exp(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(engine.score(batch["winners"], prompt, noise=noise), mean)
    n_mean, n_std = engine.score(batch["winners"], prompt, noise=noise, normalize=True, return_std=True)
    torch.testing.assert_close(n_mean, (mean - metrics["reward_mean"]) / metrics["reward_std"])
    torch.testing.assert_close(n_std, std / metrics["reward_std"])

    # The adapter alone, in peft's format, reproduces the trainer's adapter weights.
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4
    fresh = RewardEngine.from_base(task["base"], dtype=torch.float32, head_hidden=[64])
    add_lora(fresh.backbone, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    set_peft_model_state_dict(fresh.backbone, adapter)
    for name, p in fresh.backbone.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(p, state[f"backbone.{name}"], rtol=0, atol=0, msg=name)

    # A point head has no std to return.
    point = RewardEngine.from_base(task["base"], dtype=torch.float32, head_hidden=[64])
    with pytest.raises(ValueError, match="return_std=True needs an uncertainty head"):
        point.score(batch["winners"], prompt, noise=noise, return_std=True)


def test_lora_wraps_the_projections_and_freezes_the_rest(task: dict) -> None:
    engine = RewardEngine.from_base(task["base"], dtype=torch.float32, head_hidden=[64])
    linears = {
        name: (m.in_features, m.out_features)
        for name, m in engine.backbone.named_modules()
        if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in DEFAULT_LORA_TARGETS)
    }
    assert {n.split(".", 2)[-1] for n in linears} >= {"attn.to_qkv", "attn.to_out.0", "ff.net.0.proj", "ff.net.2"}
    assert add_lora(engine.backbone, 4, 4.0, DEFAULT_LORA_TARGETS) == len(linears)
    trainable = {n: p.numel() for n, p in engine.backbone.named_parameters() if p.requires_grad}
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(trainable.values()) == sum(4 * (i + o) for i, o in linears.values())  # A [r, in] + B [out, r]
    with pytest.raises(ValueError, match=r"lora_targets \['to_kqv'\] match no module"):
        add_lora(engine.backbone, 4, 4.0, ["to_kqv"])


def test_training_memory_counts_full_and_lora() -> None:
    from engine.config import BackboneConfig, RewardConfig
    from training.memory import training_memory

    full, lora = training_memory("tiny", "full"), training_memory("tiny", "lora", lora_rank=4)
    cfg = BackboneConfig.from_name("tiny")
    engine = RewardEngine.from_preset("tiny", dtype=torch.float32)  # the same model, materialised
    n_backbone = sum(p.numel() for p in engine.backbone.parameters())
    n_head = sum(p.numel() for p in engine.head.parameters())
    assert engine.reward_config.layers == RewardConfig.for_backbone(cfg).layers
    assert full.trainable_params == full.total_params == n_backbone + n_head
    assert full.weights_bytes == full.grads_bytes == 4 * full.trainable_params
    assert full.optimizer_bytes == 8 * full.trainable_params
    assert lora.total_params == full.total_params + lora.trainable_params - n_head
    assert lora.weights_bytes == 4 * lora.total_params and lora.grads_bytes == 4 * lora.trainable_params


# ------------------------------------------------------------------------------------------ gradient accumulation

ACCUM = {"steps": 3, "batch_size": 8, "checkpoint_every": 1, "keep_checkpoints": 3}


def assert_same_training(a: Path, b: Path, step: int) -> None:
    """Same losses and weights up to reduction order (fp32). The head's last bias is left out: BT gradients cancel on
    it (r_w - r_l), and Adam turns their rounding noise into full-size steps."""
    loss = lambda out: [r["loss"] for r in read_log(out) if "loss" in r]
    np.testing.assert_allclose(loss(b), loss(a), rtol=0, atol=1e-5)
    sa, sb = final_state(a, step), final_state(b, step)
    assert sa.keys() == sb.keys()
    for key in sa:
        if key != "head.mlp.2.bias":
            torch.testing.assert_close(sb[key], sa[key], rtol=0, atol=1e-4, msg=key)


def test_grad_accumulation_equals_one_batch_and_resumes_exactly(task: dict, tmp_path: Path) -> None:
    train(config(task, tmp_path / "one", **ACCUM))
    train(config(task, tmp_path / "accum", grad_accum_steps=4, **ACCUM))  # 4 micro-batches of 2 pairs
    assert_same_training(tmp_path / "one", tmp_path / "accum", 3)

    resumed = tmp_path / "resumed"

    class Killed(Exception):
        pass

    def kill_at_1(step: int, metrics: dict) -> None:
        if step == 1:
            raise Killed

    with pytest.raises(Killed):
        train(config(task, resumed, grad_accum_steps=4, **ACCUM), on_step=kill_at_1)
    train(config(task, resumed, grad_accum_steps=4, **ACCUM))
    a, b = final_state(tmp_path / "accum", 3), final_state(resumed, 3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="grad_accum_steps: got 3, expected a divisor of batch_size 8"):
        train(config(task, tmp_path / "bad", grad_accum_steps=3, **ACCUM))


@pytest.mark.slow
def test_grad_accumulation_under_fsdp_two_processes(task: dict, tmp_path: Path) -> None:
    common = {**ACCUM, "steps": 2, "checkpoint_every": 0}
    train(config(task, tmp_path / "one", **common))
    cfg_path = tmp_path / "fsdp.json"
    cfg_path.write_text(json.dumps(config(task, tmp_path / "two", grad_accum_steps=2, **common).to_dict()))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    subprocess.run(
        [*command, "-m", "training.train", "--config", str(cfg_path)], cwd=REPO, env=env, check=True, timeout=300
    )
    assert_same_training(tmp_path / "one", tmp_path / "two", 2)  # 2 ranks x 2 micro-batches of 2 pairs


def test_serve_returns_std_for_an_uncertainty_head(task: dict) -> None:
    pytest.importorskip("ray")
    from engine.serve.scorer import reward_outputs as _reward_outputs

    engine = RewardEngine.from_base(task["base"], dtype=torch.float32, head_hidden=[64], head_outputs=2)
    batch = LatentCache(task["cache"]).batch(read_file(task["val"][0], None)[:3])
    winners = torch.stack(batch["winners"])  # one bucket: 64x64 images at area 64x64
    prompt = (batch["prompt_embeds"], batch["pooled"])
    mean, std = engine.score(winners, prompt, seed=0, return_std=True)
    out = _reward_outputs(engine.score(winners, prompt, seed=0, return_std=True))
    assert out.keys() == {"rewards", "std"}
    torch.testing.assert_close(out["rewards"], mean)
    torch.testing.assert_close(out["std"], std)
    assert _reward_outputs(mean).keys() == {"rewards"}
