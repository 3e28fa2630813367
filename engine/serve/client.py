"""Clients of the reward server (stdlib HTTP only: a rollout worker needs neither Ray nor an HTTP library).

`RemoteLatentReward(url)` is a drop-in for ``engine.rl.dit_latent_reward_fn(engine)``: same call, rewards [B] float32
on the latents' device. `remote_reward_fn(url, base=...)` is a Flow-GRPO image reward that encodes images and
prompts locally (VAE + text encoders) and sends latents: the server scores latents only.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from engine.serve.wire import decode_response, encode_request


class RemoteRewardError(RuntimeError):
    """The server answered with an error status (after retries, for 503)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"reward server answered {status}: {message}")
        self.status, self.message = status, message


class ScoreClient:
    """``POST /score`` with retries: 503 (busy, or a replica restarting) and connection errors are retried with
    exponential backoff and jitter (at least the server's ``Retry-After``) until ``retry_timeout_s`` has passed. A
    400 raises `ValueError` with the engine's message, as the in-process call would; other statuses raise
    `RemoteRewardError`."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout_s: float = 300.0,
        retry_timeout_s: float = 120.0,
        backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
    ):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s, self.retry_timeout_s = timeout_s, retry_timeout_s
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.retries = 0  # requests re-sent so far (for tests and logs)

    def score(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        prompt_index: torch.Tensor | Sequence[int] | None = None,
        noise: torch.Tensor | None = None,
        seed: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """The server's outputs (``rewards`` [B] float32, on the CPU) for one request."""
        body = encode_request(latents, prompt_embeds, pooled, prompt_index, noise, seed)
        return decode_response(self.post("/score", body))

    def post(self, path: str, body: bytes) -> bytes:
        headers = {"Content-Type": "application/octet-stream"}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        deadline = time.monotonic() + self.retry_timeout_s
        delay = self.backoff_s
        while True:
            wait: float | None = None
            try:
                request = urllib.request.Request(self.url + path, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return response.read()
            except urllib.error.HTTPError as e:
                message = _error_message(e)
                if e.code == 400:
                    raise ValueError(message) from None
                if e.code != 503:
                    raise RemoteRewardError(e.code, message) from None
                wait = float(e.headers.get("Retry-After") or 0)
                failure: Exception = RemoteRewardError(503, message)
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
                failure = e
            if time.monotonic() + delay > deadline:
                raise failure
            time.sleep(min(max(delay * random.uniform(0.5, 1.0), wait or 0.0), self.max_backoff_s))
            delay = min(2 * delay, self.max_backoff_s)
            self.retries += 1

    def get(self, path: str) -> bytes:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token is not None else {}
        with urllib.request.urlopen(urllib.request.Request(self.url + path, headers=headers), timeout=30) as r:
            return r.read()


def _error_message(e: urllib.error.HTTPError) -> str:
    raw = e.read()
    try:
        return json.loads(raw)["error"]
    except (ValueError, KeyError, TypeError):
        return raw.decode(errors="replace")


class RemoteLatentReward:
    """``fn(latents, prompt_embeds, pooled, prompt_index=None, *, group_index=None, prompts=None) -> rewards [B]``,
    the call of `engine.rl.dit_latent_reward_fn`, scored by a reward server.

    Rows and latents pair up as there: ``prompt_index`` into distinct rows; ``group_index``/``prompts`` label
    per-latent rows (only the first row of each group is sent); or R == B / R == 1. ``seed``: near-clean noise
    (latent b of a call uses Philox stream b, as in-process); None: fresh noise on the server. Rewards come back as
    float32 on the latents' device. Retries: see `ScoreClient`.
    """

    def __init__(self, url: str, token: str | None = None, *, seed: int | None = None, **client_kwargs: Any):
        from engine.checks import check_seed

        check_seed(seed)
        self.client = ScoreClient(url, token, **client_kwargs)
        self.seed = seed

    def __call__(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        prompt_index: torch.Tensor | Sequence[int] | None = None,
        *,
        group_index: torch.Tensor | Sequence[int] | None = None,
        prompts: Sequence[str] | None = None,
    ) -> torch.Tensor:
        from engine.rl import distinct_prompts

        prompt_embeds, pooled, prompt_index = distinct_prompts(
            latents, prompt_embeds, pooled, prompt_index, group_index, prompts
        )
        out = self.client.score(latents, prompt_embeds, pooled, prompt_index, seed=self.seed)
        return out["rewards"].to(latents.device)


def remote_reward_fn(
    url: str,
    *,
    base: str | os.PathLike,
    token: str | None = None,
    device: torch.device | str | None = None,
    seed: int | None = None,
    max_side: int | None = None,
    **client_kwargs: Any,
):
    """A Flow-GRPO image reward ``fn(images, prompts, metadata) -> (scores, {})`` backed by the server.

    The server has no pixel endpoint: this function loads the SD3/SD3.5 VAE and text encoders from ``base`` on
    ``device`` (what `engine.rl.dit_reward_fn` runs in-process, without the MMDiT), encodes the images and prompts,
    and sends latents. It saves the reward backbone's memory, not the encoders'. ``seed``: image i of a call uses
    noise stream i, as `RewardEngine.score_images`."""
    from engine.checks import check_seed
    from engine.pixel import PixelFrontEnd

    check_seed(seed)
    front = PixelFrontEnd.from_pretrained(base, device=device)
    client = ScoreClient(url, token, **client_kwargs)

    def reward_fn(images: Any, prompts: Sequence[str], metadata: Any = None) -> tuple[np.ndarray, dict]:
        groups = front.prepare(images, prompts, max_side=max_side, seed=seed)
        scores = np.empty(sum(len(g.index) for g in groups), dtype=np.float32)
        for g in groups:
            out = client.score(g.latents, g.prompt_embeds, g.pooled, g.prompt_index, noise=g.noise)
            scores[g.index.cpu().numpy()] = out["rewards"].numpy()
        return scores, {}

    return reward_fn
