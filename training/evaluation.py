"""Validation: rewards of a file's pairs under the fixed validation noise, and pairwise accuracy."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from training.batching import Forward, pair_forward
from training.cache import LatentCache
from training.data import PreferencePair

PairBatch = tuple[Sequence[torch.Tensor], Sequence[torch.Tensor], torch.Tensor, torch.Tensor]
BatchSource = Callable[[list[PreferencePair]], PairBatch]


def cache_batches(cache: LatentCache) -> BatchSource:
    """The batch source of pairs already in `cache`: a chunk of pairs -> (winners, losers, prompt_embeds, pooled)."""

    def batches(chunk: list[PreferencePair]) -> PairBatch:
        b = cache.batch(chunk)
        return b["winners"], b["losers"], b["prompt_embeds"], b["pooled"]

    return batches


@torch.no_grad()
def pair_rewards(
    forward: Forward,
    pairs: list[PreferencePair],
    source: LatentCache | BatchSource,
    batch_size: int,
    seed: int,
    device: torch.device | str,
) -> torch.Tensor:
    """Outputs [n, 2, ...] (winner, loser) of one file's pairs with the validation noise: `forward(z0, embeds, pooled,
    noise)` runs once per latent shape of each batch (`training.batching`), and pair i's images use noise streams 2i
    and 2i+1 of `seed`. `source` gives each chunk of `batch_size` pairs as (winners, losers, prompt_embeds, pooled)
    (`BatchSource`); a `LatentCache` reads them from the cache (`cache_batches`), as the trainer does, and
    `bench.accuracy` passes one that encodes the images and prompts of the chunk."""
    batches = cache_batches(source) if isinstance(source, LatentCache) else source
    out = []
    for start in range(0, len(pairs), batch_size):
        winners, losers, embeds, pooled = batches(pairs[start : start + batch_size])
        streams = range(2 * start, 2 * (start + len(winners)))
        r = pair_forward(forward, winners, losers, embeds, pooled, seed=seed, streams=streams, device=device)
        out.append(r.float().cpu())
    return torch.cat(out)


def accuracy(rewards: torch.Tensor) -> float:
    """Fraction of pairs [n, 2] with r_w > r_l; a tie counts as wrong (as HPSv3 counts)."""
    return float((rewards[:, 0] > rewards[:, 1]).float().mean())


__all__ = ["BatchSource", "PairBatch", "accuracy", "cache_batches", "pair_rewards"]
