"""LoRA adapters across the ecosystem, on the tiny base (fp32, torch kernels):

- what `save_adapter` writes loads where users are: peft's layout with `PeftModel.from_pretrained` onto the engine's
  backbone, diffusers' layout with `SD3Transformer2DModel.load_lora_adapter` and
  `StableDiffusion3Pipeline.load_lora_weights`; each merged model scores as the merged reward export;
- `engine.io.lora` merges a peft adapter at load without peft: one made by real peft on a diffusers
  `SD3Transformer2DModel` (DiNa-LRM's layout) gives peft's own `merge_and_unload()` weights and rewards, and our own
  adapters (both layouts) give the export back;
- bad adapters are refused with the file and the key named.

LoRA B starts at zero (the adapter would change nothing); every adapter here has random non-zero B, and each test
checks that the adapter moves the rewards, so a loader that drops the adapter fails."""

from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import random_inputs
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bench.tiny_base import default_tiny_base
from engine.api import RewardEngine
from engine.io.backbone import base_source, load_backbone
from engine.io.lora import read_lora_adapter
from engine.model.mmdit import diffusers_state_dict
from training.config import TrainConfig
from training.lora import DEFAULT_LORA_TARGETS, add_lora, lora_layers, merge_lora, save_adapter

pytest.importorskip("peft")

RANK, ALPHA = 4, 6.0  # alpha != rank: a loader that takes scale 1 (diffusers without metadata) fails
TOL = 1e-6  # fp32, same operations in another order
LAYER_SETS = [(1, 3), (1, 2)]  # deepest block = the model's last (context_pre_only) / one with text queries after it


@pytest.fixture(scope="module")
def base() -> Path:
    return default_tiny_base()


@pytest.fixture(scope="module")
def inputs():
    return random_inputs(batch=3, h=8, w=10, text_len=7, seed=5)


def rewards(engine: RewardEngine, inputs) -> torch.Tensor:
    z0, prompt_embeds, pooled, noise = inputs
    return engine.score(z0, (prompt_embeds, pooled), noise=noise)


def engine_of(backbone, head, reward_config) -> RewardEngine:
    return RewardEngine(backbone, copy.deepcopy(head), reward_config, kernels_backend="torch")


def randomize_lora_b(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))


def trained(base: Path, layers: tuple[int, ...]) -> RewardEngine:
    """An engine as a LoRA run leaves it: adapters on the default targets with random non-zero B."""
    engine = RewardEngine.from_base(base, layers=layers, dtype=torch.float32, head_hidden=[16], kernels_backend="torch")
    add_lora(engine.backbone, RANK, ALPHA, DEFAULT_LORA_TARGETS)
    randomize_lora_b(engine.backbone, seed=sum(layers))
    return engine


def exported(engine: RewardEngine, out: Path, inputs) -> tuple[RewardEngine, torch.Tensor]:
    """Merge the adapters (as `training.checkpoint.export`) and load the reward checkpoint back: the reference."""
    merge_lora(engine.backbone)
    engine.save_pretrained(out, include_backbone=True)
    export = RewardEngine.from_pretrained(out, dtype=torch.float32, kernels_backend="torch")
    return export, rewards(export, inputs)


def assert_moves_rewards(base: Path, engine: RewardEngine, expected: torch.Tensor, inputs) -> None:
    """The adapter changes the rewards (so a loader that loses it cannot pass)."""
    plain = RewardEngine.from_base(base, layers=engine.backbone.layers, dtype=torch.float32, kernels_backend="torch")
    plain_rewards = rewards(engine_of(plain.backbone, engine.head, engine.reward_config), inputs)
    assert (plain_rewards - expected).abs().max() > 100 * TOL


# ------------------------------------------------------------------------------------ save_adapter, loaded by others


@pytest.mark.parametrize("layers", LAYER_SETS)
def test_peft_loads_the_peft_layout_onto_the_engine_backbone(base, inputs, tmp_path, layers) -> None:
    from peft import PeftModel

    engine = trained(base, layers)
    save_adapter(engine.backbone, tmp_path / "adapter", RANK, ALPHA, list(DEFAULT_LORA_TARGETS))
    saved_b = {n: m.lora_B["default"].weight.detach().clone() for n, m in lora_layers(engine.backbone)}
    export, expected = exported(engine, tmp_path / "reward", inputs)
    assert_moves_rewards(base, export, expected, inputs)

    fresh = RewardEngine.from_base(base, layers=layers, dtype=torch.float32, kernels_backend="torch")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*missing adapter keys.*")
        warnings.filterwarnings("error", message=".*unexpected.*")
        peft_model = PeftModel.from_pretrained(fresh.backbone, tmp_path / "adapter")
    loaded_b = {n.removeprefix("base_model.model."): m.lora_B["default"].weight for n, m in lora_layers(peft_model)}
    assert loaded_b.keys() == saved_b.keys()
    for name, b in saved_b.items():
        assert torch.equal(loaded_b[name], b), name
    merged = engine_of(peft_model.merge_and_unload(), export.head, export.reward_config)
    torch.testing.assert_close(rewards(merged, inputs), expected, rtol=0, atol=TOL)


@pytest.mark.parametrize("layers", LAYER_SETS)
def test_diffusers_loads_the_diffusers_layout(base, inputs, tmp_path, layers) -> None:
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    engine = trained(base, layers)
    adapter = tmp_path / "adapter"
    save_adapter(engine.backbone, adapter, RANK, ALPHA, list(DEFAULT_LORA_TARGETS), format="diffusers")
    export, expected = exported(engine, tmp_path / "reward", inputs)
    assert_moves_rewards(base, export, expected, inputs)
    reference = diffusers_state_dict(export.backbone)

    def check(transformer) -> None:
        state = transformer.state_dict()
        assert not [k for k in state if "lora" in k]  # fused and unloaded: plain weights
        for key, value in reference.items():
            torch.testing.assert_close(state[key], value, rtol=0, atol=TOL, msg=key)
        merged = RewardEngine.from_diffusers(
            transformer, layers=layers, head=copy.deepcopy(export.head), dtype=torch.float32, kernels_backend="torch"
        )
        torch.testing.assert_close(rewards(merged, inputs), expected, rtol=0, atol=TOL)

    transformer = SD3Transformer2DModel.from_pretrained(base / "transformer", dtype=torch.float32)
    transformer.load_lora_adapter(adapter, use_safetensors=True)  # (without it diffusers looks for a pickled .bin)
    adapted = {n for n, m in transformer.named_modules() if hasattr(m, "lora_B")}
    assert adapted == {k.removesuffix(".lora_A.weight") for k in _diffusers_keys(adapter) if k.endswith("A.weight")}
    transformer.fuse_lora()
    transformer.unload_lora()
    check(transformer)

    pipe = StableDiffusion3Pipeline.from_pretrained(base, dtype=torch.float32)
    pipe.load_lora_weights(adapter)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    check(pipe.transformer)


def _diffusers_keys(adapter: Path) -> list[str]:
    with safe_open(str(adapter / "pytorch_lora_weights.safetensors"), "pt") as f:
        return [k.removeprefix("transformer.") for k in f.keys()]  # noqa: SIM118


def test_train_config_names_the_adapter_formats() -> None:
    common = {"cache": "c", "base": "b", "train_json": ["t.json"], "val_json": ["v.json"], "mode": "lora"}
    assert TrainConfig(**common, save_adapter=True, save_adapter_format="diffusers").save_adapter_format == "diffusers"
    with pytest.raises(ValueError, match=r"save_adapter_format: got 'kohya', expected one of 'peft' or 'diffusers'"):
        TrainConfig(**common, save_adapter=True, save_adapter_format="kohya")


# ------------------------------------------------------------------------------------ merged at load, without peft

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
EVERYTHING = ATTENTION + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear"]
PEFT_CONFIGS = {
    # DiNa-LRM's: attention of both streams (attn2 matches "to_q" too), the last block's text side excluded
    "dina": dict(
        r=RANK,
        lora_alpha=ALPHA,
        init_lora_weights="gaussian",
        target_modules=ATTENTION,
        exclude_modules=[f"transformer_blocks.3.attn.{m}" for m in ("add_q_proj", "add_k_proj", "add_v_proj")],
    ),
    # every projection, FFNs and the adaLN linear; per-module rank and alpha; rsLoRA
    "patterns": dict(
        r=RANK,
        lora_alpha=ALPHA,
        use_rslora=True,
        target_modules=EVERYTHING,
        rank_pattern={"attn2.to_q": 2, r"transformer_blocks\.1\.ff\.net\.2": 3},
        alpha_pattern={"to_add_out": 2.5},
    ),
}


@pytest.mark.parametrize("name", [*PEFT_CONFIGS, "adapter-name-in-keys"])
def test_a_peft_adapter_merges_like_peft(base, inputs, tmp_path, name) -> None:
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig, get_peft_model

    transformer = SD3Transformer2DModel.from_pretrained(base / "transformer", dtype=torch.float32)
    peft_model = get_peft_model(copy.deepcopy(transformer), LoraConfig(**PEFT_CONFIGS.get(name, PEFT_CONFIGS["dina"])))
    randomize_lora_b(peft_model, seed=7)
    adapter = tmp_path / "backbone_lora"
    peft_model.save_pretrained(adapter)
    if name == "adapter-name-in-keys":  # the layout of a state dict taken with the adapter name left in
        path = adapter / "adapter_model.safetensors"
        save_file({re.sub(r"\.lora_([AB])\.", r".lora_\1.rm_lora.", k): v for k, v in load_file(path).items()}, path)
    peft_layers = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_B")}
    assert any(".attn2.to_q" in n for n in peft_layers)
    assert ("norm1.linear" in str(peft_layers)) == (name == "patterns")
    merged = peft_model.merge_and_unload()

    layers = (1, 3)
    cfg, source = base_source(base)
    ours = load_backbone(cfg, layers, [source], torch.float32, "cpu", adapter=read_lora_adapter(adapter))
    reference, plain = merged.state_dict(), transformer.state_dict()
    state = diffusers_state_dict(ours)
    for key, value in state.items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=TOL, msg=key)
    changed = {k.removesuffix(".weight") for k, v in state.items() if not torch.equal(v, plain[k])}
    assert changed == {n for n in peft_layers if f"{n}.weight" in state}  # every adapter that this backbone holds

    engine = RewardEngine.from_diffusers(merged, layers=layers, dtype=torch.float32, kernels_backend="torch")
    expected = rewards(engine, inputs)
    torch.testing.assert_close(rewards(engine_of(ours, engine.head, engine.reward_config), inputs), expected,
                               rtol=0, atol=TOL)  # fmt: skip
    assert_moves_rewards(base, engine, expected, inputs)


@pytest.mark.parametrize("format", ["peft", "diffusers"])
def test_our_adapters_merge_back_into_the_export(base, inputs, tmp_path, format) -> None:
    layers = (1, 2)
    engine = trained(base, layers)
    save_adapter(engine.backbone, tmp_path / "adapter", RANK, ALPHA, list(DEFAULT_LORA_TARGETS), format=format)
    export, expected = exported(engine, tmp_path / "reward", inputs)
    cfg, source = base_source(base)
    ours = load_backbone(cfg, layers, [source], torch.float32, "cpu", adapter=read_lora_adapter(tmp_path / "adapter"))
    reference = export.backbone.state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=TOL, msg=key)
    torch.testing.assert_close(rewards(engine_of(ours, export.head, export.reward_config), inputs), expected,
                               rtol=0, atol=TOL)  # fmt: skip
    assert_moves_rewards(base, export, expected, inputs)


def test_a_diffusers_file_without_metadata_merges_as_diffusers_does(base, tmp_path) -> None:
    """No `lora_adapter_metadata`: diffusers takes alpha = r (scale 1) per module; so does the loader."""
    from diffusers import SD3Transformer2DModel

    engine = trained(base, (1, 3))
    adapter = tmp_path / "adapter"
    save_adapter(engine.backbone, adapter, RANK, ALPHA, list(DEFAULT_LORA_TARGETS), format="diffusers")
    path = adapter / "pytorch_lora_weights.safetensors"
    save_file(load_file(path), path)  # the same tensors, no metadata
    transformer = SD3Transformer2DModel.from_pretrained(base / "transformer", dtype=torch.float32)
    transformer.load_lora_adapter(adapter, use_safetensors=True)
    transformer.fuse_lora()
    transformer.unload_lora()
    cfg, source = base_source(base)
    ours = load_backbone(cfg, (1, 3), [source], torch.float32, "cpu", adapter=read_lora_adapter(adapter))
    reference = transformer.state_dict()
    for key, value in diffusers_state_dict(ours).items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=TOL, msg=key)


# ---------------------------------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def peft_adapter(base, tmp_path_factory) -> Path:
    engine = trained(base, (1, 3))
    adapter = tmp_path_factory.mktemp("valid") / "adapter"
    return save_adapter(engine.backbone, adapter, RANK, ALPHA, list(DEFAULT_LORA_TARGETS))


def _broken(peft_adapter: Path, tmp_path: Path, config=None, tensors=None) -> Path:
    """A copy of the valid adapter with its config and/or tensors changed by the given functions."""
    out = tmp_path / "broken"
    out.mkdir()
    raw = json.loads((peft_adapter / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps(config(raw) if config else raw))
    state = load_file(peft_adapter / "adapter_model.safetensors")
    save_file(tensors(state) if tensors else state, out / "adapter_model.safetensors")
    return out


def _b_key(state: dict) -> str:
    return next(k for k in sorted(state) if k.endswith("to_qkv.lora_B.weight"))


CONFIG_FAULTS = {
    "use_dora": (lambda c: c | {"use_dora": True}, r"use_dora: got True, expected null or false"),
    "bias": (lambda c: c | {"bias": "all"}, r"bias: got 'all', expected one of 'none'"),
    "pissa": (lambda c: c | {"init_lora_weights": "pissa"}, r"init_lora_weights: got 'pissa'.*converted base"),
    "saved modules": (lambda c: c | {"modules_to_save": ["proj_out"]}, r"modules_to_save: got \['proj_out'\]"),
    "no rank": (lambda c: {k: v for k, v in c.items() if k != "r"}, r"adapter_config.json: r: missing"),
    "other type": (lambda c: c | {"peft_type": "LOHA"}, r"peft_type: got 'LOHA', expected one of 'LORA'"),
    "other rank": (lambda c: c | {"r": 8}, r"rank 4, but .*adapter_config.json gives this module r=8"),
    "untargeted": (lambda c: c | {"target_modules": ["to_out.0"]}, r"adapts '.*add_qkv', which .*json does not sel"),
}
TENSOR_FAULTS = {
    "no B": (lambda s: {k: v for k, v in s.items() if k != _b_key(s)}, r"key '.*lora_A.weight' has no lora_B"),
    "DoRA": (lambda s: s | {"base_model.model.x.lora_magnitude_vector": torch.ones(2)}, r"key 'base_model.model.x"),
    "two adapters": (
        lambda s: s | {_b_key(s).replace("_B.", "_B.other."): s[_b_key(s)].clone()},
        r"holds adapters \['None', 'other'\], expected one",
    ),
    "rows": (lambda s: s | {_b_key(s): s[_b_key(s)][:-2]}, r"B's 94 rows do not split into 3 q/k/v parts"),
    "shape": (
        lambda s: s | {_b_key(s): s[_b_key(s)][:-3]},
        r"gives \[31, 32\] for 'transformer_blocks.0.attn.to_q.weight', but that weight is \[32, 32\]",
    ),
    "beyond the model": (
        lambda s: s | {k.replace("blocks.0.", "blocks.9."): v.clone() for k, v in s.items() if "blocks.0." in k},
        r"unexpected key 'transformer_blocks.9.attn.add_k_proj.weight' in the LoRA adapter .*adapter_model.safetensors",
    ),
}


@pytest.mark.parametrize("fault", [*CONFIG_FAULTS, *TENSOR_FAULTS])
def test_a_bad_adapter_is_refused_naming_file_and_key(base, peft_adapter, tmp_path, fault) -> None:
    if fault in CONFIG_FAULTS:
        change, message = CONFIG_FAULTS[fault]
        adapter, named = _broken(peft_adapter, tmp_path, config=change), "adapter_config.json"
    else:
        change, message = TENSOR_FAULTS[fault]
        adapter, named = _broken(peft_adapter, tmp_path, tensors=change), "adapter_model.safetensors"
    cfg, source = base_source(base)
    with pytest.raises(ValueError, match=message) as refused:
        load_backbone(cfg, (1, 3), [source], torch.float32, "cpu", adapter=read_lora_adapter(adapter))
    assert str(adapter / named) in str(refused.value)


def test_adapter_layouts_are_refused_when_ambiguous_pickled_or_foreign(peft_adapter, tmp_path) -> None:
    both = tmp_path / "both"
    both.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (both / name).write_bytes((peft_adapter / name).read_bytes())
    (both / "pytorch_lora_weights.safetensors").write_bytes((peft_adapter / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"both: holds both adapter_model.safetensors and pytorch_lora_weights"):
        read_lora_adapter(both)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(FileNotFoundError, match=r"pickled: no adapter_model.safetensors .* adapter_model.bin is pick"):
        read_lora_adapter(pickled)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    save_file({"text_encoder.x.lora_A.weight": torch.ones(2, 2)}, foreign / "pytorch_lora_weights.safetensors")
    with pytest.raises(ValueError, match=r"key 'text_encoder.x.lora_A.weight' is not a LoRA weight of the transf"):
        read_lora_adapter(foreign)

    (both / "pytorch_lora_weights.safetensors").unlink()
    (both / "adapter_config.json").write_text('{"r": 4,')
    with pytest.raises(ValueError, match=r"both/adapter_config.json: not valid JSON"):
        read_lora_adapter(both)
