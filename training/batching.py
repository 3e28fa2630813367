"""Mixed-size batches: one forward per latent shape, outputs back in the caller's order.

Images of a preference set come in many aspect-ratio buckets and the two images of a pair often differ, so a batch
cannot be stacked into one tensor. `grouped_forward` groups a batch's images by latent shape, runs the model once per
shape (in one fixed order of shapes) and puts the outputs back in input order; `pair_forward` does so for the
interleaved images of preference pairs (w0, l0, w1, l1, ...) and returns them as [B, 2, ...]. The trainer (full and
frozen-feature paths), `training.probe` and `bench.accuracy` all go through it.

Seeded noise follows the engine's stream layout (`kernels.noise.noise_ref`): image i of a call uses stream
`streams[i]`, whatever the shapes of the other images, so an image's reward does not depend on how its batch was
grouped. A per-image noise level `t` ([N] float32, the trainer's noise-aware pairs) follows its images into their
group and reaches `forward` as its keyword `t`.

FSDP2: every rank must run the same sequence of block forwards in a step (each block's all-gather is a collective).
`rank_positions` deals a global batch's pairs to the ranks so each gets the same number, and the same ordered shapes
when the counts divide; `schedule` (the global batch's shapes, sorted) makes every rank run every shape in the same
order, a rank without images of a shape running that shape on an empty slice.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch

from kernels.noise import noise_ref

Shape = tuple[int, ...]
# forward(z0 [n, C, h, w], prompt_embeds [n, L, D], pooled [n, P], noise [n, C, h, w] | None) -> [n, ...]
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def shape_schedule(latents: Sequence[torch.Tensor]) -> list[Shape]:
    """The distinct latent shapes of a batch, sorted: the order `grouped_forward` runs them in."""
    return sorted({tuple(x.shape) for x in latents})


def grouped_forward(
    forward: Forward,
    latents: Sequence[torch.Tensor],
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    *,
    seed: int | None = None,
    streams: Sequence[int] | None = None,
    schedule: Sequence[Shape] | None = None,
    device: torch.device | str | None = None,
    t: torch.Tensor | None = None,
) -> torch.Tensor:
    """One `forward` per latent shape; outputs [N, ...] in input order.

    latents: N tensors [C, h_i, w_i]; prompt_embeds [N, L, D] and pooled [N, P]: one row per image. With `seed`,
    image i gets the noise of stream `streams[i]` (default i) of that seed; without, `forward` gets noise=None.
    `schedule`: the shapes to run, in order (default `shape_schedule(latents)`); it must hold every shape of
    `latents`, and a shape of it without images here runs on an empty slice (FSDP2 ranks share one schedule).
    `t`: [N] float32 noise levels, image i's passed to `forward` as ``t=`` with its group's rows."""
    n = len(latents)
    if prompt_embeds.shape[0] != n or pooled.shape[0] != n:
        raise ValueError(
            f"one prompt row per image expected: {n} latents, prompt_embeds {list(prompt_embeds.shape)}, "
            f"pooled {list(pooled.shape)}"
        )
    if t is not None and t.shape != (n,):
        raise ValueError(f"t must give one noise level per image ({n}), got {list(t.shape)}")
    if streams is not None and len(streams) != n:
        raise ValueError(f"streams must give one stream per image ({n}), got {len(streams)}")
    device = torch.device(device) if device is not None else (latents[0].device if n else torch.device("cpu"))
    members: dict[Shape, list[int]] = {}
    for i, x in enumerate(latents):
        members.setdefault(tuple(x.shape), []).append(i)
    order = list(schedule) if schedule is not None else sorted(members)
    missing = sorted(set(members) - set(order))
    if missing:
        raise ValueError(f"latent shapes {missing} are not in the schedule {order}")
    stream_of = list(range(n)) if streams is None else [int(s) for s in streams]
    outputs, positions = [], []
    for shape in order:
        index = members.get(shape, [])
        if index:
            z0 = torch.stack([latents[i] for i in index]).to(device)
        else:
            z0 = torch.empty((0, *shape), dtype=latents[0].dtype if n else torch.float32, device=device)
        select = torch.tensor(index, dtype=torch.long)
        noise = None
        if seed is not None and not index:
            noise = torch.zeros_like(z0)
        elif seed is not None:
            chosen = torch.tensor([stream_of[i] for i in index], dtype=torch.long, device=device)
            noise = noise_ref(z0.shape, seed, streams=chosen, device=device).to(z0.dtype)
        embeds = prompt_embeds[select.to(prompt_embeds.device)].to(device)
        levels = {} if t is None else {"t": t[select.to(t.device)].to(device)}
        outputs.append(forward(z0, embeds, pooled[select.to(pooled.device)].to(device), noise, **levels))
        positions += index
    out = torch.cat(outputs)
    inverse = torch.empty(n, dtype=torch.long)
    inverse[torch.tensor(positions, dtype=torch.long)] = torch.arange(n)
    return out[inverse.to(out.device)]


def pair_forward(
    forward: Forward,
    winners: Sequence[torch.Tensor],
    losers: Sequence[torch.Tensor],
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    *,
    seed: int | None = None,
    streams: Sequence[int] | None = None,
    schedule: Sequence[Shape] | None = None,
    device: torch.device | str | None = None,
    t: torch.Tensor | None = None,
) -> torch.Tensor:
    """Outputs [B, 2 (winner, loser), ...] of B pairs: winners/losers B latents [C, h, w] each (sizes may differ),
    prompt_embeds [B, L, D], pooled [B, P] (one prompt per pair). The images run interleaved (w0, l0, w1, l1, ...):
    `streams` (2B) numbers them in that order, default 0 .. 2B-1. `t` [B]: each pair's noise level, its winner's and
    loser's. Other arguments as `grouped_forward`."""
    if len(winners) != len(losers):
        raise ValueError(f"{len(winners)} winners but {len(losers)} losers")
    images = [x for pair in zip(winners, losers, strict=True) for x in pair]
    out = grouped_forward(
        forward,
        images,
        prompt_embeds.repeat_interleave(2, dim=0),
        pooled.repeat_interleave(2, dim=0),
        seed=seed,
        streams=streams,
        schedule=schedule,
        device=device,
        t=None if t is None else t.repeat_interleave(2),
    )
    return out.view(len(winners), 2, *out.shape[1:])


def rank_positions(keys: Sequence[Hashable], rank: int, world: int) -> list[int]:
    """Positions in a global batch (one shape key per pair) for `rank` of `world`: the pairs sorted by key (stably,
    by repr: the same order on every rank) and dealt round robin. Every rank gets len(keys) / world pairs; when each
    key's count is a multiple of `world` (a bucketed batch of one key always is), every rank gets the same keys in
    the same order."""
    if len(keys) % world:
        raise ValueError(f"a global batch of {len(keys)} pairs does not split evenly over {world} ranks")
    order = sorted(range(len(keys)), key=lambda i: repr(keys[i]))
    return order[rank::world]


__all__ = ["Forward", "grouped_forward", "pair_forward", "rank_positions", "shape_schedule"]
