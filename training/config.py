"""The trainer's configuration: one `TrainConfig` schema (`engine.schema`) whose every field states its type, its
bounds and, as its description, the reason for its default. A run reads it from JSON plus ``key=value`` overrides
(`load_config`); Python callers construct it directly. Either way it is validated as a whole before any work, and the
rules that need the base's sizes (which blocks exist, how wide a linear is) run once the base is known
(`check_against_base`)."""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from engine.config import PRESETS, BackboneConfig, QueryAttentionConfig
from engine.schema import Seed, invalid, parse_assignments, validate
from training.data import DataRules
from training.lora import ADAPTER_FORMATS, DEFAULT_LORA_TARGETS
from training.losses import LOSSES
from training.noise_levels import T_SAMPLINGS

MODES = ("full", "frozen", "lora")
# The widest and deepest backbone of the supported presets: the static bounds of `lora_rank` and `layers`; the run's
# own base bounds them again, exactly, in `check_against_base`.
WIDEST = max(cfg.hidden_size for cfg in PRESETS.values())
DEEPEST = max(cfg.num_layers for cfg in PRESETS.values())
# LoRA's scale alpha / rank multiplies the adapters' effective learning rate (Adam moves B by about lr per step whatever
# the scale): common settings use 1 to 4 (alpha = rank .. 4 x rank); far beyond, the first steps overflow.
MAX_LORA_SCALE = 64.0
# A head hidden layer wider than this is a typo, not a head: 65,536 units on SD3.5-L's 4 x 2432 pooled features are
# already 640 M parameters (the paper's head: 1024, 256).
MAX_HEAD_WIDTH = 65536
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")

Name = Annotated[str, Field(min_length=1)]  # a path, a module name: never empty
Names = Annotated[list[Name], Field(min_length=1)]


class TrainConfig(DataRules):
    # data (and `DataRules`: confidence_threshold, on_bad_image, image_root, allow_outside_root)
    cache: Name = Field(description="training.cache output: the trainer never runs the VAE or the text encoders")
    train_json: Names = Field(description='HPSv3-format files; "file.json:2" mixes with weight 2')
    val_json: Names = Field(description="held-out pairs: accuracy and the stored reward mean/std")
    # model
    base: Name = Field(
        description="SD3/SD3.5 diffusers directory or single file; only the transformer weights are read"
    )
    layers: Annotated[list[Annotated[int, Field(ge=0, lt=DEEPEST)]], Field(min_length=1)] | None = Field(
        None, description="pooled blocks; None = the engine's default for this depth (paper: 15,23,28,37)"
    )
    t: float = Field(
        0.1, gt=0.0, lt=1.0, description="Eq. 1 noise level (paper): t_sampling='fixed' trains at it; the stored t"
    )
    t_sampling: Literal[T_SAMPLINGS] = Field(  # type: ignore[valid-type]
        "fixed",
        description='"fixed": every pair at t; "uniform", "logit_normal", "beta": a t per pair in [t_min, t_max] '
        "(noise-aware, DiNa-LRM; training.noise_levels)",
    )
    t_min: float = Field(0.01, gt=0.0, lt=1.0, description="lowest sampled t: sigma 0 is outside Eq. 1's (0, 1)")
    t_max: float = Field(0.99, gt=0.0, lt=1.0, description="highest sampled t: pure noise (sigma 1) shows nothing")
    t_logit_mean: float = Field(0.0, ge=-10.0, le=10.0, description="logit_normal: mean of logit(u) (SD3: 0)")
    t_logit_std: float = Field(1.0, gt=0.0, le=10.0, description="logit_normal: std of logit(u) (SD3: 1)")
    t_beta_a: float = Field(1.0, gt=0.0, le=1000.0, description="beta: Beta(a, b)'s a (1, 1: uniform)")
    t_beta_b: float = Field(1.0, gt=0.0, le=1000.0, description="beta: Beta(a, b)'s b")
    head: Literal["mean_pool", "query_attention"] = Field(
        "mean_pool",
        description='"mean_pool": the paper\'s MLP over pooled image tokens; "query_attention": DiNa-LRM\'s head',
    )
    text_layers: list[Annotated[int, Field(ge=0, lt=DEEPEST)]] = Field(
        default_factory=list, description="query_attention: blocks whose text tokens it reads (none: image only)"
    )
    query_attention: QueryAttentionConfig = Field(
        default_factory=QueryAttentionConfig, description="query_attention: its sizes (width None: the base's D)"
    )
    head_hidden: Annotated[list[Annotated[int, Field(ge=1, le=MAX_HEAD_WIDTH)]], Field(min_length=1)] = Field(
        default_factory=lambda: [1024, 256], description="the paper's MLP head"
    )
    mode: Literal[MODES] = Field(  # type: ignore[valid-type]
        "full",
        description='"full": backbone + head; "frozen": head only, on features computed once; "lora": adapters + head',
    )
    lora_rank: int = Field(
        16, ge=1, le=WIDEST, description="adapter rank: small next to D (2432 in SD3.5-L), as HPSv3/Flow-GRPO use"
    )
    lora_alpha: float = Field(
        16.0, gt=0.0, description="adapter scale alpha / rank = 1: the lr needs no retuning when the rank changes"
    )
    lora_targets: Names = Field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS), description="attention qkv/out, FFN"
    )
    save_adapter: bool = Field(
        False, description="lora: also write out_dir/adapter (in save_adapter_format) next to the merged reward/"
    )
    save_adapter_format: Literal[ADAPTER_FORMATS] = Field(  # type: ignore[valid-type]
        "peft", description='"peft" loads onto the engine\'s backbone; "diffusers" onto SD3 (q/k/v split)'
    )
    # loss
    loss: Literal[LOSSES] = Field(  # type: ignore[valid-type]
        "bt",
        description='"bt" (Eq. 6), "uncertainty" (HPSv3: the head predicts mean and log-std), "btt" (BT with ties)',
    )
    tied_threshold: float = Field(
        0.1, ge=0.0, lt=1.0, description="btt: a pair is a tie when |c1 - c2| / (c1 + c2) <= this (55/45 or closer)"
    )
    # optimisation
    steps: int = Field(2000, ge=1, description="optimizer steps")
    batch_size: int = Field(
        32, ge=1, description="global pairs per optimizer step = processes x grad_accum_steps x micro-batch"
    )
    grad_accum_steps: int = Field(
        1, ge=1, description="micro-steps per optimizer step: a large effective batch with one micro-batch's memory"
    )
    lr_backbone: float = Field(
        1e-5, ge=0.0, description="small: the backbone is pretrained and its features are what we pay for"
    )
    lr_head: float = Field(1e-4, ge=0.0, description="the head starts from random init and needs a larger step")
    weight_decay: float = Field(
        0.01, ge=0.0, description="AdamW default scale; regularises the freshly initialised head"
    )
    betas: Annotated[list[Annotated[float, Field(ge=0.0, lt=1.0)]], Field(min_length=2, max_length=2)] = Field(
        default_factory=lambda: [0.9, 0.999], description="AdamW defaults; BT gradients are not spiky"
    )
    warmup_ratio: float = Field(
        0.05, ge=0.0, lt=1.0, description="linear warmup over the first 5% of steps protects the pretrained backbone"
    )
    schedule: Literal["cosine", "constant"] = Field(
        "cosine", description='"cosine" (to min_lr_ratio) or "constant" after warmup'
    )
    min_lr_ratio: float = Field(
        0.1, ge=0.0, le=1.0, description="cosine floor as a fraction of the peak lr (nanoGPT: lr / 10)"
    )
    grad_clip: float = Field(1.0, ge=0.0, description="clip the global grad norm; 0 disables")
    grad_checkpointing: bool = Field(
        False, description="recompute each block in backward: ~1/3 more compute for O(1)-block memory"
    )
    # run
    seed: int = Field(
        0, ge=0, lt=2**32, description="head init, data order and training noise (per-epoch and per-step seeds)"
    )
    val_t: list[Annotated[float, Field(gt=0.0, lt=1.0)]] | None = Field(
        None, min_length=1, max_length=64, description="also validate at these t (a row per file and t); None: t only"
    )
    ema_decay: float | None = Field(
        None, gt=0.0, lt=1.0, description="EMA of the trainable weights (validation and export read it); None: off"
    )
    eval_seed: Seed = Field(1234, description="validation noise: image k of a file uses stream k (as bench.accuracy)")
    out_dir: Name = Field(
        "runs/dit-reward", description="log.jsonl, checkpoints/, reward/ (the final reward checkpoint)"
    )
    log_every: int = Field(10, ge=1, description="steps between log lines (each is a cross-rank sync)")
    eval_every: int = Field(0, ge=0, description="steps between validations; 0: only at the end")
    checkpoint_every: int = Field(200, ge=0, description="steps between resumable checkpoints; 0: only at the end")
    keep_checkpoints: int = Field(2, ge=1, description="older resumable checkpoints are deleted")
    eval_batch_size: int = Field(64, ge=1, description="pairs per validation forward")
    device: str = Field("auto", description='"auto": cuda (this rank\'s GPU) if available, else cpu')
    peak_flops: float = Field(
        0.0, ge=0.0, description="per-device peak for MFU; 0: detect on known GPUs, else MFU is not reported"
    )
    resume_on_changed_data: bool = Field(
        False, description="resume even if the data files, their filtering or the cache changed"
    )

    @field_validator("train_json", "val_json", mode="before")
    @classmethod
    def _one_file_is_a_list(cls, value: Any) -> Any:
        """One path for a list of paths: ``train_json=/data/train.json`` on a command line, as for a single file."""
        return [os.fspath(value)] if isinstance(value, (str, os.PathLike)) else value

    @field_validator("layers", "text_layers")
    @classmethod
    def _increasing(cls, layers: list[int] | None) -> list[int] | None:
        if layers is not None and layers != sorted(set(layers)):
            raise ValueError("strictly increasing block indices (each block pooled once)")
        return layers

    @field_validator("device")
    @classmethod
    def _a_device(cls, device: str) -> str:
        if not _DEVICE.fullmatch(device):
            raise ValueError("'auto', 'cpu', 'cuda' or 'cuda:N'")
        return device

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> TrainConfig:
        if self.batch_size % self.grad_accum_steps:
            raise invalid(
                "grad_accum_steps", self.grad_accum_steps, f"a divisor of batch_size {self.batch_size} (each "
                "micro-batch holds batch_size / (processes x grad_accum_steps) pairs)"
            )  # fmt: skip
        if self.lora_alpha > MAX_LORA_SCALE * self.lora_rank:
            raise invalid(
                "lora_alpha", self.lora_alpha, f"at most {MAX_LORA_SCALE:g} x lora_rank = "
                f"{MAX_LORA_SCALE * self.lora_rank:g} (the scale alpha / rank multiplies the adapters' learning rate)"
            )  # fmt: skip
        if self.mode == "lora" and importlib.util.find_spec("peft") is None:
            raise invalid("mode", self.mode, "'full' or 'frozen': 'lora' needs peft (pip install dit-reward[train])")
        if self.t_min >= self.t_max:
            raise invalid("t_max", self.t_max, f"a value above t_min {self.t_min}")
        if self.text_layers and self.head != "query_attention":
            raise invalid("text_layers", self.text_layers, "[] unless head is 'query_attention' (the MLP reads none)")
        width = self.query_attention.width
        if (
            self.head == "query_attention"
            and width is not None
            and (width % self.query_attention.num_heads or width % 4)
        ):
            raise invalid(
                "query_attention", self.query_attention.to_dict(), "a width divisible by num_heads and by 4"
            )  # fmt: skip
        if self.save_adapter and self.mode != "lora":
            raise invalid("save_adapter", True, "false unless mode is 'lora' (it writes the LoRA adapters)")
        for name in ("lr_backbone", "lr_head"):
            if getattr(self, name) * self.weight_decay >= 1.0:
                raise invalid(
                    "weight_decay", self.weight_decay, f"a value with {name} x weight_decay < 1 (AdamW multiplies "
                    "every weight by 1 - lr x weight_decay each step)"
                )  # fmt: skip
        backbone: BackboneConfig | None = (info.context or {}).get("backbone")
        if backbone is not None:
            self._fits(backbone)
        return self

    def _fits(self, backbone: BackboneConfig) -> None:
        """The rules of the base: its blocks, and its width (a rank-r update of a D-wide linear has rank <= D)."""
        if self.text_layers and self.text_layers[-1] >= backbone.num_layers - 1:
            raise invalid(
                "text_layers", self.text_layers, f"block indices below {backbone.num_layers - 1} (the base's last "
                "block has no text output)"
            )  # fmt: skip
        width = self.query_attention.width or backbone.hidden_size
        if self.head == "query_attention" and (width % self.query_attention.num_heads or width % 4):
            raise invalid(
                "query_attention", self.query_attention.to_dict(), f"a width (None: the base's {width}) divisible by "
                "num_heads and by 4"
            )  # fmt: skip
        if self.layers is not None and self.layers[-1] >= backbone.num_layers:
            raise invalid(
                "layers", self.layers, f"block indices below {backbone.num_layers} (the base has "
                f"{backbone.num_layers} blocks)"
            )  # fmt: skip
        if self.mode == "lora" and self.lora_rank > backbone.hidden_size:
            raise invalid(
                "lora_rank", self.lora_rank, f"at most {backbone.hidden_size}, the base's width (every adapted linear "
                f"is at least {backbone.hidden_size} wide each way: a larger rank adds parameters, not rank)"
            )  # fmt: skip

    def check_against_base(self, backbone: BackboneConfig) -> None:
        """SchemaError naming the field when `self` does not fit `backbone` (the config of `self.base`)."""
        validate(TrainConfig, self.to_dict(), f"config for the base {self.base}", context={"backbone": backbone})


def defaults() -> dict[str, Any]:
    """The default of every field that has one (what a checkpoint that predates a field ran with)."""
    return {
        name: field.get_default(call_default_factory=True)
        for name, field in TrainConfig.model_fields.items()
        if not field.is_required()
    }


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults, then a JSON file (read by `engine.io.files.read_json`), then ``key=value`` overrides
    (`engine.schema.parse_assignments`), validated once."""
    from engine.io.files import read_json

    values: dict[str, Any] = {}
    source = "key=value arguments"
    if path is not None:
        values = read_json(path, "training config")
        if not isinstance(values, dict):
            return validate(TrainConfig, values, os.fspath(path))  # (refused: not an object of fields)
        source = os.fspath(path) + (" with key=value arguments" if overrides else "")
    values = {**values, **parse_assignments(TrainConfig, overrides or [], source)}
    return validate(TrainConfig, values, source)


__all__ = ["MAX_HEAD_WIDTH", "MAX_LORA_SCALE", "MODES", "TrainConfig", "defaults", "load_config"]
