"""Noise-aware training on the tiny base: per-pair noise levels (one t and one eps per pair,
a pure function of (seed, step, pair)), the query-attention head exported and scored by the engine as the trainer
scores it, the EMA of the weights (validation, export, exact resume), validation and bench.accuracy per t."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_training import Killed, kill_at, make_split, read_log

from bench.tiny_base import default_tiny_base
from engine.api import RewardEngine
from engine.schema import SchemaError
from training.cache import LatentCache, build_cache
from training.checkpoint import read_checkpoint_file
from training.config import TrainConfig
from training.data import read_file
from training.ema import EMA
from training.model import TrainableReward
from training.noise_levels import pair_levels
from training.train import train

QA = {"head": "query_attention", "text_layers": [1], "query_attention": {"width": 16, "num_heads": 2}}


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("noise_prefs")
    train_json, val_json = make_split(root, "train", 48, seed=0), make_split(root, "val", 12, seed=1)
    base = default_tiny_base()
    cache = build_cache(
        [train_json, val_json], base, root / "cache", max_sequence_length=16, shard_size=64, area=64 * 64,
        progress=False,
    )  # fmt: skip
    return {"train": train_json, "val": val_json, "base": base, "cache": cache}


def config(task: dict, out_dir: Path, **overrides) -> TrainConfig:
    values = {
        "cache": str(task["cache"]), "train_json": [str(task["train"])], "val_json": [str(task["val"])],
        "base": str(task["base"]), "head_hidden": [32], "steps": 6, "batch_size": 8, "lr_backbone": 1e-3,
        "lr_head": 3e-3, "log_every": 1, "checkpoint_every": 0, "eval_batch_size": 12, "out_dir": str(out_dir),
    }  # fmt: skip
    return TrainConfig(**values | overrides)


# ---------------------------------------------------------------------------------------------- noise levels


def test_pair_levels_are_a_function_of_seed_and_step_inside_the_range() -> None:
    base = {"cache": "c", "train_json": "a", "val_json": "b", "base": "x", "batch_size": 20000}
    cfg = TrainConfig(**base, t_sampling="uniform", t_min=0.2, t_max=0.6)
    assert pair_levels(TrainConfig(**base), 3) is None  # fixed: every pair at t
    a = pair_levels(cfg, 3)
    assert a.dtype == torch.float32 and a.shape == (20000,)
    assert torch.equal(a, pair_levels(cfg, 3))  # the same step draws the same levels (resume)
    assert not torch.equal(a, pair_levels(cfg, 4)) and not torch.equal(a, pair_levels(cfg.replace(seed=1), 3))
    assert a.min() >= 0.2 and a.max() <= 0.6 and float(a.mean()) == pytest.approx(0.4, abs=0.005)
    # the distributions, mapped to [t_min, t_max] = [0, 1) here: Beta(2, 6) has mean 1/4; sigmoid(N(1, 0.5)) has
    # median sigmoid(1)
    wide = {"t_min": 1e-6, "t_max": 0.999999}
    beta = pair_levels(cfg.replace(t_sampling="beta", t_beta_a=2.0, t_beta_b=6.0, **wide), 0)
    assert float(beta.mean()) == pytest.approx(0.25, abs=0.005)
    logit = pair_levels(cfg.replace(t_sampling="logit_normal", t_logit_mean=1.0, t_logit_std=0.5, **wide), 0)
    assert float(logit.median()) == pytest.approx(1 / (1 + np.exp(-1.0)), abs=0.005)


def test_noise_config_is_checked_by_the_schema() -> None:
    base = {"cache": "c", "train_json": "a", "val_json": "b", "base": "x"}
    with pytest.raises(SchemaError, match="t_max: got 0.2, expected a value above t_min 0.5"):
        TrainConfig(**base, t_sampling="uniform", t_min=0.5, t_max=0.2)
    with pytest.raises(SchemaError, match="t_sampling"):
        TrainConfig(**base, t_sampling="normal")
    with pytest.raises(SchemaError, match=r"text_layers: got \[1\], expected \[\] unless head is 'query_attention'"):
        TrainConfig(**base, text_layers=[1])
    with pytest.raises(SchemaError, match="divisible by num_heads"):
        TrainConfig(**base, head="query_attention", query_attention={"width": 20, "num_heads": 3})
    with pytest.raises(SchemaError, match="ema_decay"):
        TrainConfig(**base, ema_decay=1.0)
    with pytest.raises(SchemaError, match=r"val_t\[0\]"):
        TrainConfig(**base, val_t=[0.0])


def test_a_pairs_winner_and_loser_share_one_t_and_one_noise_draw(task: dict, tmp_path: Path, monkeypatch) -> None:
    seen = []
    outputs = TrainableReward.outputs

    def spy(self, z0, prompt_embeds, pooled, noise=None, seed=None, image_offset=0, t=None):
        if torch.is_grad_enabled():  # the training forwards (validation runs under no_grad)
            seen.append((z0.clone(), noise.clone(), None if t is None else t.clone()))
        return outputs(self, z0, prompt_embeds, pooled, noise, seed, image_offset, t)

    monkeypatch.setattr(TrainableReward, "outputs", spy)
    cfg = config(task, tmp_path / "run", mode="frozen", t_sampling="uniform", steps=2, **QA)
    train(cfg)
    assert len(seen) == 2  # one shape (64x64): one forward per step
    for step, (z0, noise, t) in enumerate(seen):
        assert z0.shape[0] == 16 and t.shape == (16,)
        assert torch.equal(t[0::2], t[1::2]) and torch.equal(noise[0::2], noise[1::2])  # winner i, loser i
        assert len(set(t[0::2].tolist())) == 8  # a level per pair
        assert set(t.tolist()) == set(pair_levels(cfg, step).tolist())


# ------------------------------------------------------------------------------------------ head, EMA, resume


def test_query_attention_head_exports_and_scores_as_the_trainer(task: dict, tmp_path: Path) -> None:
    out = tmp_path / "qa"
    cfg = config(task, out, t_sampling="uniform", loss="thurstone", ema_decay=0.5, **QA, checkpoint_every=6)
    metrics = train(cfg)
    engine = RewardEngine.from_pretrained(out / "reward", task["base"], dtype=torch.float32)
    assert engine.reward_config.head == "query_attention" and engine.reward_config.text_layers == (1,)
    meta = json.loads((out / "reward" / "reward_config.json").read_text())
    assert meta["metadata"]["training"]["t_sampling"] == "uniform"

    # The trainer's module holding the EMA weights (what export writes) scores as the exported engine does, at the
    # checkpoint's t and per latent.
    final = read_checkpoint_file(out / "checkpoints" / "step_00000006.safetensors")
    trained = RewardEngine.from_base(task["base"], dtype=torch.float32, reward=dict(QA, text_layers=(1,)))
    model = TrainableReward(trained)
    model.load_state_dict(final["model"] | final["ema"], strict=False)  # mode full: every weight is trained
    assert set(final["ema"]) == set(final["model"])
    raw = dict(final["model"])
    assert any(not torch.equal(raw[k], final["ema"][k]) for k in raw)  # the average is not the last weights
    batch = LatentCache(task["cache"]).batch(read_file(task["val"], None)[:5])
    z0, prompt = torch.stack(batch["winners"]), (batch["prompt_embeds"], batch["pooled"])
    noise, t = torch.randn_like(z0), torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])
    with torch.no_grad():
        expected = model(z0, *prompt, noise=noise)[:, 0]
        expected_t = model(z0, *prompt, noise=noise, t=t)[:, 0]
    torch.testing.assert_close(engine.score(z0, prompt, noise=noise), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(engine.score(z0, prompt, noise=noise, t=t), expected_t, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, expected_t)
    assert metrics["val_accuracy"] == pytest.approx(read_log(out)[-1]["val_accuracy"])


def test_ema_averages_swaps_in_and_out() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model[1].requires_grad_(False)  # frozen parameters are not averaged
    ema = EMA(model, 0.75)
    assert ema.names == ["0.weight", "0.bias"]
    w0 = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update()
    torch.testing.assert_close(ema.state_dict()["0.weight"], 0.75 * w0 + 0.25 * (w0 + 1.0), rtol=0, atol=1e-7)
    with ema.applied():
        torch.testing.assert_close(model[0].weight, ema.average[0])
    torch.testing.assert_close(model[0].weight, w0 + 1.0, rtol=0, atol=0)
    with pytest.raises(ValueError, match="0.bias"):
        ema.load_state_dict({"0.weight": w0}, "ckpt")


def test_noise_aware_kill_and_resume_is_exact(task: dict, tmp_path: Path) -> None:
    common = {"t_sampling": "logit_normal", "loss": "thurstone_nll", "ema_decay": 0.8, "val_t": [0.5], **QA}
    common |= {"checkpoint_every": 2, "keep_checkpoints": 3, "eval_every": 3}
    train(config(task, tmp_path / "straight", **common))
    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        train(config(task, out, **common), on_step=kill_at(3))
    train(config(task, out, **common))
    final = lambda d: read_checkpoint_file(d / "checkpoints" / "step_00000006.safetensors")
    a, b = final(tmp_path / "straight"), final(out)
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    strip = lambda log: [{k: v for k, v in r.items() if k not in ("pairs_per_s", "mfu")} for r in log]
    assert strip(read_log(out)) == strip(read_log(tmp_path / "straight"))


# ------------------------------------------------------------------------------------------- accuracy per t


def test_validation_and_bench_accuracy_report_a_row_per_file_and_t(task: dict, tmp_path: Path, capsys) -> None:
    from bench.accuracy import format_table, main
    from bench.accuracy import run as bench_run

    out = tmp_path / "frozen"
    levels = [0.4, 0.8]
    metrics = train(config(task, out, mode="frozen", steps=20, val_t=levels))
    rows = metrics["val_accuracy_per_t"]
    assert [(r["t"], Path(r["file"]).name) for r in rows] == [(t, "val.json") for t in (0.1, *levels)]
    assert rows[0]["accuracy"] == metrics["val_accuracy"]
    assert read_log(out)[-1]["val_accuracy_per_t"] == rows
    assert "val_accuracy" in capsys.readouterr().out.split("t 0.8")[0]  # a printed row per file and t

    report = bench_run([task["val"]], out / "reward", task["base"], t=levels)
    assert [r["t"] for r in report["results"]] == levels
    assert [r["accuracy"] for r in report["results"]] == pytest.approx([r["accuracy"] for r in rows[1:]], abs=1e-6)
    assert [m["t"] for m in report["mean_per_t"]] == levels
    table = format_table(report).splitlines()
    assert len(table) == 1 + 2 + 2 and table[1].split()[:2] == ["val.json", "0.4"]
    main(["--test-json", str(task["val"]), "--checkpoint", str(out / "reward"), "--base", str(task["base"]),
          "--t", "0.4", "0.8"])  # fmt: skip
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in printed[1:3]] == [["val.json", "0.4"], ["val.json", "0.8"]]
