"""Helpers of the reward-server tests (tests/test_serve*.py): a live tiny-preset server per module, requests with
their independent in-process references, raw HTTP, and an engine with an injectable fault."""

from __future__ import annotations

import json
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from email.message import Message

import ray
import torch
from ray import serve

from engine import RewardEngine
from engine.serve import ScoreClient
from engine.serve.app import start
from engine.serve.config import ServeConfig

TOKEN = "test-token"
TOL = 1e-5
POISON = 1234.5  # latents[b, 0, 0, 0] == POISON makes FaultyEngine.score raise (a fault the checks cannot see)


class FaultyEngine(RewardEngine):
    """The tiny engine, except that a batch holding a poisoned latent raises RuntimeError inside `score`, as a
    device fault or a bug would."""

    def score(self, latents, *args, **kwargs):
        if bool((latents[:, 0, 0, 0] == POISON).any()):
            raise RuntimeError("injected fault: poisoned latent")
        return super().score(latents, *args, **kwargs)


def faulty_engine(config: ServeConfig) -> RewardEngine:
    return FaultyEngine.from_preset(config.preset, dtype=config.dtype, device="cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(config: ServeConfig, name: str) -> str:
    """A local Ray (2 CPUs) serving `config` with the fault-injecting engine; stop it with `stop_server`."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the replicas cannot import tests/
    return start(config, port=free_port(), num_cpus=2, name=name, engine_builder=faulty_engine)


def stop_server() -> None:
    serve.shutdown()
    ray.shutdown()


def make_request(engine: RewardEngine, gen: torch.Generator, batch: int, side: int, prompts: int, kind: str) -> dict:
    """Random inputs for one request; kind picks the noise: "noise" (explicit), "seed", or "common" (none sent)."""
    cfg = engine.config
    x = {
        "latents": torch.randn(batch, cfg.in_channels, side, side, generator=gen),
        "prompt_embeds": torch.randn(prompts, 12, cfg.joint_attention_dim, generator=gen),
        "pooled": torch.randn(prompts, cfg.pooled_projection_dim, generator=gen),
    }
    if prompts not in (1, batch):
        x["prompt_index"] = torch.randint(0, prompts, (batch,), generator=gen)
    if kind == "noise":
        x["noise"] = torch.randn(batch, cfg.in_channels, side, side, generator=gen)
    elif kind == "seed":
        x["seed"] = int(torch.randint(0, 2**31, (1,), generator=gen))
    return x


def in_process(engine: RewardEngine, x: dict) -> torch.Tensor:
    """The reference: `engine.score` on the same inputs; without noise or seed, the engine's common noise."""
    noise = x.get("noise")
    if noise is None and x.get("seed") is None:
        noise = engine.common_noise(x["latents"])
    return engine.score(
        x["latents"], (x["prompt_embeds"], x["pooled"]), noise=noise, seed=x.get("seed"),
        prompt_index=x.get("prompt_index"),
    )  # fmt: skip


def engine_message(engine: RewardEngine, x: dict) -> str:
    """What in-process `engine.score` raises for `x` (it must raise a ValueError or TypeError)."""
    try:
        engine.score(
            x["latents"], (x["prompt_embeds"], x["pooled"]), noise=x.get("noise"), seed=x.get("seed"),
            prompt_index=x.get("prompt_index"),
        )  # fmt: skip
    except (ValueError, TypeError) as e:
        return str(e)
    raise AssertionError("engine.score accepted the request")


def post(
    url: str, body: bytes, token: str | None = TOKEN, path: str = "/score", headers: dict[str, str] | None = None
) -> tuple[int, Message, bytes]:
    """One raw POST, no retries: (status, headers (case-insensitive), body)."""
    headers = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
    request = urllib.request.Request(url + path, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def post_until_admitted(url: str, body: bytes, timeout_s: float = 60) -> tuple[int, Message, bytes]:
    """POST /score, retrying only the busy 503 of admission control (the router counts every request as queued
    before assigning it, so a simultaneous burst may be refused below max_queued). Any other answer is returned."""
    deadline = time.monotonic() + timeout_s
    while True:
        status, headers, body_out = post(url, body)
        busy = status == 503 and json.loads(body_out)["error"].startswith("server busy")
        if not busy or time.monotonic() > deadline:
            return status, headers, body_out
        time.sleep(float(headers["Retry-After"]))


def metric_values(url: str, name: str) -> dict[str, float]:
    """A metric's samples from GET /metrics, {label text: value} summed over replicas."""
    text = ScoreClient(url, TOKEN).get("/metrics").decode()
    out: dict[str, float] = {}
    for labels, value in re.findall(rf"^ray_{name}{{([^}}]*)}} ([0-9.e+-]+)$", text, flags=re.M):
        kept = ",".join(sorted(p for p in labels.split(",") if p.split("=")[0] in ("route", "status", "cache")))
        out[kept] = out.get(kept, 0.0) + float(value)
    return out


def wait_for_metrics(url: str, name: str, done, timeout_s: float = 30) -> dict[str, float]:
    """Poll /metrics until `done(values)` (Ray exports about every second, later on a loaded machine)."""
    deadline = time.monotonic() + timeout_s
    while True:
        values = metric_values(url, name)
        if done(values) or time.monotonic() > deadline:
            return values
        time.sleep(1.0)
