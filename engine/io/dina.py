"""DiNa-LRM checkpoints (HKUST-C4G/diffusion-rm, e.g. `liuhuohuo/DiNa-LRM-SD35M-12layers`) as published:

    config.json                          the training config; its `model` section describes the reward
    checkpoint/backbone_lora/            a peft LoRA adapter on the first N blocks of the base MMDiT
    checkpoint/rm_head.pt                the head's state dict (`torch.save`)

They map onto this engine as a query-attention head (`engine.heads.query_attention`, same parameter names) over the
image tokens of blocks `visual_head_idx` and the text tokens of blocks `text_head_idx` (1-based there: K is the
output of 0-based block K - 1), on the base model with the LoRA merged into its weights at load (no peft at
inference). Their noise level `u` is a target sigma snapped to the base scheduler's FlowMatch table
(`engine.schedule`, kind `flow_match_table`), as their `DRMInferencer.reward` does; the default t is u = 0.4, the
middle of the levels they validate at (0.3, 0.4, 0.5). Their published recipe encodes prompts with T5 length 128
(prompt_embeds of 77 + 128 = 205 tokens); the head attends over every text token, padding included.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ConfigDict, Field, model_validator

from engine.config import QueryAttentionConfig, RewardConfig
from engine.io.files import inside, is_regular_file, read_json
from engine.schedule import TimeSchedule
from engine.schema import Schema, invalid, validate

DINA_CONFIG = "config.json"
LORA_DIR = "checkpoint/backbone_lora"
HEAD_FILE = "checkpoint/rm_head.pt"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
DEFAULT_U = 0.4  # their validation levels are u = 0.3, 0.4, 0.5
T5_TOKENS = 128  # the T5 length the published head was trained at (prompt_embeds of 77 + 128 tokens)
MAX_HEAD_BYTES = 2 * 2**30  # the published SD3.5-M head is ~0.2 GB in bf16


class DinaHeadSection(Schema):
    """`model.reward_head` of their config (`dropout` is a no-op at inference)."""

    model_config = ConfigDict(extra="allow")

    use_proj_in: bool = False
    width: int = Field(-1, ge=-1, le=65536, description="head width W; -1 means the backbone width")
    out_dim: int = Field(1, ge=1, le=1, description="one reward per image")
    num_queries: int = Field(4, ge=1, le=1024)
    num_attn_heads: int = Field(8, ge=1, le=1024)
    dropout: float = Field(0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _width(self) -> DinaHeadSection:
        if self.width == 0 or 0 < self.width < 4:
            raise invalid("model.reward_head.width", self.width, "-1 (the backbone width) or a width >= 4")
        return self


class DinaModelSection(Schema):
    """The keys of their config's `model` section that inference reads (the dump's other keys are accepted)."""

    model_config = ConfigDict(extra="allow")

    num_transformer_layers: int = Field(ge=1, le=256, description="the leading blocks their backbone keeps")
    use_lora: bool = True
    freeze_backbone: bool = False
    use_logistic: bool = Field(False, description="a logistic output whose parameters no checkpoint file holds")
    visual_head_idx: list[int] = Field(min_length=1, max_length=256, description="1-based blocks: image tokens")
    text_head_idx: list[int] = Field(min_length=1, max_length=256, description="1-based blocks: text tokens")
    reward_head: DinaHeadSection = Field(default_factory=DinaHeadSection)

    @model_validator(mode="after")
    def _supported(self) -> DinaModelSection:
        if self.use_logistic:
            raise invalid(
                "model.use_logistic",
                True,
                "false (its eta3/eta4 are saved in neither rm_head.pt nor the LoRA: unsupported)",
            )
        for name in ("visual_head_idx", "text_head_idx"):
            blocks = getattr(self, name)
            if len(set(blocks)) != len(blocks) or not all(1 <= i <= self.num_transformer_layers for i in blocks):
                raise invalid(
                    f"model.{name}",
                    blocks,
                    f"distinct 1-based block indices in [1, {self.num_transformer_layers}] (0, the embedding "
                    "outputs, is not supported)",
                )
        if self.use_lora == self.freeze_backbone:
            expected = f"{not self.freeze_backbone} when freeze_backbone is {self.freeze_backbone}"
            raise invalid("model.use_lora", self.use_lora, f"{expected} (a LoRA-tuned backbone, or the frozen base)")
        return self


class DinaTrainingSection(Schema):
    model_config = ConfigDict(extra="allow")

    add_noise: bool = Field(True, description="the reward noises the latents to u (false is not supported)")


class DinaConfig(Schema):
    model_config = ConfigDict(extra="allow")  # (training, data, paths, logging, system: the run's record)

    model: DinaModelSection
    training: DinaTrainingSection = Field(default_factory=DinaTrainingSection)

    @model_validator(mode="after")
    def _noised(self) -> DinaConfig:
        if not self.training.add_noise:
            raise invalid("training.add_noise", False, "true (a reward that never noises its input is not supported)")
        return self


class SchedulerConfig(Schema):
    """The base's `scheduler/scheduler_config.json` fields that decide the FlowMatch training table."""

    model_config = ConfigDict(extra="allow")

    num_train_timesteps: int = Field(1000, ge=2, le=100000)
    shift: float = Field(1.0, gt=0.0, le=1000.0)
    use_dynamic_shifting: bool = Field(False, description="a shift chosen per resolution: no fixed table")


@dataclass(frozen=True)
class DinaCheckpoint:
    """A DiNa-LRM checkpoint read and checked: the engine's reward config, and its files."""

    reward: RewardConfig
    lora: Path | None  # the peft adapter directory (None: the frozen base)
    head: Path  # rm_head.pt


def is_dina_checkpoint(directory: Path) -> bool:
    return is_regular_file(directory / DINA_CONFIG, "DiNa-LRM config") and (directory / "checkpoint").is_dir()


def read_dina_checkpoint(directory: str | os.PathLike, base: str | os.PathLike) -> DinaCheckpoint:
    """Read `config.json` (its `model` section checked), and the time schedule from the base's scheduler config
    (SD3.5's FlowMatch table, 1000 steps and shift 3.0, when the base is a single file without one)."""
    directory = Path(directory)
    path = inside(directory, DINA_CONFIG, f"{directory}: DiNa-LRM config")
    model = validate(DinaConfig, read_json(path, "DiNa-LRM config"), str(path)).model
    head = model.reward_head
    reward = RewardConfig(
        layers=tuple(sorted(i - 1 for i in model.visual_head_idx)),  # their features follow block order
        text_layers=tuple(sorted(i - 1 for i in model.text_head_idx)),
        t=DEFAULT_U,
        head="query_attention",
        head_outputs=head.out_dim,
        query_attention=QueryAttentionConfig(
            width=None if head.width == -1 else head.width,
            num_queries=head.num_queries,
            num_heads=head.num_attn_heads,
            proj_in=head.use_proj_in,
        ),
        schedule=_schedule(Path(base)),
    )
    lora = None
    if model.use_lora:
        lora = inside(directory, LORA_DIR, f"{path}: the LoRA adapter")
        if not lora.is_dir():
            raise FileNotFoundError(f"{lora}: missing, expected the peft adapter of a use_lora checkpoint ({path})")
    head_path = inside(directory, HEAD_FILE, f"{path}: the head")
    if not is_regular_file(head_path, "DiNa-LRM head"):
        raise FileNotFoundError(f"{head_path}: missing, expected the head's state dict (torch.save)")
    return DinaCheckpoint(reward=reward, lora=lora, head=head_path)


def _schedule(base: Path) -> TimeSchedule:
    path = base / SCHEDULER_CONFIG
    if not base.is_dir() or not is_regular_file(path, "scheduler config"):
        return TimeSchedule(kind="flow_match_table", num_train_timesteps=1000, shift=3.0)
    scheduler = validate(SchedulerConfig, read_json(path, "scheduler config"), str(path))
    if scheduler.use_dynamic_shifting:
        raise ValueError(f"{path}: use_dynamic_shifting: got true, expected false (a fixed FlowMatch table)")
    return TimeSchedule(
        kind="flow_match_table", num_train_timesteps=scheduler.num_train_timesteps, shift=scheduler.shift
    )


def read_head_state(path: Path) -> dict[str, torch.Tensor]:
    """rm_head.pt as {name: tensor} on the CPU.

    DiNa-LRM publishes its head as `torch.save(state_dict)`, a pickle. Loading with `weights_only=True` uses torch's
    restricted unpickler: it rebuilds tensors, containers and primitive values only and refuses every other global,
    so the file cannot run code while it is read. This published format is the only thing the project unpickles."""
    size = path.stat().st_size
    if size > MAX_HEAD_BYTES:
        raise ValueError(f"{path}: {size} bytes, more than the {MAX_HEAD_BYTES} a reward head's state dict needs")
    try:
        state: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or hostile file fails in many ways (UnpicklingError, EOFError, ...): all bad
        raise ValueError(f"{path}: not a PyTorch state dict readable with weights_only=True ({e})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{path}: holds a {type(state).__name__}, expected a state dict (tensor names -> tensors)")
    return dict(state)


__all__ = [
    "DEFAULT_U",
    "T5_TOKENS",
    "DinaCheckpoint",
    "is_dina_checkpoint",
    "read_dina_checkpoint",
    "read_head_state",
]
