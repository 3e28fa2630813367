"""DiNa-LRM checkpoints in their published layout (config.json + checkpoint/backbone_lora/ + checkpoint/rm_head.pt),
written here by peft and torch.save on a tiny SD3.5-shaped base, loaded by `RewardEngine.from_pretrained` and
scored against an independent reference: diffusers' blocks run by hand with peft's own merge of the LoRA, the
sigma table of diffusers' scheduler, and the head from its equations (tests/test_heads.py)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_diffusers_transformer, random_inputs
from test_heads import randomise, reference_head

from engine import RewardEngine
from engine.config import BackboneConfig, QueryAttentionConfig, RewardConfig
from engine.heads import QueryAttentionHead

pytest.importorskip("peft")

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def write_base(root: Path) -> Path:
    """A tiny diffusers base: transformer (random, every weight non-trivial) and a shift-3 FlowMatch scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    base = root / "base"
    make_diffusers_transformer(seed=3).save_pretrained(base / "transformer")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_pretrained(base / "scheduler")
    return base


def write_dina(root: Path, base: Path, visual: list[int], text: list[int], **model) -> Path:
    """Their layout: the training config dump, a peft adapter saved by peft (random non-zero A and B), the head's
    state dict saved by torch.save."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig, get_peft_model

    ckpt = root / "ckpt"
    blocks = max(visual + text)
    transformer = SD3Transformer2DModel.from_pretrained(base / "transformer")
    config = LoraConfig(r=4, lora_alpha=10, target_modules=LORA_TARGETS, init_lora_weights="gaussian")
    peft_model = get_peft_model(transformer, config)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(ckpt / "checkpoint" / "backbone_lora")
    head = QueryAttentionHead(tuple(i - 1 for i in visual), tuple(i - 1 for i in text), 32, num_queries=3, num_heads=4)
    randomise(head, seed=5)
    torch.save(head.state_dict(), ckpt / "checkpoint" / "rm_head.pt")
    section = {
        "model_type": "thurstone",
        "backbone_model_id": "stabilityai/stable-diffusion-3.5-medium",
        "num_transformer_layers": blocks,
        "freeze_backbone": False,
        "use_ema": True,
        "use_lora": True,
        "lora_config": {"r": 4, "lora_alpha": 10, "init_lora_weights": "gaussian"},
        "use_logistic": False,
        "visual_head_idx": visual,
        "text_head_idx": text,
        "use_t_embed": True,
        "reward_head": {"use_proj_in": False, "width": -1, "out_dim": 1, "num_queries": 3, "num_attn_heads": 4,
                        "dropout": 0.0},
        **model,
    }  # fmt: skip
    (ckpt / "config.json").write_text(json.dumps({"model": section, "training": {"add_noise": True}, "data": {}}))
    return ckpt


def reference_rewards(ckpt: Path, base: Path, z0, pe, po, noise, u, visual, text) -> torch.Tensor:
    """diffusers blocks by hand on peft's merged weights, x_t at the nearest table sigma, the head's equations; `u`
    a list: their ensemble (each view's tokens made at its own level, then side by side on the token axis)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from peft import PeftModel

    model = SD3Transformer2DModel.from_pretrained(base / "transformer")
    if (ckpt / "checkpoint" / "backbone_lora").is_dir():
        model = PeftModel.from_pretrained(model, ckpt / "checkpoint" / "backbone_lora").merge_and_unload()
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(base / "scheduler")
    views = u if isinstance(u, list) else [u]
    rows: list[list] = [[], [], []]  # per view: its image layers, text layers and temb (stacked view-major below)
    with torch.no_grad():
        for level in views:
            index = int(torch.argmin((scheduler.sigmas - level).abs()))
            sigma, timestep = scheduler.sigmas[index], scheduler.timesteps[index]
            h = model.pos_embed((1 - sigma) * z0 + sigma * noise)
            temb = model.time_text_embed(timestep.expand(z0.shape[0]), po)
            c = model.context_embedder(pe)
            image, words = [], []
            for i, block in enumerate(model.transformer_blocks[: max(visual + text)]):
                c, h = block(hidden_states=h, encoder_hidden_states=c, temb=temb)
                image += [h] if i + 1 in visual else []
                words += [c] if i + 1 in text else []
            for row, value in zip(rows, (image, words, temb), strict=True):
                row.append(value)
        image = [torch.cat(layer) for layer in zip(*rows[0], strict=True)]
        words = [torch.cat(layer) for layer in zip(*rows[1], strict=True)]
        state = torch.load(ckpt / "checkpoint" / "rm_head.pt", weights_only=True)
        return reference_head(state, image, words, torch.cat(rows[2]), heads=4, views=len(views))[:, 0]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_base(tmp_path_factory.mktemp("dina_base"))


@pytest.mark.parametrize("visual, text", [([1, 2, 3], [1, 2, 3]), ([1, 3], [3])], ids=["text_multi", "text_deepest"])
def test_dina_checkpoint_scores_as_the_reference(tmp_path, base, visual, text):
    ckpt = write_dina(tmp_path, base, visual, text)
    engine = RewardEngine.from_pretrained(ckpt, base=base, dtype=torch.float32, kernels_backend="torch")
    assert engine.reward_config.head == "query_attention" and engine.reward_config.t == 0.4
    assert engine.prompt_length.t5_tokens == 128  # their training prompt length (77 + 128 text tokens)
    assert len(engine.backbone.transformer_blocks) == 3  # blocks past the deepest read are not built
    z0, pe, po, noise = random_inputs(batch=3, h=10, w=14, text_len=9, seed=8)
    for u in (0.1, 0.4, 0.9, [0.1, 0.5, 0.8]):
        got = engine.score(z0, (pe, po), noise=noise, t=u)
        expected = reference_rewards(ckpt, base, z0, pe, po, noise, u, visual, text)
        assert ((got - expected).abs() <= 1e-4 * expected.abs().clamp_min(1.0)).all(), (u, got, expected)
    assert torch.equal(engine.score(z0, (pe, po), noise=noise), engine.score(z0, (pe, po), noise=noise, t=0.4))


def test_dina_checkpoint_of_a_frozen_base(tmp_path, base):
    """freeze_backbone without a LoRA: the head alone on the base's blocks."""
    ckpt = write_dina(tmp_path, base, [1, 2], [2], use_lora=False, freeze_backbone=True)
    shutil.rmtree(ckpt / "checkpoint" / "backbone_lora")
    engine = RewardEngine.from_pretrained(ckpt, base=base, dtype=torch.float32, kernels_backend="torch")
    z0, pe, po, noise = random_inputs(batch=2, h=8, w=8, text_len=5, seed=9)
    expected = reference_rewards(ckpt, base, z0, pe, po, noise, 0.3, [1, 2], [2])
    got = engine.score(z0, (pe, po), noise=noise, t=0.3)
    assert ((got - expected).abs() <= 1e-4 * expected.abs().clamp_min(1.0)).all()


def test_dina_config_maps_onto_the_engines(tmp_path, base):
    ckpt = write_dina(tmp_path, base, [3, 1], [2])  # their features follow block order, whatever the list order
    engine = RewardEngine.from_pretrained(ckpt, base=base, dtype=torch.float32, kernels_backend="torch")
    assert engine.reward_config == RewardConfig(
        layers=(0, 2),
        text_layers=(1,),
        t=0.4,
        head="query_attention",
        query_attention=QueryAttentionConfig(width=None, num_queries=3, num_heads=4, proj_in=False),
        schedule={"kind": "flow_match_table", "num_train_timesteps": 1000, "shift": 3.0},
    )
    assert engine.config == BackboneConfig.from_diffusers(json.loads((base / "transformer/config.json").read_text()))


def edit_config(ckpt: Path, **model) -> None:
    document = json.loads((ckpt / "config.json").read_text())
    document["model"].update(model)
    (ckpt / "config.json").write_text(json.dumps(document))


def test_bad_dina_layouts_name_the_file(tmp_path, base):
    ckpt = write_dina(tmp_path, base, [1, 2], [2])
    config = json.loads((ckpt / "config.json").read_text())

    def refused(match: str, error=ValueError, **kw):
        with pytest.raises(error, match=match):
            RewardEngine.from_pretrained(ckpt, **{"base": base, "dtype": torch.float32, **kw})
        (ckpt / "config.json").write_text(json.dumps(config))

    refused("pass base=", base=None)
    edit_config(ckpt, use_logistic=True)
    refused("config.json: model.use_logistic: got True")
    edit_config(ckpt, visual_head_idx=[0, 2])
    refused("config.json: model.visual_head_idx: got \\[0, 2\\].*0, the embedding outputs, is not supported")
    edit_config(ckpt, text_head_idx=[2, 2])
    refused("config.json: model.text_head_idx")
    edit_config(ckpt, visual_head_idx=[7], num_transformer_layers=7)
    refused("config.json: model: reward layers \\[6\\] out of range")
    edit_config(ckpt, use_lora=False)  # a fully fine-tuned backbone: no file holds it
    refused("config.json: model.use_lora: got False")
    (ckpt / "config.json").write_text(json.dumps({**config, "training": {"add_noise": False}}))
    refused("config.json: training.add_noise: got False")
    (ckpt / "config.json").write_text(json.dumps({"training": {}}))
    refused("config.json: model: missing")
    head_file = ckpt / "checkpoint" / "rm_head.pt"
    state = torch.load(head_file, weights_only=True)
    torch.save({**state, "extra.weight": torch.zeros(1)}, head_file)
    refused("unexpected key 'extra.weight' in .*rm_head.pt")
    torch.save({k: v for k, v in state.items() if k != "head.bias"}, head_file)
    refused("missing key 'head.bias' in .*rm_head.pt")
    head_file.write_bytes(pickle.dumps({"x": Path("/etc/passwd")}))  # a global torch's safe unpickler refuses
    refused("rm_head.pt: not a PyTorch state dict readable with weights_only=True")
    head_file.unlink()
    refused("rm_head.pt: missing", FileNotFoundError)


def test_an_engine_with_a_merged_lora_saves_its_blocks(tmp_path, base):
    """A DiNa-LRM engine saved without its blocks would reload on the bare base: refused; with them it round-trips."""
    engine = RewardEngine.from_pretrained(
        write_dina(tmp_path, base, [1, 2], [2]), base=base, dtype=torch.float32, kernels_backend="torch"
    )
    with pytest.raises(ValueError, match="backbone_lora.* merged into this engine.s blocks"):
        engine.save_pretrained(tmp_path / "saved")
    engine.save_pretrained(tmp_path / "saved", include_backbone=True)
    again = RewardEngine.from_pretrained(tmp_path / "saved", base=base, dtype=torch.float32, kernels_backend="torch")
    z0, pe, po, noise = random_inputs(batch=2, h=8, w=8, text_len=5, seed=12)
    for t in (0.2, [0.3, 0.6]):
        assert torch.equal(again.score(z0, (pe, po), noise=noise, t=t), engine.score(z0, (pe, po), noise=noise, t=t))
