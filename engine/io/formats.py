"""The one dispatch over reward checkpoint formats: `open_reward_checkpoint(directory, base)` recognises the layout
of a `from_pretrained` directory and returns what the engine is built from.

- this engine's own (`engine.io.checkpoint`): `reward_config.json`, `head.safetensors`, optional
  `backbone.safetensors`;
- DiNa-LRM's (`engine.io.dina`): `config.json` with a `model` section, `checkpoint/backbone_lora/`,
  `checkpoint/rm_head.pt`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import BackboneConfig, RewardConfig
from engine.heads import RewardHead
from engine.io import dina
from engine.io.backbone import base_source
from engine.io.checkpoint import REWARD_CONFIG, head_from_state, load_head, read_reward_config
from engine.io.files import is_regular_file
from engine.io.lora import LoraAdapter, read_lora_adapter
from engine.io.sources import TensorSource
from engine.prompt_length import recorded_t5_tokens


@dataclass
class RewardCheckpoint:
    """What a checkpoint directory (and its base) gives the engine: its configs, the backbone's weight sources (later
    ones win), a LoRA adapter merged into them at load, the head (read and checked when called), and the T5 prompt
    length it was trained at (None: not recorded; `engine.prompt_length`)."""

    reward: RewardConfig
    backbone: BackboneConfig
    sources: list[Mapping[str, torch.Tensor]]
    adapter: LoraAdapter | None
    head: Callable[[], RewardHead]
    t5_tokens: int | None


def open_reward_checkpoint(checkpoint: str | os.PathLike, base: str | os.PathLike | None = None) -> RewardCheckpoint:
    """The checkpoint in `checkpoint` on the base model `base` (a diffusers directory or single file; optional when
    the checkpoint holds every backbone weight). Errors name the file and what was expected."""
    directory = Path(checkpoint)
    if not is_regular_file(directory / REWARD_CONFIG, "reward config") and is_regular_file(
        directory / dina.DINA_CONFIG, "DiNa-LRM config"
    ):
        return _open_dina(directory, base)
    return _open_own(directory, base)


def _open_own(directory: Path, base: str | os.PathLike | None) -> RewardCheckpoint:
    meta, reward, cfg = read_reward_config(directory)
    sources: list[Mapping[str, torch.Tensor]] = []
    if base is not None:
        base_cfg, source = base_source(base, cfg)
        if base_cfg != cfg and base_cfg != BackboneConfig(**{**cfg.to_dict(), "sample_size": base_cfg.sample_size}):
            raise ValueError(
                f"base model {base} has config {base_cfg}, but the reward checkpoint {directory} was trained on {cfg}"
            )
        sources.append(source)
    if meta["backbone_weights"] is not None:  # (a path checked to lie inside the checkpoint)
        sources.append(TensorSource([meta["backbone_weights"]]))
    if not sources:
        raise ValueError(
            f"reward checkpoint {directory} holds no backbone weights: pass base=<SD3.5 diffusers directory or single "
            f".safetensors file>"
        )
    t5_tokens = recorded_t5_tokens(meta["metadata"], str(directory / REWARD_CONFIG))
    return RewardCheckpoint(reward, cfg, sources, None, lambda: load_head(directory, reward, cfg), t5_tokens)


def _open_dina(directory: Path, base: str | os.PathLike | None) -> RewardCheckpoint:
    if base is None:
        raise ValueError(
            f"{directory} is a DiNa-LRM checkpoint (a LoRA and a head, no backbone weights): pass base=<the SD3.5 "
            f"diffusers directory it was trained on, e.g. stabilityai/stable-diffusion-3.5-medium>"
        )
    cfg, source = base_source(base)
    found = dina.read_dina_checkpoint(directory, base)
    try:
        found.reward.check_against(cfg)
    except ValueError as e:
        raise ValueError(f"{directory / dina.DINA_CONFIG}: model: {e} (base model {base})") from None
    adapter = read_lora_adapter(found.lora) if found.lora is not None else None

    def head() -> RewardHead:
        return head_from_state(found.reward, cfg, dina.read_head_state(found.head), str(found.head))

    return RewardCheckpoint(found.reward, cfg, [source], adapter, head, dina.T5_TOKENS)


__all__ = ["RewardCheckpoint", "open_reward_checkpoint"]
