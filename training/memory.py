"""Trainable parameters and the training state's memory of a preset backbone, counted on the meta device (no weights
are allocated, so SD3.5-L's 8B parameters count in a second on a laptop).

    python -m training.memory --preset sd35-large            # full vs LoRA, the trainer's fp32 weights
    python -m training.memory --preset sd35-large --lora-rank 64 --frozen-dtype bf16

What is counted: the weights (the trainer keeps them in fp32 and computes under bf16 autocast; `frozen_dtype` may hold
the frozen base weights of a LoRA run in bf16), one fp32 gradient per trainable parameter and AdamW's two fp32 moments
per trainable parameter. Not counted: activations (they scale with batch, image size and grad_checkpointing), the
autocast weight casts (one block at a time) and the allocator's slack."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from pydantic import Field

from engine.config import PRESETS, BackboneConfig, RewardConfig
from engine.heads import build_head
from engine.model.mmdit import MMDiTReward
from engine.schema import Schema, parse_cli
from training.lora import DEFAULT_LORA_TARGETS, add_lora

GIB = 2**30


@dataclass(frozen=True)
class TrainingMemory:
    mode: str
    total_params: int
    trainable_params: int
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.grads_bytes + self.optimizer_bytes


def training_memory(
    preset: str = "sd35-large",
    mode: str = "full",
    lora_rank: int = 16,
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS,
    frozen_dtype: torch.dtype = torch.float32,
    head_outputs: int = 1,
) -> TrainingMemory:
    """Counts for `mode` "full" (backbone + head trained) or "lora" (adapters + head trained, the base frozen in
    `frozen_dtype`) of the preset's reward model (blocks 0..max(default layers), the paper's head)."""
    if mode not in ("full", "lora"):
        raise ValueError(f"mode must be 'full' or 'lora', got {mode!r}")
    cfg = BackboneConfig.from_name(preset)
    reward = RewardConfig.for_backbone(cfg, head_outputs=head_outputs)
    with torch.device("meta"):
        backbone = MMDiTReward(cfg, reward.layers)
        head = build_head(reward, cfg)
        if mode == "lora":
            add_lora(backbone, lora_rank, float(lora_rank), lora_targets)  # alpha does not change the counts
    params = [*backbone.parameters(), *head.parameters()]
    if mode == "full":
        for p in params:
            p.requires_grad_(True)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    frozen = sum(p.numel() for p in params if not p.requires_grad)
    fp32 = 4
    return TrainingMemory(
        mode=mode,
        total_params=trainable + frozen,
        trainable_params=trainable,
        weights_bytes=trainable * fp32 + frozen * frozen_dtype.itemsize,
        grads_bytes=trainable * fp32,
        optimizer_bytes=2 * trainable * fp32,  # AdamW exp_avg and exp_avg_sq
    )


class MemoryFlags(Schema):
    preset: Literal[tuple(PRESETS)] = Field("sd35-large", description="backbone preset")  # type: ignore[valid-type]
    lora_rank: int = Field(
        16, ge=1, le=max(c.hidden_size for c in PRESETS.values()), description="adapter rank (at most the width)"
    )
    frozen_dtype: Literal["fp32", "bf16"] = Field("fp32", description="LoRA's frozen base weights")


def main(argv: list[str] | None = None) -> None:
    args = parse_cli(MemoryFlags, argv, "python -m training.memory", __doc__.split("\n\n")[0])
    frozen = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.frozen_dtype]
    print(f"{args.preset}: trainable parameters and training state (weights + fp32 grads + AdamW), no activations")
    for mode in ("full", "lora"):
        m = training_memory(args.preset, mode, args.lora_rank, frozen_dtype=frozen)
        name = "full" if mode == "full" else f"lora r={args.lora_rank} (base {args.frozen_dtype})"
        parts = {k: v / GIB for k, v in asdict(m).items() if k.endswith("_bytes")}
        print(
            f"  {name:<28} trainable {m.trainable_params / 1e6:9.2f} M of {m.total_params / 1e9:.3f} B  "
            + "  ".join(f"{k.removesuffix('_bytes')} {v:6.2f} GiB" for k, v in parts.items())
            + f"  total {m.total_bytes / GIB:6.2f} GiB"
        )


if __name__ == "__main__":
    main()


__all__ = ["MemoryFlags", "TrainingMemory", "main", "training_memory"]
