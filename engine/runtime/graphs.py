"""Launch overhead gone: the whole reward forward (Eq. 1-5) captured as one CUDA graph per static shape.

An SD3.5-Large forward is ~1000 kernel launches; at batch 1 their CPU cost exceeds the GPU work. `GraphedScorer`
captures (latents, noise, text tokens, adaLN vectors) -> rewards once per (batch bucket, latent size, text length)
and replays it. Batches are padded up to the next bucket and the padding rows dropped (rows never interact: attention
is per image), so an RL loop with varying group sizes never re-captures. All graphs share one memory pool.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.runtime.ops import Ops

if TYPE_CHECKING:  # the scorer wraps an engine; the runtime does not import the API layer
    from engine.api import PromptEmb, RewardEngine

# Powers of two plus the GRPO group sizes 12 and 24 (a group of 24 padded to 32 would be a third wasted work).
DEFAULT_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32)


def bucket_for(batch: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket holding `batch` (batches beyond the largest are scored in chunks of the largest)."""
    return next((b for b in buckets if b >= batch), buckets[-1])


def chunks(batch: int, buckets: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(start, stop, bucket) for scoring `batch` latents: full chunks of the largest bucket, then one padded chunk."""
    out = []
    for lo in range(0, batch, buckets[-1]):
        hi = min(lo + buckets[-1], batch)
        out.append((lo, hi, bucket_for(hi - lo, buckets)))
    return out


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    latents: torch.Tensor  # static inputs [bucket, ...]
    noise: torch.Tensor
    context: torch.Tensor
    modulation: torch.Tensor
    temb: torch.Tensor | None  # read by a query-attention head
    rewards: torch.Tensor  # static output [bucket]
    noised: bool  # the graph noises `latents` to the checkpoint's t; else `latents` holds x_t


class GraphedScorer:
    """`score()` with the engine's semantics (fresh noise unless `noise` is given), replayed from CUDA graphs.

    Seeded noise is not offered here: fresh noise comes from torch's CUDA generator (seed it with
    `torch.cuda.manual_seed`), or pass `noise` explicitly. t is data, not a shape: the adaLN vectors (and temb) of
    each row's level are copied into the graph's inputs. At the checkpoint's t the graph also adds the noise; at any
    other t (or per-latent t) x_t is formed before the replay by the engine's noise op, and a graph that takes x_t
    runs (one more per shape, captured on first use); `add_noise=False` replays that one on the latents as given."""

    def __init__(self, engine: RewardEngine, buckets: tuple[int, ...] = DEFAULT_BUCKETS):
        if engine.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA engine, this one is on {engine.device}")
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
            raise ValueError(f"buckets must be increasing positive batch sizes, got {buckets}")
        self.engine, self.buckets = engine, tuple(buckets)
        self.graphs: dict[tuple[int, int, int, int, bool], _Captured] = {}
        self.capture_seconds: dict[tuple[int, int, int, int, bool], float] = {}  # first-call cost per shape
        self._pool = torch.cuda.graph_pool_handle()

    def bucket_for(self, batch: int) -> int:
        return bucket_for(batch, self.buckets)

    def _run(self, s: _Captured) -> torch.Tensor:
        engine = self.engine
        with torch.inference_mode():
            outputs = engine.backbone(
                s.latents, s.context, s.modulation, self._sigma, engine.backends, noise=s.noise, temb=s.temb,
                add_noise=s.noised,
            )  # fmt: skip
            return engine.head(outputs)

    @property
    def _sigma(self) -> float:
        """The checkpoint's noise level (sigma): the one a noising graph bakes in."""
        return self.engine.reward_config.schedule.sigma(self.engine.reward_config.t)

    def _capture(self, key: tuple[int, int, int, int, bool], cond) -> _Captured:
        bucket, h, w, text_len, noised = key
        engine, start = self.engine, time.perf_counter()
        dev, dt = engine.device, engine.dtype
        static = _Captured(
            graph=torch.cuda.CUDAGraph(),
            latents=torch.randn(bucket, engine.config.in_channels, h, w, device=dev, dtype=dt),
            noise=torch.randn(bucket, engine.config.in_channels, h, w, device=dev, dtype=dt),
            context=cond.context[:1].expand(bucket, -1, -1).clone(),
            modulation=cond.modulation[:1].expand(bucket, -1, -1).clone(),
            temb=cond.temb[:1].expand(bucket, -1).clone() if engine.backbone.readout.temb else None,
            rewards=torch.empty(0),
            noised=noised,
        )
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton compilation, cuBLAS handles, allocator
            for _ in range(2):
                self._run(static)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(static.graph, pool=self._pool):
            static.rewards = self._run(static)
        torch.cuda.synchronize()
        self.capture_seconds[key] = time.perf_counter() - start
        return static

    def score(
        self,
        latents: torch.Tensor,
        prompt_emb: PromptEmb,
        noise: torch.Tensor | None = None,
        prompt_index: torch.Tensor | None = None,
        *,
        t: float | torch.Tensor | None = None,
        add_noise: bool = True,
    ) -> torch.Tensor:
        """Rewards [B] float32; arguments as `RewardEngine.score` (inputs validated the same way; an ensemble t, a
        list of levels, is `RewardEngine.score`'s alone)."""
        engine = self.engine
        if isinstance(t, (list, tuple)):
            raise ValueError("GraphedScorer scores one level per latent: for an ensemble t=[...] call engine.score")
        if not add_noise and noise is not None:
            raise ValueError("add_noise=False scores the latents as the x_t they are: pass no noise")
        cond = engine.conditioning_for(latents, prompt_emb, noise, prompt_index, t=t, add_noise=add_noise)
        noised = add_noise and not isinstance(cond.t, torch.Tensor) and cond.t == self._sigma
        if add_noise and not noised:  # x_t at each row's level, by the engine's op, then the x_t graph
            eps = torch.randn_like(latents) if noise is None else noise
            ops = Ops.for_forward(engine.backends)
            with torch.inference_mode():
                latents = engine.backbone.noised(latents, cond.t, 1, ops, eps, None, 0)
        return torch.cat(
            [
                self._score_chunk(latents[lo:hi], cond, lo, hi, noise, noised)
                for lo, hi, _ in chunks(latents.shape[0], self.buckets)
            ]
        )

    def _score_chunk(self, latents, cond, lo, hi, noise, noised: bool) -> torch.Tensor:
        n = hi - lo
        key = (self.bucket_for(n), latents.shape[-2], latents.shape[-1], cond.context.shape[1], noised)
        if key not in self.graphs:
            self.graphs[key] = self._capture(key, cond)
        s = self.graphs[key]
        s.latents[:n].copy_(latents)
        if noised and noise is None:
            s.noise.normal_()
        elif noised:
            s.noise[:n].copy_(noise[lo:hi])  # (an x_t graph reads `latents` only)
        s.context[:n].copy_(cond.context[lo:hi])
        s.modulation[:n].copy_(cond.modulation[lo:hi])
        if s.temb is not None:
            s.temb[:n].copy_(cond.temb[lo:hi])
        s.graph.replay()
        return s.rewards[:n].clone()
