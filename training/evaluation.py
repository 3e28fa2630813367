"""Validation: rewards of a file's pairs under the fixed validation noise, and pairwise accuracy."""

from __future__ import annotations

import torch

from training.batching import Forward, pair_forward
from training.cache import LatentCache
from training.data import PreferencePair


@torch.no_grad()
def pair_rewards(
    forward: Forward,
    pairs: list[PreferencePair],
    cache: LatentCache,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> torch.Tensor:
    """Outputs [n, 2, ...] (winner, loser) of one file's pairs with the validation noise: `forward(z0, embeds, pooled,
    noise)` runs once per latent shape of each batch (`training.batching`), and pair i's images use noise streams 2i
    and 2i+1 of `seed`, as `bench.accuracy` does."""
    out = []
    for start in range(0, len(pairs), batch_size):
        b = cache.batch(pairs[start : start + batch_size])
        streams = range(2 * start, 2 * (start + len(b["winners"])))
        winners, losers, embeds, pooled = b["winners"], b["losers"], b["prompt_embeds"], b["pooled"]
        r = pair_forward(forward, winners, losers, embeds, pooled, seed=seed, streams=streams, device=device)
        out.append(r.float().cpu())
    return torch.cat(out)


def accuracy(rewards: torch.Tensor) -> float:
    """Fraction of pairs [n, 2] with r_w > r_l; a tie counts as wrong (as HPSv3 counts)."""
    return float((rewards[:, 0] > rewards[:, 1]).float().mean())


__all__ = ["accuracy", "pair_rewards"]
