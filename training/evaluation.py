"""Validation: rewards of a file's pairs under the fixed validation noise, and pairwise accuracy."""

from __future__ import annotations

from collections.abc import Callable

import torch

from training.cache import LatentCache
from training.data import PreferencePair


def interleave(winners: torch.Tensor, losers: torch.Tensor) -> torch.Tensor:
    """[B, ...] x 2 -> [2B, ...] as w0, l0, w1, l1, ...: pair i's images are images 2i and 2i+1 of the file, whose
    noise streams (seed path of Eq. 1) `bench.accuracy` reproduces."""
    return torch.stack([winners, losers], dim=1).flatten(0, 1)


@torch.no_grad()
def pair_rewards(
    score: Callable[..., torch.Tensor],
    pairs: list[PreferencePair],
    cache: LatentCache,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> torch.Tensor:
    """Rewards [n, 2] (winner, loser) of one file's pairs, with the validation noise: `score(z0, embeds, pooled,
    seed=, image_offset=)` is called on interleaved batches."""
    out = []
    for start in range(0, len(pairs), batch_size):
        b = cache.batch(pairs[start : start + batch_size])
        z0 = interleave(b["winners"], b["losers"]).to(device)
        embeds = b["prompt_embeds"].repeat_interleave(2, dim=0).to(device)
        pooled = b["pooled"].repeat_interleave(2, dim=0).to(device)
        out.append(score(z0, embeds, pooled, seed=seed, image_offset=2 * start).float().view(-1, 2).cpu())
    return torch.cat(out)


def accuracy(rewards: torch.Tensor) -> float:
    """Fraction of pairs [n, 2] with r_w > r_l; a tie counts as wrong (as HPSv3 counts)."""
    return float((rewards[:, 0] > rewards[:, 1]).float().mean())


__all__ = ["accuracy", "interleave", "pair_rewards"]
