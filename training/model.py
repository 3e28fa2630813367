"""The trainable reward model: the engine's backbone and head as one differentiable module."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.api import RewardEngine
from engine.model.mmdit import BackboneOutputs
from training.config import TrainConfig
from training.lora import add_lora
from training.losses import HEAD_OUTPUTS


class TrainableReward(nn.Module):
    """The engine's backbone and head as one differentiable module (Eq. 1-5): the root FSDP2 shards, with one unit per
    backbone block. Shares the engine's parameters and backends and runs the backbone's own forward, handing it temb
    instead of precomputed modulations so each block computes its adaLN vectors inside its forward (FSDP2 gathers
    those weights with the block; checkpointing recomputes them). Equals `engine.score` for the same noise."""

    def __init__(self, engine: RewardEngine, grad_checkpointing: bool = False):
        super().__init__()
        self.backbone, self.head = engine.backbone, engine.head
        self.backbone.gradient_checkpointing = grad_checkpointing
        self.layers, self.t, self.backends = self.backbone.layers, engine.reward_config.t, engine.backends

    def outputs(
        self,
        z0: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        noise: torch.Tensor | None = None,
        seed: int | None = None,
        image_offset: int = 0,
        t: float | torch.Tensor | None = None,
    ) -> BackboneOutputs:
        """z0 [B, C, h, w] transformer-space latents, prompt_embeds [B, L, joint_dim], pooled [B, pooled_dim]; noise
        [B, C, h, w] or (seed, image_offset) as in `engine.features`; t: None (the engine's t), a float, or [B]
        float32 (each latent's own level, as `engine.score(t=Tensor[B])`) -> what the head reads."""
        dtype = self.backbone.context_embedder.weight.dtype
        prompt_embeds, pooled = prompt_embeds.to(dtype), pooled.to(dtype)
        if not isinstance(t, torch.Tensor):
            level = self.t if t is None else float(t)
            context, temb = self.backbone.embed_prompt(prompt_embeds, pooled, level)
        else:  # each row's sigma and timestep through the model's schedule, as `engine.score` maps them
            schedule = self.backbone.schedule
            sigmas = [schedule.sigma(v) for v in t.tolist()]
            level = torch.tensor(sigmas, dtype=torch.float32, device=z0.device)
            timesteps = torch.tensor([schedule.timestep(s) for s in sigmas], dtype=torch.float32, device=z0.device)
            context, temb = (
                self.backbone.context_embedder(prompt_embeds),
                self.backbone.time_text_embed(timesteps, pooled),
            )
        return self.backbone(z0, context, temb, level, self.backends, noise, seed, image_offset)

    def features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Pooled features [B, n_layers, D] float32 of a mean-pool head; arguments as `outputs`."""
        return self.outputs(*args, **kwargs).pooled

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Head predictions [B, head_outputs] float32 (Eq. 5): column 0 is the reward (an uncertainty head's mean),
        column 1 an uncertainty head's log-std; arguments as `outputs`."""
        return self.head.predict(self.outputs(*args, **kwargs))


def build_engine(cfg: TrainConfig, device: torch.device | str = "cpu") -> RewardEngine:
    """The engine a run trains: cfg.base's backbone in fp32 at cfg.layers / cfg.t and a fresh cfg.head for cfg.loss;
    the backbone trains whole in mode "full", not at all in "frozen", and in "lora" only through adapters on
    cfg.lora_targets. The trainer builds it, and the export of a sharded run builds its unsharded copy the same way."""
    engine = RewardEngine.from_base(
        cfg.base,
        layers=cfg.layers,
        t=cfg.t,
        dtype=torch.float32,
        device=device,
        head_hidden=cfg.head_hidden,
        head_outputs=HEAD_OUTPUTS[cfg.loss],
        reward={"head": cfg.head, "text_layers": tuple(cfg.text_layers), "query_attention": cfg.query_attention},
    )
    engine.backbone.requires_grad_(cfg.mode == "full")
    if cfg.mode == "lora":  # adapters on the blocks' projections; the base weights stay frozen
        add_lora(engine.backbone, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    return engine


__all__ = ["TrainableReward", "build_engine"]
