"""The reward server on Ray Serve: an HTTP ingress (FastAPI) in front of `Scorer` replicas that batch requests.

    client --POST /score--> Ingress (auth, size limit, safetensors envelope)
                              --deployment handle--> Scorer (one engine per replica, @serve.batch, per-shape groups)

Backpressure is Ray Serve's: each Scorer replica takes at most ``max_ongoing_requests``; beyond that requests wait in
the handle's queue, and past ``max_queued_requests`` the handle raises `BackPressureError`, answered 503 with
``Retry-After``. The handle counts every request as queued until a replica takes it, so a simultaneous burst can be
refused before ``max_queued_requests`` are really waiting; the clients in `client.py` retry those 503s. Metrics go
through `ray.serve.metrics` into Ray's Prometheus export; ``GET /metrics`` relays this server's families from every
node.
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations (Request) at runtime.
import asyncio
import hashlib
import hmac
import os
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.metrics import Counter, Histogram

from engine.api import RewardEngine
from engine.lru import LRUCache
from engine.model.conditioning import Conditioning
from engine.serve.wire import RequestError, check_request, decode_request, encode_response
from kernels.noise import noise_ref

METRIC_PREFIX = "dit_reward_serve_"
_BATCH_BOUNDARIES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128]
_SECONDS_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]


@dataclass(frozen=True)
class EngineSpec:
    """How each replica builds its engine: a preset (random weights, seed 0) or a reward checkpoint + base."""

    preset: str | None = None
    checkpoint: str | None = None
    base: str | None = None
    dtype: str = "bf16"
    device: str = "cpu"

    def build(self) -> RewardEngine:
        if (self.preset is None) == (self.checkpoint is None):
            raise ValueError("give exactly one of preset or checkpoint")
        if self.preset is not None:
            return RewardEngine.from_preset(self.preset, dtype=self.dtype, device=self.device)
        return RewardEngine.from_pretrained(self.checkpoint, base=self.base, dtype=self.dtype, device=self.device)


@dataclass(frozen=True)
class ServeConfig:
    """Server knobs (the CLI flags). max_batch counts requests (Ray Serve's ``max_batch_size``)."""

    max_batch: int = 16
    batch_wait_ms: float = 10.0
    replicas: int = 1
    max_ongoing_requests: int = 32
    max_queued_requests: int = 256
    retry_after_s: float = 1.0
    max_request_mb: float = 256.0
    token: str | None = None
    cache_size: int = 256


# ----------------------------------------------------------------------------------------- conditioning cache


def prompt_row_key(prompt_embeds: torch.Tensor, pooled: torch.Tensor) -> bytes:
    """A digest of one prompt row (its embeddings, pooled vector, shapes and dtypes)."""
    h = hashlib.blake2b(digest_size=20)
    for x in (prompt_embeds, pooled):
        h.update(f"{x.dtype}{tuple(x.shape)}".encode())
        h.update(x.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.digest()


class ConditioningCache:
    """Bounded LRU of one-row Conditionings keyed by `prompt_row_key`; conditions only the rows it has not seen.
    Prompt rows are hashed where they arrive (the CPU, from the wire); only the rows that miss go to the device.

    Thread-safe: the batch loop and request threads may both use it."""

    def __init__(self, engine: RewardEngine, capacity: int):
        self.engine = engine
        self._rows: LRUCache[bytes, Conditioning] = LRUCache(capacity)

    def __call__(self, prompt_embeds: torch.Tensor, pooled: torch.Tensor) -> tuple[Conditioning, int]:
        """(Conditioning [P], number of rows conditioned now). Raises the engine's errors for bad prompts."""
        device = self.engine.device
        if prompt_embeds.ndim != 3 or pooled.ndim != 2 or prompt_embeds.shape[0] != pooled.shape[0]:
            # the engine says what is wrong
            return self.engine.condition(prompt_embeds.to(device), pooled.to(device)), prompt_embeds.shape[0]
        keys = [prompt_row_key(e, p) for e, p in zip(prompt_embeds, pooled, strict=True)]
        rows: list[Conditioning | None] = [self._rows.get(k) for k in keys]
        todo = [i for i, row in enumerate(rows) if row is None]
        if todo:
            index = torch.tensor(todo)
            fresh = self.engine.condition(prompt_embeds[index].to(device), pooled[index].to(device))
            for j, i in enumerate(todo):
                rows[i] = fresh.select(torch.tensor([j], device=fresh.context.device))
                self._rows.put(keys[i], rows[i])
        return Conditioning.concat(rows), len(todo)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self._rows)


# ----------------------------------------------------------------------------------------------- the scorer


@dataclass
class _Item:
    """One request inside a batch: its tensors on the engine's device, and when it arrived."""

    tensors: dict[str, torch.Tensor]
    arrived: float
    cond: Conditioning | None = None
    noise: torch.Tensor | None = None
    prompt_index: torch.Tensor | None = None  # local, into cond's rows
    result: dict[str, Any] | None = None


def _error(e: Exception) -> dict[str, Any]:
    return {"error": str(e), "type": type(e).__name__}


def _reward_outputs(scores: torch.Tensor | tuple[torch.Tensor, torch.Tensor]):
    """What a response carries per image: ``rewards`` [B] float32 and, for an uncertainty head (whose `engine.score`
    is called with ``return_std=True``), ``std`` [B] float32 (the client returns it alongside)."""
    if isinstance(scores, tuple):
        return {"rewards": scores[0].float(), "std": scores[1].float()}
    return {"rewards": scores.float()}


@serve.deployment(name="Scorer")
class Scorer:
    """One engine per replica. Requests are collected by `@serve.batch`; inside a batch they are grouped by what
    can share one forward (latent shape and dtype, noise dtype, prompt length) and each group is one `engine.score`
    call over the concatenated latents, with each request's prompts conditioned once through the cache."""

    def __init__(self, spec: EngineSpec, config: ServeConfig):
        self.engine = spec.build()
        self.cache = ConditioningCache(self.engine, config.cache_size)
        self.score_batch.set_max_batch_size(config.max_batch)
        self.score_batch.set_batch_wait_timeout_s(config.batch_wait_ms / 1000)
        self.batch_requests = Histogram(
            METRIC_PREFIX + "batch_requests",
            description="requests per @serve.batch call",
            boundaries=_BATCH_BOUNDARIES,
        )
        # exact totals beside the histogram (Ray's exported histogram _sum is approximate): mean batch = ratio
        self.batches = Counter(METRIC_PREFIX + "batches", description="@serve.batch calls")
        self.batched_requests = Counter(METRIC_PREFIX + "batched_requests", description="requests scored in batches")
        self.batch_images = Histogram(
            METRIC_PREFIX + "batch_images", description="images per engine.score call", boundaries=_BATCH_BOUNDARIES
        )
        self.queue_seconds = Histogram(
            METRIC_PREFIX + "queue_seconds",
            description="time from a request reaching the replica to its batch starting",
            boundaries=_SECONDS_BOUNDARIES,
        )
        self.batch_seconds = Histogram(
            METRIC_PREFIX + "batch_seconds",
            description="time to condition and score one batch",
            boundaries=_SECONDS_BOUNDARIES,
        )
        self.cache_rows = Counter(
            METRIC_PREFIX + "conditioning_rows", description="prompt rows seen, by cache outcome", tag_keys=("cache",)
        )

    def describe(self) -> dict[str, Any]:
        cfg = self.engine.config
        return {
            "in_channels": cfg.in_channels,
            "joint_attention_dim": cfg.joint_attention_dim,
            "pooled_projection_dim": cfg.pooled_projection_dim,
            "dtype": str(self.engine.dtype).removeprefix("torch."),
            "device": str(self.engine.device),
            "cache_rows": len(self.cache),
        }

    async def score(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        """One request (tensors named as in `engine.serve.wire`) -> {"rewards": [B]} or {"error": message,
        "type": exception name}."""
        try:
            check_request(tensors)
        except RequestError as e:
            return _error(e)
        return await self.score_batch(_Item(tensors, time.perf_counter()))

    # placeholder sizes: __init__ sets the deployment's own (--max-batch, --batch-wait-ms)
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def score_batch(self, items: list[_Item]) -> list[dict[str, Any]]:
        start = time.perf_counter()
        for item in items:
            self.queue_seconds.observe(start - item.arrived)
        self.batch_requests.observe(len(items))
        self.batches.inc()
        self.batched_requests.inc(len(items))
        # The engine runs in a worker thread so the replica's event loop keeps accepting requests (they form the
        # next batch) and answering Ray's health checks.
        await asyncio.to_thread(self._run, items)
        self.batch_seconds.observe(time.perf_counter() - start)
        return [item.result for item in items]  # type: ignore[misc]

    # The batch body. Anything a request can get wrong is caught per request: its result is the engine's error and
    # the others in the batch are scored normally.
    def _run(self, items: list[_Item]) -> None:
        groups: dict[tuple, list[_Item]] = {}
        for item in items:
            try:
                key = self._prepare(item)
            except (ValueError, TypeError) as e:
                item.result = _error(e)
                continue
            if key is None:  # cannot share a forward: scored alone so the engine judges it as sent
                self._score_alone(item)
            else:
                groups.setdefault(key, []).append(item)
        for group in groups.values():
            try:
                self._score_group(group)
            except (ValueError, TypeError):
                for item in group:  # find which request the engine objects to, and score the others
                    self._score_alone(item)

    def _prepare(self, item: _Item) -> tuple | None:
        """Condition the prompts (cached), check what grouping needs, move to the device, fix the noise; the group
        key, or None when the request is not well-formed enough to be concatenated with others."""
        cond, fresh = self.cache(item.tensors["prompt_embeds"], item.tensors["pooled"])
        for outcome, rows in (("miss", fresh), ("hit", cond.num_prompts - fresh)):
            if rows:  # Ray's Counter.inc takes positive values only
                self.cache_rows.inc(rows, tags={"cache": outcome})
        item.cond = cond
        index = item.tensors.get("prompt_index")  # checked here, on the CPU, before it moves
        device = self.engine.device
        t = {k: v.to(device) for k, v in item.tensors.items() if k not in ("prompt_embeds", "pooled")}
        item.tensors = t
        latents, noise = t["latents"], t.get("noise")
        if latents.ndim != 4 or latents.shape[0] == 0 or (noise is not None and noise.shape != latents.shape):
            return None
        batch, prompts = latents.shape[0], cond.num_prompts
        if index is None and prompts not in (1, batch):
            return None
        if index is not None and (index.shape != (batch,) or not 0 <= int(index.min()) <= int(index.max()) < prompts):
            return None
        item.prompt_index = t["prompt_index"] if index is not None else torch.arange(batch, device=device) % prompts
        if noise is None:  # a seed gives the engine's stream b to image b of this request, as engine.score(seed=)
            if "seed" in t:
                noise = noise_ref(latents.shape, int(t["seed"]), device=device)
            else:
                noise = torch.randn(latents.shape, device=device)
        item.noise = noise
        return (tuple(latents.shape[1:]), latents.dtype, noise.dtype, tuple(cond.context.shape[1:]))

    def _score_group(self, group: list[_Item]) -> None:
        offsets, total = [], 0
        for item in group:
            offsets.append(total)
            total += item.cond.num_prompts  # type: ignore[union-attr]
        latents = torch.cat([item.tensors["latents"] for item in group])
        rewards = self.engine.score(
            latents,
            Conditioning.concat([item.cond for item in group]),  # type: ignore[misc]
            noise=torch.cat([item.noise for item in group]),  # type: ignore[misc]
            prompt_index=torch.cat([item.prompt_index + off for item, off in zip(group, offsets, strict=True)]),  # type: ignore[operator]
            return_std=self.engine.head.outputs == 2,
        )
        self.batch_images.observe(latents.shape[0])
        outputs = _reward_outputs(rewards)
        start = 0
        for item in group:
            n = item.tensors["latents"].shape[0]
            item.result = {k: v[start : start + n].cpu() for k, v in outputs.items()}
            start += n

    def _score_alone(self, item: _Item) -> None:
        t = item.tensors
        seed = int(t["seed"]) if "seed" in t else None
        try:
            rewards = self.engine.score(
                t["latents"],
                item.cond,
                noise=t.get("noise"),
                seed=seed,
                prompt_index=t.get("prompt_index"),
                return_std=self.engine.head.outputs == 2,
            )
        except (ValueError, TypeError) as e:
            item.result = _error(e)
            return
        self.batch_images.observe(t["latents"].shape[0])
        item.result = {k: v.cpu() for k, v in _reward_outputs(rewards).items()}


# ---------------------------------------------------------------------------------------------- the ingress


def collect_metrics() -> str:
    """This server's metric families from every alive node's Prometheus export (Ray's metrics agent), HELP/TYPE
    lines once each."""
    seen, lines = set(), []
    for node in ray.nodes():
        port = node.get("MetricsExportPort")
        if not node.get("Alive") or not port:
            continue
        try:
            with urllib.request.urlopen(f"http://{node['NodeManagerAddress']}:{port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            continue
        for line in text.splitlines():
            if METRIC_PREFIX not in line.split("{")[0]:
                continue
            if line.startswith("#"):
                if line in seen:
                    continue
                seen.add(line)
            lines.append(line)
    return "\n".join(lines) + "\n"


# Ray Serve's ingress pattern: one FastAPI app whose routes are the Ingress deployment's methods. Module functions
# the routes call are defined above the class: serve.ingress serialises the class with the globals it sees then.
api = FastAPI(title="DiT-Reward server")


def _json_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@serve.deployment(name="Ingress", max_ongoing_requests=1024)
@serve.ingress(api)
class Ingress:
    """HTTP front: bearer token, request size, the safetensors envelope; scoring goes to the Scorer handle."""

    def __init__(self, scorer: Any, config: ServeConfig):
        self.scorer, self.config = scorer, config
        self.requests = Counter(
            METRIC_PREFIX + "requests", description="HTTP requests by route and status", tag_keys=("route", "status")
        )
        self.request_seconds = Histogram(
            METRIC_PREFIX + "request_seconds",
            description="POST /score time inside the server (envelope, queue, batch, reply)",
            boundaries=_SECONDS_BOUNDARIES,
        )

    def _count(self, route: str, response: Response) -> Response:
        self.requests.inc(tags={"route": route, "status": str(response.status_code)})
        return response

    def _authorized(self, request: Request) -> bool:
        if self.config.token is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.config.token}".encode())

    @api.get("/healthz")
    async def healthz(self) -> Response:
        info = await self.scorer.describe.remote()
        return self._count("/healthz", JSONResponse({"status": "ok", **info}))

    @api.get("/metrics")
    async def metrics(self) -> Response:
        text = await asyncio.to_thread(collect_metrics)
        return self._count("/metrics", PlainTextResponse(text, media_type="text/plain; version=0.0.4"))

    @api.post("/score")
    async def score(self, request: Request) -> Response:
        start = time.perf_counter()
        response = await self._score(request)
        if response.status_code == 200:
            self.request_seconds.observe(time.perf_counter() - start)
        return self._count("/score", response)

    async def _score(self, request: Request) -> Response:
        if not self._authorized(request):
            return _json_error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
        limit = int(self.config.max_request_mb * 2**20)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return _json_error(413, f"request body of {int(declared)} bytes exceeds --max-request-mb "
                               f"{self.config.max_request_mb:g}")  # fmt: skip
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return _json_error(413, f"request body exceeds --max-request-mb {self.config.max_request_mb:g}")
        try:
            tensors = decode_request(bytes(body))
        except RequestError as e:
            return _json_error(e.status, str(e))
        retry = {"Retry-After": str(max(1, round(self.config.retry_after_s)))}
        try:
            result = await self.scorer.score.remote(tensors)
        except BackPressureError as e:
            return _json_error(503, f"server busy: {e}", retry)
        except RayActorError as e:  # the replica died mid-request; Ray Serve starts a new one
            return _json_error(503, f"scorer replica unavailable ({type(e).__name__}); retry", retry)
        if "error" in result:
            return _json_error(400, result["error"])
        return Response(encode_response(result), media_type="application/octet-stream")


def build_app(spec: EngineSpec, config: ServeConfig) -> serve.Application:
    """The Ray Serve application: `serve.run(build_app(...), route_prefix="/")`. On a CUDA device each Scorer
    replica takes one GPU."""
    on_gpu = spec.device.startswith("cuda")
    scorer = Scorer.options(
        num_replicas=config.replicas,
        max_ongoing_requests=config.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests,
        ray_actor_options={"num_gpus": 1, "num_cpus": 1} if on_gpu else {"num_cpus": 1},
    ).bind(spec, config)
    return Ingress.options(num_replicas=config.replicas, ray_actor_options={"num_cpus": 0}).bind(scorer, config)


APP_NAME = "dit-reward"


def init_ray(num_cpus: int | None = None, object_store_mb: int = 256) -> None:
    """Join the cluster at $RAY_ADDRESS, or start a small local Ray (no dashboard, quiet workers, metrics exported
    every second so ``/metrics`` is current). The workers import this package from the driver's PYTHONPATH."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
        return
    here = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(
        num_cpus=num_cpus,
        object_store_memory=object_store_mb * 2**20,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
        _system_config={"metrics_report_interval_ms": 1000},
    )


def start(
    spec: EngineSpec, config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, num_cpus: int | None = None
) -> str:
    """Start (or join) Ray, deploy the server, wait until it is ready; returns its base URL."""
    init_ray(num_cpus)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(spec, config), name=APP_NAME, route_prefix="/")
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"


def scorer_handle() -> Any:
    """The Scorer deployment handle of a running server: in-cluster callers skip HTTP with
    ``await handle.score.remote(decode_request(body))`` or a dict of tensors named as in the wire format."""
    return serve.get_deployment_handle("Scorer", app_name=APP_NAME)
