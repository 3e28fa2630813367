"""The HTTP front of the reward server: a FastAPI app served as Ray Serve's ingress deployment.

``POST /score``: bearer token, declared size, an upload slot, the body (size and time limits), the envelope; the
request then goes to the Scorer handle. Every answer, 500 included, is counted in
``dit_reward_serve_requests_total{route,status}``.

Slow senders. Ray Serve's proxy hands a request to this deployment as soon as its headers arrive and streams the body
after it, so a request holds one of this replica's ``max_ongoing_requests`` slots while its body trickles in; with
the slots full the proxy queues every later request behind them (measured: 1,024 slots, 1,030 uploads that announce
1 MiB and send 10 bytes, and a good request waits until its client gives up). So: each body must arrive within
``--upload-timeout-s`` (else 408); at most ``--max-uploads`` bodies are received at once per replica and
``--max-uploads-per-client`` from one client address (more are answered 503 with ``Retry-After`` at once, never
queued); and the replica has slots for all of those plus every request the Scorers can admit
(`ingress_slots`), so the proxy never queues a request behind an upload. HTTP/1.1 carries one request at a time
per connection, so a connection holds at most one upload.
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations (Request) at runtime.
import asyncio
import hmac
import time
import urllib.request
from collections import Counter as Tally
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.metrics import Counter, Histogram
from starlette.requests import ClientDisconnect

from engine.serve.config import ServeConfig
from engine.serve.request import RequestError
from engine.serve.scorer import METRIC_PREFIX, SECONDS_BOUNDARIES
from engine.serve.wire import decode_request, encode_response

# Probes and scrapes (/healthz, /metrics) beside the uploads and the admitted requests.
PROBE_SLOTS = 64


def ingress_slots(config: ServeConfig) -> int:
    """``max_ongoing_requests`` of an ingress replica: every upload it may receive, every request the Scorers may
    hold (each is awaited here), and the probes."""
    return config.max_uploads + config.admitted_requests + PROBE_SLOTS


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


class UploadSlots:
    """Request bodies being received, at most `total` at once and `per_client` from one client address. Used from
    the replica's event loop only (no lock)."""

    def __init__(self, total: int, per_client: int):
        self.total, self.per_client = total, per_client
        self.active: Tally[str] = Tally()

    def acquire(self, client: str) -> str | None:
        """None when admitted (then `release` it), else why not."""
        if sum(self.active.values()) >= self.total:
            return f"{self.total} request bodies are being received (--max-uploads)"
        if self.active[client] >= self.per_client:
            return f"{self.per_client} request bodies are being received from {client} (--max-uploads-per-client)"
        self.active[client] += 1
        return None

    def release(self, client: str) -> None:
        self.active[client] -= 1
        if not self.active[client]:
            del self.active[client]


def _json_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


_ERROR_BODY = {"application/json": {"schema": {"type": "object", "properties": {"error": {"type": "string"}}}}}
_SAFETENSORS = {"schema": {"type": "string", "format": "binary"}}
SCORE_OPENAPI: dict[str, Any] = {
    "summary": "Score latents against prompt embeddings",
    "description": "A safetensors body with latents [B, C, H, W], prompt_embeds [P, L, D], pooled [P, Dp], "
    "optional prompt_index [B] int64 and at most one of noise [B, C, H, W], seed (int64 scalar in [0, 2**63)), "
    "fresh_noise (bool scalar); none of them: the engine's common noise. Optional t (float32/float64 scalar, or "
    "[B] one noise level per latent, in [0, 1]; absent: the checkpoint's) and add_noise (bool scalar; false: the "
    "latents already are x_t at t, no noise source). Build it with engine.serve.encode_request.",
    "response_class": Response,
    "openapi_extra": {
        "requestBody": {"required": True, "content": {"application/octet-stream": _SAFETENSORS}},
    },
    "responses": {
        200: {
            "description": "safetensors: rewards [B] float32 (and std [B] for an uncertainty head)",
            "content": {"application/octet-stream": _SAFETENSORS},
        },
        400: {
            "description": "the request is not one the engine can score (the engine's message)",
            "content": _ERROR_BODY,
        },
        401: {"description": "missing or wrong bearer token", "content": _ERROR_BODY},
        408: {"description": "the body did not arrive within --upload-timeout-s", "content": _ERROR_BODY},
        413: {"description": "the body is larger than --max-request-mb", "content": _ERROR_BODY},
        500: {"description": "the engine failed on this request", "content": _ERROR_BODY},
        503: {
            "description": "busy (queue or upload slots full) or a replica restarting: retry after Retry-After",
            "content": _ERROR_BODY,
            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
        },
    },
}

# Ray Serve's ingress pattern: one FastAPI app whose routes are the Ingress deployment's methods.
api = FastAPI(title="DiT-Reward server", description="Rewards for latents, batched on Ray Serve (engine.serve).")


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """HTTP front: bearer token, request size, upload limits, the envelope; scoring goes to the Scorer handle."""

    def __init__(self, scorer: Any, config: ServeConfig):
        self.scorer, self.config = scorer, config
        self.uploads = UploadSlots(config.max_uploads, config.max_uploads_per_client)
        self.retry = {"Retry-After": str(config.retry_after_s)}
        self.requests = Counter(
            METRIC_PREFIX + "requests", description="HTTP requests by route and status", tag_keys=("route", "status")
        )
        self.request_seconds = Histogram(
            METRIC_PREFIX + "request_seconds",
            description="POST /score time inside the server (envelope, queue, batch, reply)",
            boundaries=SECONDS_BOUNDARIES,
        )

    async def _answer(self, route: str, handler, *args) -> Response:
        """`handler`'s response, or 500 for anything it raises; counted by route and status either way."""
        try:
            response = await handler(*args)
        except Exception as e:  # noqa: BLE001 (answered and counted, not left to the framework)
            response = _json_error(500, f"internal error: {type(e).__name__}: {e}")
        self.requests.inc(tags={"route": route, "status": str(response.status_code)})
        return response

    @api.get("/healthz", summary="Model dimensions, dtype and device of a Scorer replica")
    async def healthz(self) -> Response:
        return await self._answer("/healthz", self._healthz)

    async def _healthz(self) -> Response:
        return JSONResponse({"status": "ok", **await self.scorer.describe.remote()})

    @api.get("/metrics", summary="This server's Prometheus metric families", response_class=PlainTextResponse)
    async def metrics(self) -> Response:
        return await self._answer("/metrics", self._metrics)

    async def _metrics(self) -> Response:
        text = await asyncio.to_thread(collect_metrics)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @api.post("/score", **SCORE_OPENAPI)
    async def score(self, request: Request) -> Response:
        start = time.perf_counter()
        response = await self._answer("/score", self._score, request)
        if response.status_code == 200:
            self.request_seconds.observe(time.perf_counter() - start)
        return response

    def _authorized(self, request: Request) -> bool:
        if self.config.token is None:
            return True
        # RFC 9110 11.1: the scheme is case-insensitive; the token (non-empty by ServeConfig) is compared in
        # constant time, so an empty or partial secret never passes
        scheme, _, secret = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(secret.encode(), self.config.token.encode())

    async def _score(self, request: Request) -> Response:
        if not self._authorized(request):
            return _json_error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
        limit, declared = self.config.max_request_bytes, request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return _json_error(413, f"request body of {int(declared)} bytes exceeds --max-request-mb "
                               f"{self.config.max_request_mb:g}")  # fmt: skip
        client = request.client.host if request.client else "unknown"
        refused = self.uploads.acquire(client)
        if refused is not None:
            return _json_error(503, f"server busy: {refused}; retry", self.retry)
        try:
            body = await self._receive(request, limit)
        finally:
            self.uploads.release(client)
        if isinstance(body, Response):
            return body
        try:
            scored = decode_request(body)
        except RequestError as e:
            return _json_error(e.status, str(e))
        try:
            result = await self.scorer.score.remote(scored)
        except BackPressureError as e:
            return _json_error(503, f"server busy: {e}", self.retry)
        except RayActorError as e:  # the replica died mid-request; Ray Serve starts a new one
            return _json_error(503, f"scorer replica unavailable ({type(e).__name__}); retry", self.retry)
        if "error" in result:
            return _json_error(result.get("status", 400), result["error"])
        return Response(encode_response(result), media_type="application/octet-stream")

    async def _receive(self, request: Request, limit: int) -> bytes | Response:
        """The body, or the answer to a body that is too large (413), too slow (408) or abandoned (499)."""
        body = bytearray()
        try:
            async with asyncio.timeout(self.config.upload_timeout_s):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > limit:
                        return _json_error(413, f"request body exceeds --max-request-mb {self.config.max_request_mb:g}")
        except TimeoutError:
            return _json_error(408, f"request body not received within --upload-timeout-s "
                               f"{self.config.upload_timeout_s:g} ({len(body)} bytes arrived)")  # fmt: skip
        except ClientDisconnect:  # nobody reads this answer; its status counts abandoned uploads
            return _json_error(499, "client closed the connection before sending the whole body")
        return bytes(body)
