"""The trainer's configuration: a `TrainConfig` dataclass (defaults with a one-line reason each), read from JSON plus
``key=value`` overrides whose types come from the dataclass's annotations, and validated before any work."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import RewardConfig
from training.data import BAD_IMAGE_POLICIES, HPSV3_CONFIDENCE
from training.lora import ADAPTER_FORMATS, DEFAULT_LORA_TARGETS
from training.losses import LOSSES

MODES = ("full", "frozen", "lora")


@dataclass
class TrainConfig:
    # data
    cache: str = ""  # training.cache output: the trainer never runs the VAE or the text encoders
    train_json: list[str] = field(default_factory=list)  # HPSv3-format files; "file.json:2" mixes with weight 2
    val_json: list[str] = field(default_factory=list)  # held-out pairs: accuracy and the stored reward mean/std
    confidence_threshold: float | None = HPSV3_CONFIDENCE  # HPSv3 trains on confidence >= 0.95; null passes
    on_bad_image: str = "error"  # "skip" drops and counts records with missing/unreadable images
    image_root: str | None = None  # relative image paths resolve here, images must lie in it; None: the JSON's folder
    allow_outside_root: bool = False  # accept image paths that resolve outside image_root
    # model
    base: str = ""  # SD3/SD3.5 diffusers directory or single file; only the transformer weights are read
    layers: list[int] | None = None  # pooled blocks; None = the engine's default for this depth (paper: 15,23,28,37)
    t: float = 0.1  # Eq. 1 noise level (paper); stored with the head
    head_hidden: list[int] = field(default_factory=lambda: [1024, 256])  # the paper's MLP head
    mode: str = (
        "full"  # "full": backbone + head; "frozen": head only, on features computed once; "lora": adapters + head
    )
    lora_rank: int = 16  # adapter rank: small next to D (2432 in SD3.5-L), as HPSv3/Flow-GRPO use
    lora_alpha: float = 16.0  # adapter scale alpha / rank = 1: the lr needs no retuning when the rank changes
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))  # attention qkv/out, FFN
    save_adapter: bool = False  # lora: also write out_dir/adapter (peft's format) next to the merged reward/
    save_adapter_format: str = "peft"  # "peft" loads onto the engine's backbone; "diffusers" onto SD3 (q/k/v split)
    # loss
    loss: str = "bt"  # "bt" (Eq. 6), "uncertainty" (HPSv3: the head predicts mean and log-std), "btt" (BT with ties)
    tied_threshold: float = 0.1  # btt: a pair is a tie when |c1 - c2| / (c1 + c2) <= this (a 55/45 vote or closer)
    # optimisation
    steps: int = 2000  # optimizer steps
    batch_size: int = 32  # global pairs per optimizer step = processes x grad_accum_steps x micro-batch
    grad_accum_steps: int = 1  # micro-steps per optimizer step: a large effective batch with one micro-batch's memory
    lr_backbone: float = 1e-5  # small: the backbone is pretrained and its features are what we pay for
    lr_head: float = 1e-4  # the head starts from random init and needs a larger step
    weight_decay: float = 0.01  # AdamW default scale; regularises the freshly initialised head
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW defaults; BT gradients are not spiky
    warmup_ratio: float = 0.05  # linear warmup over the first 5% of steps protects the pretrained backbone
    schedule: str = "cosine"  # "cosine" (to min_lr_ratio) or "constant" after warmup
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of the peak lr (nanoGPT: lr / 10)
    grad_clip: float = 1.0  # clip the global grad norm; 0 disables
    grad_checkpointing: bool = False  # recompute each block in backward: ~1/3 more compute for O(1)-block memory
    # run
    seed: int = 0  # head init, data order and training noise
    eval_seed: int = 1234  # validation noise: image k of a file uses stream k (bench.accuracy uses the same)
    out_dir: str = "runs/dit-reward"  # log.jsonl, checkpoints/, reward/ (the final reward checkpoint)
    log_every: int = 10  # steps between log lines (each is a cross-rank sync)
    eval_every: int = 0  # steps between validations; 0: only at the end
    checkpoint_every: int = 200  # steps between resumable checkpoints; 0: only at the end
    keep_checkpoints: int = 2  # older resumable checkpoints are deleted
    eval_batch_size: int = 64  # pairs per validation forward
    device: str = "auto"  # "auto": cuda (this rank's GPU) if available, else cpu
    peak_flops: float = 0.0  # per-device peak for MFU; 0: detect on known GPUs, else MFU is not reported
    resume_on_changed_data: bool = False  # resume even if the data files, their filtering or the cache changed

    def __post_init__(self) -> None:
        # One path for a list of paths ("train_json=/data/train.json" on the command line, as for a single file);
        # tuples and path objects from Python become what the JSON round trip of a checkpoint gives back.
        for name in ("cache", "base", "out_dir", "image_root"):
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
        for name in ("train_json", "val_json"):
            value = getattr(self, name)
            if isinstance(value, (str, os.PathLike)):
                value = [value]
            if isinstance(value, (list, tuple)):
                setattr(self, name, [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value])
        for name in ("layers", "head_hidden", "betas", "lora_targets"):
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))


_FIELD_TYPES = typing.get_type_hints(TrainConfig)
_PYTHON_LITERALS = {"True": True, "False": False, "None": None}  # what a Python user types on the command line


def _is_instance(value: Any, hint: Any) -> bool:
    """isinstance against a field annotation (bool, int, float, str, list[X], X | None). A bool is no number here and
    an int is a float (JSON writes 1.0 as 1)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_is_instance(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(_is_instance(v, typing.get_args(hint)[0]) for v in value)
    if hint is type(None):
        return value is None
    if isinstance(value, bool):
        return hint is bool
    return isinstance(value, (int, float)) if hint is float else isinstance(value, hint)


def _parse_override(key: str, raw: str) -> Any:
    """A command-line value: JSON (``steps=100``, ``betas=[0.9,0.95]``, ``lr_head=NaN``), Python's True/False/None,
    else the text. Text fields (paths, modes) keep the text unless it is a JSON string: ``out_dir=2024`` is a path."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = _PYTHON_LITERALS.get(raw, raw)
    takes_text = _FIELD_TYPES.get(key) in (str, list[str])
    return raw if takes_text and not isinstance(value, (str, list)) else value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults, then a JSON file, then ``key=value`` overrides (see `_parse_override`)."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"config {path} is not valid JSON: {e}") from e
        if not isinstance(values, dict):
            raise ValueError(f"config {path} must be a JSON object of TrainConfig fields")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like key=value")
        values[key] = _parse_override(key, raw)
    unknown = sorted(set(values) - set(_FIELD_TYPES))
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(_FIELD_TYPES)}")
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """ValueError, naming the field and the fix, for a config that cannot run: checked before any work."""
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        if not _is_instance(value, _FIELD_TYPES[f.name]):
            raise ValueError(f"config field {f.name!r} must be {f.type}, got {value!r} ({type(value).__name__})")
        numbers = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise ValueError(f"config field {f.name!r} must be finite, got {value!r}")
    for name in ("cache", "base", "out_dir"):
        if not getattr(cfg, name):
            raise ValueError(f"config field {name!r} is required")
    for name in ("train_json", "val_json"):
        if not getattr(cfg, name) or not all(getattr(cfg, name)):
            raise ValueError(
                f"config field {name!r} needs one or more HPSv3-format JSON files, got {getattr(cfg, name)}"
            )
    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {cfg.loss!r}")
    if not 0.0 <= cfg.tied_threshold < 1.0:
        raise ValueError(f"tied_threshold must lie in [0, 1) (|c1 - c2| / (c1 + c2)), got {cfg.tied_threshold}")
    if cfg.lora_rank < 1 or not cfg.lora_alpha > 0 or not cfg.lora_targets:
        raise ValueError(
            f"lora_rank must be >= 1, lora_alpha > 0 and lora_targets non-empty, got {cfg.lora_rank}, "
            f"{cfg.lora_alpha}, {cfg.lora_targets}"
        )
    if cfg.mode == "lora" and importlib.util.find_spec("peft") is None:
        raise ValueError("mode='lora' trains adapters with peft, which is not installed: pip install dit-reward[train]")
    if cfg.save_adapter and cfg.mode != "lora":
        raise ValueError("save_adapter writes LoRA adapters: it needs mode='lora'")
    if cfg.save_adapter_format not in ADAPTER_FORMATS:
        raise ValueError(f"save_adapter_format must be one of {ADAPTER_FORMATS}, got {cfg.save_adapter_format!r}")
    if cfg.schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {cfg.schedule!r}")
    if cfg.on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {cfg.on_bad_image!r}")
    if cfg.confidence_threshold is not None and not 0.0 <= cfg.confidence_threshold <= 1.0:
        raise ValueError(
            f"confidence_threshold must lie in [0, 1] (HPSv3: {HPSV3_CONFIDENCE}) or be null, "
            f"got {cfg.confidence_threshold}"
        )
    try:  # the engine's own rules for the pooled blocks, t and the head (the blocks' range is checked against the base)
        RewardConfig(
            **({"layers": tuple(cfg.layers)} if cfg.layers is not None else {}),
            t=cfg.t,
            head_hidden=tuple(cfg.head_hidden),
        )
    except ValueError as e:
        raise ValueError(f"config fields layers/t/head_hidden: {e}") from e
    for name in ("steps", "batch_size", "grad_accum_steps", "eval_batch_size", "log_every", "keep_checkpoints"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be a positive int, got {getattr(cfg, name)!r}")
    for name in ("eval_every", "checkpoint_every"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be an int >= 0 (0: only at the end), got {getattr(cfg, name)!r}")
    for name in ("lr_backbone", "lr_head", "weight_decay", "grad_clip", "peak_flops"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be a number >= 0, got {getattr(cfg, name)!r}")
    if len(cfg.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.betas):
        raise ValueError(f"betas must be two AdamW coefficients in [0, 1) (default [0.9, 0.999]), got {cfg.betas}")
    if not 0.0 <= cfg.warmup_ratio < 1.0 or not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ValueError(
            f"warmup_ratio must lie in [0, 1) and min_lr_ratio in [0, 1], got {cfg.warmup_ratio} and {cfg.min_lr_ratio}"
        )
    if not 0 <= cfg.seed < 2**32:  # per-epoch and per-step seeds are derived from it (BucketSampler, step_noise_seed)
        raise ValueError(f"seed must be an int in [0, 2**32), got {cfg.seed}")
    if not 0 <= cfg.eval_seed < 2**63:  # the noise kernel's seed range (bench.accuracy reuses it)
        raise ValueError(f"eval_seed must be an int in [0, 2**63), got {cfg.eval_seed}")


__all__ = ["MODES", "TrainConfig", "load_config", "validate"]
