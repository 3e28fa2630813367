"""The batching scorer: one engine per Ray Serve replica, requests checked one by one, then scored in batches.

    Scorer.score(request) -- envelope + engine checks (a refusal never joins a batch)
        --> @serve.batch --> BatchScorer.run(items): group by what can share one forward, one engine.score per group

Requests at different noise levels share a forward: each keeps its own t through a per-latent t [B] of the group
(the checkpoint's t for a request without one); requests that add noise and requests whose latents already are x_t
(``add_noise`` false) are scored in separate forwards. A prompt row's adaLN vectors at a noise level other than the
checkpoint's are kept per (prompt row, t), so a sampler sending the same timesteps again reuses them.

A group whose forward raises anything is scored again request by request, so each request gets its own answer:
its rewards, 400 with the engine's message for an input error, 500 for anything else.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from ray import serve
from ray.serve.metrics import Counter, Histogram

from engine.api import RewardEngine
from engine.lru import LRUCache
from engine.model.conditioning import Conditioning, Level
from engine.serve.config import ServeConfig
from engine.serve.request import ScoreRequest, check_request, check_scorable
from kernels.noise import noise_ref

METRIC_PREFIX = "dit_reward_serve_"
BATCH_BOUNDARIES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128]
SECONDS_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]


def build_engine(config: ServeConfig) -> RewardEngine:
    """The engine a replica serves: the preset (random weights, seed 0) or the reward checkpoint + base."""
    device = config.resolved_device()
    if config.preset is not None:
        return RewardEngine.from_preset(config.preset, dtype=config.dtype, device=device)
    return RewardEngine.from_pretrained(config.checkpoint, base=config.base, dtype=config.dtype, device=device)


# ----------------------------------------------------------------------------------------- conditioning cache


def prompt_row_key(prompt_embeds: torch.Tensor, pooled: torch.Tensor) -> bytes:
    """A digest of one prompt row (its embeddings, pooled vector, shapes and dtypes)."""
    h = hashlib.blake2b(digest_size=20)
    for x in (prompt_embeds, pooled):
        h.update(f"{x.dtype}{tuple(x.shape)}".encode())
        h.update(x.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.digest()


class ConditioningCache:
    """Bounded LRUs of one-row Conditionings keyed by `prompt_row_key`, and of their (modulation, temb) at other
    noise levels keyed by (row key, sigma): a sampler scoring its intermediate steps sends a fixed set of levels.
    Conditions only the rows (and makes only the levels) it has not seen, each in one batched call. Prompt rows are
    hashed where they arrive (the CPU, from the wire); only the rows that miss go to the device. The prompts are
    already checked (`check_scorable`). Thread-safe: the batch loop and request threads may both use it."""

    def __init__(self, engine: RewardEngine, capacity: int):
        self.engine = engine
        self._rows: LRUCache[bytes, Conditioning] = LRUCache(capacity)
        self._levels: LRUCache[tuple[bytes, float], Level] = LRUCache(capacity)
        self._make = engine.backbone.level_maker(False, engine.check_finite)

    def __call__(self, prompt_embeds: torch.Tensor, pooled: torch.Tensor) -> tuple[Conditioning, int]:
        """(Conditioning [P], number of rows conditioned now)."""
        cond, _, fresh = self.condition(prompt_embeds, pooled)
        return cond, fresh

    def condition(self, prompt_embeds: torch.Tensor, pooled: torch.Tensor) -> tuple[Conditioning, list[bytes], int]:
        """(Conditioning [P], the rows' keys, number of rows conditioned now)."""
        keys = [prompt_row_key(e, p) for e, p in zip(prompt_embeds, pooled, strict=True)]
        rows: list[Conditioning | None] = [self._rows.get(k) for k in keys]
        todo = [i for i, row in enumerate(rows) if row is None]
        if todo:
            index, device = torch.tensor(todo), self.engine.device
            fresh = self.engine.condition(prompt_embeds[index].to(device), pooled[index].to(device))
            for j, i in enumerate(todo):
                rows[i] = fresh.select(torch.tensor([j], device=fresh.context.device))
                self._rows.put(keys[i], rows[i])
        return Conditioning.concat(rows), keys, len(todo)  # type: ignore[arg-type]

    def level(self, cond: Conditioning, keys: list[bytes], sigma: float, used: list[int]) -> tuple[Level, int]:
        """((modulation [P, M, D], temb [P, D]) of `cond`'s rows (keyed `keys`) at noise level `sigma`, number of
        rows made now): rows `used` from the cache, those it lacks made together from `cond.pooled` and kept; the
        other rows are zeros, which a forward scoring no latent of theirs at `sigma` never reads."""
        found = {i: self._levels.get((keys[i], sigma)) for i in used}
        todo = [i for i, level in found.items() if level is None]
        if todo:
            index = torch.tensor(todo, device=cond.pooled.device)  # type: ignore[union-attr]
            modulation, temb = self._make(cond.pooled.index_select(0, index), sigma)  # type: ignore[union-attr]
            for j, i in enumerate(todo):
                found[i] = (modulation[j : j + 1], temb[j : j + 1])  # type: ignore[index]
                self._levels.put((keys[i], sigma), found[i])  # type: ignore[arg-type]
        some = next(iter(found.values()))
        modulation = some[0].new_zeros(cond.num_prompts, *some[0].shape[1:])  # type: ignore[index]
        temb = some[1].new_zeros(cond.num_prompts, *some[1].shape[1:])  # type: ignore[index, union-attr]
        for i, (m, e) in found.items():  # type: ignore[misc]
            modulation[i : i + 1], temb[i : i + 1] = m, e
        return (modulation, temb), len(todo)

    def __len__(self) -> int:
        return len(self._rows)


# ------------------------------------------------------------------------------------------- batch scoring


@dataclass
class Item:
    """One checked request inside a batch; `_prepare` fills in what its forward needs, `result` is its answer."""

    request: ScoreRequest
    arrived: float
    latents: torch.Tensor | None = None  # on the engine's device
    cond: Conditioning | None = None
    keys: list[bytes] | None = None  # cond's rows' cache keys
    noise: torch.Tensor | None = None
    prompt_index: torch.Tensor | None = None  # local, into cond's rows
    levels: torch.Tensor | None = None  # [B] float64: the t of each latent, exactly the float the request gave
    result: dict[str, Any] | None = None


def failure(e: Exception) -> dict[str, Any]:
    """The answer to a request the engine refused (400: an input error) or failed on (500: anything else)."""
    status = 400 if isinstance(e, (ValueError, TypeError)) else 500
    message = str(e) if status == 400 else f"scoring failed: {type(e).__name__}: {e}"
    return {"error": message, "type": type(e).__name__, "status": status}


def reward_outputs(scores: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a response carries per image: ``rewards`` [B] float32 and, for an uncertainty head (whose `engine.score`
    is called with ``return_std=True``), ``std`` [B] float32."""
    if isinstance(scores, tuple):
        return {"rewards": scores[0].float(), "std": scores[1].float()}
    return {"rewards": scores.float()}


class BatchScorer:
    """Scores a batch of checked requests: requests that can share one forward (latent shape and dtype, noise
    dtype, prompt length) are concatenated into one `engine.score` call, each request's prompts conditioned once
    through the cache."""

    def __init__(self, engine: RewardEngine, cache: ConditioningCache, observe: Callable[[str, float], None]):
        self.engine, self.cache, self.observe = engine, cache, observe

    def run(self, items: list[Item]) -> None:
        groups: dict[tuple, list[Item]] = {}
        for item in items:
            try:
                groups.setdefault(self._prepare(item), []).append(item)
            except Exception as e:  # noqa: BLE001 (the request's own answer; the others go on)
                item.result = failure(e)
        for group in groups.values():
            try:
                self._score(group)
            except Exception as e:  # noqa: BLE001
                if len(group) == 1:
                    group[0].result = failure(e)
                    continue
                for item in group:  # each request alone: its own rewards or its own error
                    try:
                        self._score([item])
                    except Exception as e_alone:  # noqa: BLE001
                        item.result = failure(e_alone)

    def _prepare(self, item: Item) -> tuple:
        """Condition the prompts (cached), move to the device, fix the noise; returns the group key."""
        r, device = item.request, self.engine.device
        batch = r.latents.shape[0]
        t = r.noise_level()
        t = self.engine.reward_config.t if t is None else t
        item.levels = torch.as_tensor(t, dtype=torch.float64).expand(batch).contiguous()
        cond, item.keys, fresh = self.cache.condition(r.prompt_embeds, r.pooled)
        self.observe("cache_miss", fresh)
        self.observe("cache_hit", cond.num_prompts - fresh)
        item.cond, item.latents = cond, r.latents.to(device)
        if r.prompt_index is not None:
            item.prompt_index = r.prompt_index.to(device)
        else:  # (checked: one prompt for all, or one per latent)
            item.prompt_index = torch.arange(batch, device=device) % cond.num_prompts
        if not r.adds_noise:  # the latents already are x_t
            item.noise = None
        elif r.noise is not None:
            item.noise = r.noise.to(device)
        elif r.seed is not None:  # latent b gets the engine's Philox stream b, as engine.score(seed=)
            item.noise = noise_ref(r.latents.shape, int(r.seed), device=device)
        elif r.fresh_noise is not None:
            item.noise = torch.randn(r.latents.shape, device=device)
        else:  # one fixed draw per latent shape: the reward depends on the image and its prompt only
            item.noise = self.engine.common_noise(item.latents)
        noise_dtype = None if item.noise is None else item.noise.dtype
        return (tuple(r.latents.shape[1:]), r.latents.dtype, noise_dtype, tuple(cond.context.shape[1:]))

    def _conditioning(self, group: list[Item], levels: torch.Tensor, prompt_index: torch.Tensor) -> Conditioning:
        """The group's prompts as one Conditioning (a copy: its level cache is this forward's) holding, for each
        noise level of `levels` [B], the rows `prompt_index` [B] scores at it, from the per-(prompt row, t) cache."""
        cond = replace(Conditioning.concat([item.cond for item in group]))  # type: ignore[misc]
        keys = [key for item in group for key in item.keys]  # type: ignore[union-attr]
        schedule = self.engine.reward_config.schedule
        sigmas, rows = [schedule.sigma(t) for t in levels.tolist()], prompt_index.tolist()
        for sigma in sorted(set(sigmas) - {cond.t}):
            used = sorted({row for row, s in zip(rows, sigmas, strict=True) if s == sigma})
            level, made = self.cache.level(cond, keys, sigma, used)
            cond.levels.put(sigma, level)
            self.observe("cache_level_miss", made)
            self.observe("cache_level_hit", len(used) - made)
        return cond

    def _score(self, group: list[Item]) -> None:
        offsets, total = [], 0
        for item in group:
            offsets.append(total)
            total += item.cond.num_prompts  # type: ignore[union-attr]
        latents = torch.cat([item.latents for item in group])  # type: ignore[misc]
        levels = torch.cat([item.levels for item in group])  # type: ignore[misc]
        prompt_index = torch.cat([item.prompt_index + off for item, off in zip(group, offsets, strict=True)])  # type: ignore[operator]
        noised = group[0].noise is not None  # (the group key: all or none)
        scores = self.engine.score(
            latents,
            self._conditioning(group, levels, prompt_index),
            noise=torch.cat([item.noise for item in group]) if noised else None,  # type: ignore[misc]
            t=levels,
            add_noise=noised,
            prompt_index=prompt_index,
            return_std=self.engine.head.outputs == 2,
        )
        outputs = {k: v.cpu() for k, v in reward_outputs(scores).items()}
        self.observe("batch_images", latents.shape[0])
        start = 0
        for item in group:
            n = item.latents.shape[0]  # type: ignore[union-attr]
            item.result = {k: v[start : start + n] for k, v in outputs.items()}
            start += n


# ---------------------------------------------------------------------------------------- the deployment


@serve.deployment(name="Scorer")
class Scorer:
    """One engine per replica; `score` checks a request, `@serve.batch` collects checked requests into batches."""

    def __init__(self, config: ServeConfig, engine_builder: Callable[[ServeConfig], RewardEngine] = build_engine):
        self.engine = engine_builder(config)
        self.max_prompt_tokens = config.max_prompt_tokens
        self.cache = ConditioningCache(self.engine, config.cache_size)
        self.batcher = BatchScorer(self.engine, self.cache, self._observe)
        self.score_batch.set_max_batch_size(config.max_batch)
        self.score_batch.set_batch_wait_timeout_s(config.batch_wait_ms / 1000)
        histogram = lambda name, text, bounds: Histogram(METRIC_PREFIX + name, description=text, boundaries=bounds)
        self.batch_requests = histogram("batch_requests", "requests per @serve.batch call", BATCH_BOUNDARIES)
        # exact totals beside the histogram (Ray's exported histogram _sum is approximate): mean batch = ratio
        self.batches = Counter(METRIC_PREFIX + "batches", description="@serve.batch calls")
        self.batched_requests = Counter(METRIC_PREFIX + "batched_requests", description="requests scored in batches")
        self.batch_images = histogram("batch_images", "images per engine.score call", BATCH_BOUNDARIES)
        self.queue_seconds = histogram("queue_seconds", "time from a request reaching the replica to its batch "
                                       "starting", SECONDS_BOUNDARIES)  # fmt: skip
        self.batch_seconds = histogram("batch_seconds", "time to condition and score one batch", SECONDS_BOUNDARIES)
        self.cache_rows = Counter(
            METRIC_PREFIX + "conditioning_rows", description="prompt rows seen, by cache outcome", tag_keys=("cache",)
        )
        self.cache_levels = Counter(
            METRIC_PREFIX + "conditioning_levels", description="(prompt row, t) levels used besides a row's own, "
            "by cache outcome", tag_keys=("cache",)
        )  # fmt: skip

    def _observe(self, what: str, value: float) -> None:
        if what == "batch_images":
            self.batch_images.observe(value)
        elif value and what.startswith("cache_level_"):
            self.cache_levels.inc(value, tags={"cache": what.removeprefix("cache_level_")})
        elif value:  # Ray's Counter.inc takes positive values only
            self.cache_rows.inc(value, tags={"cache": what.removeprefix("cache_")})

    def describe(self) -> dict[str, Any]:
        cfg = self.engine.config
        return {
            "in_channels": cfg.in_channels,
            "joint_attention_dim": cfg.joint_attention_dim,
            "pooled_projection_dim": cfg.pooled_projection_dim,
            "max_prompt_tokens": self.max_prompt_tokens,
            # the T5 length the reward was trained at: clients encode prompts at it (77 CLIP tokens come first)
            "max_sequence_length": self.engine.prompt_length.t5_tokens,
            "dtype": str(self.engine.dtype).removeprefix("torch."),
            "device": str(self.engine.device),
            "cache_rows": len(self.cache),
        }

    async def score(self, tensors: dict[str, torch.Tensor] | ScoreRequest) -> dict[str, Any]:
        """One request (tensors named as in `engine.serve.wire`) -> ``{"rewards": [B]}`` (+ ``"std"``) or
        ``{"error": message, "type": exception name, "status": 400 | 500}``."""
        try:
            # the checks read every value (finiteness): off the event loop, which keeps forming the next batch
            request = await asyncio.to_thread(self._check, tensors)
        except Exception as e:  # noqa: BLE001
            return failure(e)
        return await self.score_batch(Item(request, time.perf_counter()))

    def _check(self, tensors: Any) -> ScoreRequest:
        request = check_request(tensors)
        check_scorable(request, self.engine, self.max_prompt_tokens)
        return request

    # placeholder sizes: __init__ sets the deployment's own (--max-batch, --batch-wait-ms)
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def score_batch(self, items: list[Item]) -> list[dict[str, Any]]:
        start = time.perf_counter()
        for item in items:
            self.queue_seconds.observe(start - item.arrived)
        self.batch_requests.observe(len(items))
        self.batches.inc()
        self.batched_requests.inc(len(items))
        # The engine runs in a worker thread so the replica's event loop keeps accepting requests (they form the
        # next batch) and answering Ray's health checks.
        await asyncio.to_thread(self.batcher.run, items)
        self.batch_seconds.observe(time.perf_counter() - start)
        return [item.result for item in items]  # type: ignore[misc]
