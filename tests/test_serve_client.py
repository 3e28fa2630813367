"""The clients (engine.serve.client) against a scripted HTTP server: what they accept as an answer, how they wait,
and which errors they raise. No Ray: the clients need only the standard library."""

from __future__ import annotations

import email.utils
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import load, save

from engine.serve import (
    RemoteLatentReward,
    RemoteRequestError,
    RemoteRewardError,
    ScoreClient,
    ServerResponseError,
    remote_reward_fn,
)
from engine.serve.client import retry_after_s

LATENTS = torch.zeros(2, 16, 8, 8)
PROMPT = torch.zeros(1, 12, 96), torch.zeros(1, 64)


class Script:
    """The answers the server gives, in order (the last one repeats), and when each request came."""

    def __init__(self, *answers: tuple[int, dict[str, str], bytes]):
        self.answers, self.times, self.bodies = list(answers), [], []
        self.healthz: dict = {}


@pytest.fixture
def server() -> Iterator[tuple[str, Script]]:
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            script.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
            script.times.append(time.monotonic())
            status, headers, body = script.answers[min(len(script.times), len(script.answers)) - 1]
            self.send_response(status)
            for k, v in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802
            body = json.dumps(script.healthz).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", script
    httpd.shutdown()


def ok(**tensors: torch.Tensor) -> tuple[int, dict[str, str], bytes]:
    return 200, {"Content-Type": "application/octet-stream"}, save(tensors)


def error(status: int, message: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json", **headers}, f'{{"error": "{message}"}}'.encode()


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (ok(rewards=torch.zeros(3)), "rewards is float32 \\[3\\], expected \\[2\\] float32"),
        (ok(rewards=torch.zeros(2, dtype=torch.float64)), "rewards is float64 \\[2\\]"),
        (ok(rewards=torch.zeros(2, 1)), "rewards is float32 \\[2, 1\\]"),
        (ok(scores=torch.zeros(2)), "holds \\['scores'\\], expected \\['rewards'\\]"),
        (ok(rewards=torch.zeros(2), std=torch.zeros(3)), "std is float32 \\[3\\]"),
        ((200, {"Content-Type": "text/html"}, b"<html>proxy login</html>"), "not a safetensors body.*<html>"),
        ((200, {}, b""), "not a safetensors body"),
    ],
    ids=["3-rows-for-2", "float64", "2-d", "no-rewards", "std-rows", "html", "empty"],
)
def test_a_wrong_200_raises_server_response_error_naming_it(server, answer, message):
    url, script = server
    script.answers = [answer]
    with pytest.raises(ServerResponseError, match=message):
        ScoreClient(url).score(LATENTS, *PROMPT)
    script.answers = [ok(rewards=torch.arange(2.0), std=torch.ones(2))]
    out = ScoreClient(url).score(LATENTS, *PROMPT)
    assert out["rewards"].tolist() == [0.0, 1.0] and out["std"].tolist() == [1.0, 1.0]


def test_retry_timeout_is_a_hard_deadline_even_for_a_huge_retry_after(server):
    url, script = server
    script.answers = [error(503, "busy", **{"Retry-After": "1000000000"})]
    start = time.monotonic()
    with pytest.raises(RemoteRewardError, match="answered 503: busy") as info:
        ScoreClient(url, retry_timeout_s=2).score(LATENTS, *PROMPT)
    assert time.monotonic() - start < 1.0, "a wait the deadline cannot hold is not started"
    assert not isinstance(info.value, ValueError)
    script.answers, script.times = [error(503, "busy", **{"Retry-After": "0"})], []
    start = time.monotonic()
    with pytest.raises(RemoteRewardError):
        ScoreClient(url, retry_timeout_s=1.5, backoff_s=0.2).score(LATENTS, *PROMPT)
    # retried with backoff, and stopped before a wait that would end past the deadline
    assert time.monotonic() - start <= 1.5 and len(script.times) >= 3


def test_both_retry_after_forms_are_honoured(server):
    """RFC 9110: delay-seconds or an HTTP-date; either is waited for, never read as a client error."""
    url, script = server
    for form, at_least in (("seconds", 0.9), ("date", 1.5)):
        # an HTTP-date has whole seconds: 3 s ahead is 2-3 s ahead
        value = "1" if form == "seconds" else email.utils.formatdate(time.time() + 3, usegmt=True)
        script.answers, script.times = [error(503, "busy", **{"Retry-After": value}), ok(rewards=torch.ones(2))], []
        out = ScoreClient(url, retry_timeout_s=10, backoff_s=0.01).score(LATENTS, *PROMPT)
        assert out["rewards"].tolist() == [1.0, 1.0]
        assert script.times[1] - script.times[0] >= at_least, value
    now = 1_000_000_000.0
    assert retry_after_s(email.utils.formatdate(now + 30, usegmt=True), now=now) == 30.0
    assert retry_after_s("Sun, 06 Nov 1994 08:49:37 GMT", now=now) == 0.0  # in the past: retry now
    assert retry_after_s("120", now=now) == 120.0
    assert retry_after_s("soon", now=now) is None and retry_after_s("-5") is None and retry_after_s(None) is None


@pytest.mark.parametrize("status", [400, 401, 404, 413])
def test_4xx_are_value_errors_with_the_servers_message(server, status):
    url, script = server
    script.answers = [error(status, "the engine says no")]
    with pytest.raises(ValueError, match="the engine says no") as info:
        ScoreClient(url).score(LATENTS, *PROMPT)
    assert isinstance(info.value, RemoteRequestError) and info.value.status == status
    assert len(script.times) == 1  # not retried


@pytest.mark.parametrize("status", [500, 502])
def test_5xx_are_not_value_errors(server, status):
    url, script = server
    script.answers = [error(status, "scoring failed")]
    with pytest.raises(RemoteRewardError, match=f"answered {status}: scoring failed") as info:
        ScoreClient(url).score(LATENTS, *PROMPT)
    assert not isinstance(info.value, ValueError) and len(script.times) == 1


def test_408_and_503_are_retried(server):
    url, script = server
    script.answers = [error(408, "slow upload"), error(503, "busy"), ok(rewards=torch.ones(2))]
    client = ScoreClient(url, backoff_s=0.01)
    assert client.score(LATENTS, *PROMPT)["rewards"].tolist() == [1.0, 1.0] and client.retries == 2


def test_the_request_is_checked_by_the_servers_schema_before_it_is_sent(server):
    url, script = server
    noise = torch.zeros_like(LATENTS)
    cases = [
        ({"noise": noise, "seed": 1}, "request: seed: .* expected at most one of noise, seed, fresh_noise"),
        ({"seed": 2**63}, "seed must be an int in \\[0, 2\\*\\*63\\)"),
    ]
    with pytest.raises(ValueError, match="request: latents: got float8_e4m3fn tensor"):
        ScoreClient(url).score(LATENTS.to(torch.float8_e4m3fn), *PROMPT)
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            ScoreClient(url).score(LATENTS, *PROMPT, **kwargs)
    assert not script.times, "nothing was sent"


def test_remote_latent_reward_sends_the_noise_option(server):
    url, script = server
    script.answers = [ok(rewards=torch.ones(2))]
    RemoteLatentReward(url)(LATENTS, *PROMPT)
    RemoteLatentReward(url, noise="fresh")(LATENTS, *PROMPT)
    RemoteLatentReward(url, seed=3)(LATENTS, *PROMPT)
    common, fresh, seeded = (load(b) for b in script.bodies)
    assert not {"seed", "fresh_noise", "noise"} & set(common)  # the server's common noise
    assert bool(fresh["fresh_noise"]) and int(seeded["seed"]) == 3
    for bad, message in (({"noise": "random"}, "noise must be 'common'"), ({"seed": -1}, "seed must be an int in")):
        with pytest.raises(ValueError, match=message):
            RemoteLatentReward(url, **bad)


def test_remote_image_reward_encodes_prompts_at_the_servers_trained_length(server):
    """The server's reward was trained at some T5 length (its /healthz says which); remote_reward_fn
    encodes prompts at it unless told otherwise, so the server scores the embeddings its head was trained on."""
    from bench.tiny_base import default_tiny_base

    url, script = server
    script.healthz = {"status": "ok", "max_sequence_length": 64}
    fn = remote_reward_fn(url, base=default_tiny_base(), device="cpu")
    assert fn.front_end.prompt_encoder.max_sequence_length == 64
    images = [torch.zeros(32, 32, 3, dtype=torch.uint8).numpy()]
    script.answers = [ok(rewards=torch.ones(1))]
    scores, _ = fn(images, ["a red cube"])
    assert scores.tolist() == [1.0] and load(script.bodies[-1])["prompt_embeds"].shape[1] == 77 + 64
    fixed = remote_reward_fn(url, base=default_tiny_base(), device="cpu", max_sequence_length=32)
    assert fixed.front_end.prompt_encoder.max_sequence_length == 32
