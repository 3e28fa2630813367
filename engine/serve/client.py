"""Clients of the reward server (stdlib HTTP only: a rollout worker needs neither Ray nor an HTTP library).

`RemoteLatentReward(url)` is a drop-in for ``engine.rl.dit_latent_reward_fn(engine)``: same call, rewards [B] float32
on the latents' device. `remote_reward_fn(url, base=...)` is a Flow-GRPO image reward that encodes images and
prompts locally (VAE + text encoders) and sends latents: the server scores latents only.
"""

from __future__ import annotations

import datetime
import email.utils
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

from engine.reward_noise import NoiseOption, check_noise_option
from engine.serve.wire import decode_response, encode_request


class RemoteRewardError(RuntimeError):
    """The server answered with an error status: 5xx (after retries, for 503), or another status the client does
    not expect."""

    def __init__(self, status: int, message: str):
        super().__init__(f"reward server answered {status}: {message}")
        self.status, self.message = status, message


class RemoteRequestError(RemoteRewardError, ValueError):
    """The server refused the request (4xx): a `ValueError`, as the in-process call raises for bad input, with the
    server's message (the engine's own for a 400)."""


# Transient answers: busy or restarting (503), an upload the server timed out (408).
RETRIED_STATUSES = (408, 503)


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (RFC 9110: delay-seconds or an HTTP-date), None when absent
    or unreadable (the client then backs off on its own)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a date without a zone is read as UTC
        when = when.replace(tzinfo=datetime.timezone.utc)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


class ScoreClient:
    """``POST /score`` with retries: 503 (busy, or a replica restarting), 408 and connection errors are retried
    with exponential backoff and jitter, never sooner than the server's ``Retry-After``. ``retry_timeout_s`` is a
    hard deadline for starting attempts: no wait runs past it, and a ``Retry-After`` that would is not waited
    for (the last failure is raised at once). Each attempt may take up to ``timeout_s``. A 4xx raises
    `RemoteRequestError` (a `ValueError`) with the server's message; a 5xx raises `RemoteRewardError`; a 200 that
    is not the answer to the request raises `ServerResponseError`."""

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
        fresh_noise: bool = False,
        *,
        t: float | torch.Tensor | None = None,
        add_noise: bool = True,
    ) -> dict[str, torch.Tensor]:
        """The server's outputs (``rewards`` [B] float32 and, for an uncertainty head, ``std`` [B], on the CPU).
        ``t``/``add_noise`` as `RewardEngine.score` (a float or a float tensor [B]; see `encode_request`)."""
        body = encode_request(
            latents, prompt_embeds, pooled, prompt_index, noise, seed, fresh_noise, t=t, add_noise=add_noise
        )
        return decode_response(self.post("/score", body), batch=latents.shape[0])

    def post(self, path: str, body: bytes) -> bytes:
        headers = {"Content-Type": "application/octet-stream"}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        deadline = time.monotonic() + self.retry_timeout_s
        delay = self.backoff_s
        while True:
            asked: float | None = None
            try:
                request = urllib.request.Request(self.url + path, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return response.read()
            except urllib.error.HTTPError as e:
                message = _error_message(e)
                if 400 <= e.code < 500 and e.code not in RETRIED_STATUSES:
                    raise RemoteRequestError(e.code, message) from None
                if e.code not in RETRIED_STATUSES:
                    raise RemoteRewardError(e.code, message) from None
                asked = retry_after_s(e.headers.get("Retry-After"))
                failure: Exception = RemoteRewardError(e.code, message)
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
                failure = e
            wait = max(delay * random.uniform(0.5, 1.0), asked or 0.0)
            if time.monotonic() + wait > deadline:
                raise failure
            time.sleep(wait)
            delay = min(2 * delay, self.max_backoff_s)
            self.retries += 1

    def describe(self) -> dict[str, Any]:
        """``GET /healthz``: the server's model dimensions, prompt lengths, dtype and device."""
        return json.loads(self.get("/healthz"))

    def get(self, path: str) -> bytes:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token is not None else {}
        with urllib.request.urlopen(urllib.request.Request(self.url + path, headers=headers), timeout=30) as r:
            return r.read()


def _error_message(e: urllib.error.HTTPError) -> str:
    raw = e.read()
    try:
        return json.loads(raw)["error"]
    except (ValueError, KeyError, TypeError):
        return raw.decode(errors="replace")[:500]


class RemoteLatentReward:
    """``fn(latents, prompt_embeds, pooled, prompt_index=None, *, group_index=None, prompts=None, t=None,
    add_noise=True) -> rewards [B]``, the call of `engine.rl.dit_latent_reward_fn`, scored by a reward server
    (``t``: a float or a float tensor [B]; a sampler's intermediate x_t: ``t=sigma, add_noise=False``).

    Rows and latents pair up as there: ``prompt_index`` into distinct rows; ``group_index``/``prompts`` label
    per-latent rows (only the first row of each group is sent); or R == B / R == 1. Near-clean noise, as
    in-process: by default the server's common noise (one fixed draw per latent shape, so an image's reward depends
    on the image and its prompt only, not on the call or its batch-mates); ``noise="fresh"`` draws new noise every
    call; ``seed`` gives latent b of a call Philox stream b. Rewards come back as float32 on the latents' device.
    Retries: see `ScoreClient`.
    """

    def __init__(
        self, url: str, token: str | None = None, *, noise: NoiseOption = "common", seed: int | None = None,
        **client_kwargs: Any,
    ):  # fmt: skip
        check_noise_option(noise, seed, default="common")
        self.client = ScoreClient(url, token, **client_kwargs)
        self.noise, self.seed = noise, seed

    def __call__(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        prompt_index: torch.Tensor | Sequence[int] | None = None,
        *,
        group_index: torch.Tensor | Sequence[int] | None = None,
        prompts: Sequence[str] | None = None,
        t: float | torch.Tensor | None = None,
        add_noise: bool = True,
    ) -> torch.Tensor:
        from engine.rl import distinct_prompts

        prompt_embeds, pooled, prompt_index = distinct_prompts(
            latents, prompt_embeds, pooled, prompt_index, group_index, prompts
        )
        out = self.client.score(
            latents, prompt_embeds, pooled, prompt_index, seed=self.seed if add_noise else None,
            fresh_noise=add_noise and self.noise == "fresh", t=t, add_noise=add_noise,
        )  # fmt: skip
        return out["rewards"].to(latents.device)


def remote_reward_fn(
    url: str,
    *,
    base: str | os.PathLike,
    token: str | None = None,
    device: torch.device | str | None = None,
    noise: NoiseOption = "common",
    seed: int | None = None,
    max_side: int | None = None,
    max_sequence_length: int | None = None,
    **client_kwargs: Any,
):
    """A Flow-GRPO image reward ``fn(images, prompts, metadata) -> (scores, {})`` backed by the server.

    The server has no pixel endpoint: this function loads the SD3/SD3.5 VAE and text encoders from ``base`` on
    ``device`` (what `engine.rl.dit_reward_fn` runs in-process, without the MMDiT), encodes the images and prompts,
    and sends latents. It saves the reward backbone's memory, not the encoders'. Noise as `RemoteLatentReward`:
    the server's common noise by default, ``noise="fresh"``, or ``seed`` (image i of a call uses noise stream i, as
    `RewardEngine.score_images`). Prompts are encoded at the T5 length the server's reward was trained at (its
    ``/healthz`` says which), unless ``max_sequence_length`` says otherwise."""
    from engine.pixel import PixelFrontEnd

    check_noise_option(noise, seed, default="common")
    client = ScoreClient(url, token, **client_kwargs)
    if max_sequence_length is None:
        max_sequence_length = client.describe()["max_sequence_length"]
    front = PixelFrontEnd.from_pretrained(base, device=device, max_sequence_length=max_sequence_length)

    def reward_fn(images: Any, prompts: Sequence[str], metadata: Any = None) -> tuple[np.ndarray, dict]:
        groups = front.prepare(images, prompts, max_side=max_side, seed=seed)
        scores = np.empty(sum(len(g.index) for g in groups), dtype=np.float32)
        for g in groups:
            out = client.score(g.latents, g.prompt_embeds, g.pooled, g.prompt_index, noise=g.noise,
                               fresh_noise=noise == "fresh")  # fmt: skip
            scores[g.index.cpu().numpy()] = out["rewards"].numpy()
        return scores, {}

    reward_fn.front_end = front  # type: ignore[attr-defined]
    return reward_fn
