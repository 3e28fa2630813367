"""Reward heads behind one interface (`RewardHead`: a `Readout` of the backbone and `predict(outputs)`).
`build_head` is the only place that knows the head types."""

from __future__ import annotations

from engine.config import BackboneConfig, RewardConfig
from engine.heads.base import RewardHead
from engine.heads.mean_pool import MeanPoolHead
from engine.heads.query_attention import QueryAttentionHead


def build_head(reward: RewardConfig, backbone: BackboneConfig) -> RewardHead:
    """A freshly initialised head of `reward`'s type and sizes (on the default device; `torch.device("meta")`
    builds its shapes only)."""
    if reward.head == "mean_pool":
        return MeanPoolHead(tuple(reward.layers), backbone.hidden_size, tuple(reward.head_hidden), reward.head_outputs)
    qa = reward.query_attention
    return QueryAttentionHead(
        tuple(reward.layers),
        tuple(reward.text_layers),
        backbone.hidden_size,
        width=qa.width,
        num_queries=qa.num_queries,
        num_heads=qa.num_heads,
        outputs=reward.head_outputs,
        proj_in=qa.proj_in,
    )


__all__ = ["MeanPoolHead", "QueryAttentionHead", "RewardHead", "build_head"]
