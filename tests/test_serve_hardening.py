"""The reward server against careless and hostile callers, on a live tiny-preset server for the module:
an empty bearer, requests the engine refuses mixed into batches of good ones, a fault inside a batch's forward, an
over-long prompt, and slow senders holding connections open. Every good request must get exactly its in-process
reward; every bad one its own 4xx (or 500 for a fault), counted in /metrics.
"""

from __future__ import annotations

import json
import re
import selectors
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("ray.serve", reason="needs the serve extra: pip install -e '.[serve]'")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors.torch import save  # noqa: E402
from serve_helpers import (  # noqa: E402
    POISON,
    TOKEN,
    TOL,
    engine_message,
    in_process,
    make_request,
    metric_values,
    post,
    post_until_admitted,
    start_server,
    stop_server,
    wait_for_metrics,
)

from engine import RewardEngine  # noqa: E402
from engine.serve import ScoreClient, decode_response, encode_request  # noqa: E402
from engine.serve.config import ServeConfig  # noqa: E402

UPLOAD_TIMEOUT_S = 10.0
PER_CLIENT = 16
CONFIG = ServeConfig(
    preset="tiny",
    dtype="fp32",
    device="cpu",
    max_batch=8,
    batch_wait_ms=200,  # long enough that concurrent requests share batches
    replicas=1,
    max_ongoing=16,
    max_queued=64,
    max_request_mb=2,
    max_prompt_tokens=64,
    upload_timeout_s=UPLOAD_TIMEOUT_S,
    max_uploads=64,
    max_uploads_per_client=PER_CLIENT,
    token=TOKEN,
    cache_size=64,
)
REQUESTS = "dit_reward_serve_requests_total"


@pytest.fixture(scope="module")
def engine() -> RewardEngine:
    return RewardEngine.from_preset("tiny", dtype="fp32")


@pytest.fixture(scope="module")
def url():
    yield start_server(CONFIG, name="serve-hardening")
    stop_server()


def score_counts(values: dict[str, float]) -> dict[str, float]:
    """POST /score answers by status, {status: count}, from the samples of `REQUESTS`."""
    return {re.search(r'status="(\d+)"', k)[1]: v for k, v in values.items() if 'route="/score"' in k}


def counted(url: str) -> dict[str, float]:
    return score_counts(metric_values(url, REQUESTS))


def counted_after(url: str, before: dict[str, float], status: str, more: int) -> float:
    """How many more `status` answers /metrics counts than `before`, once it counts at least `more` more."""
    grown = lambda v: score_counts(v).get(status, 0) >= before.get(status, 0) + more  # noqa: E731
    return score_counts(wait_for_metrics(url, REQUESTS, grown)).get(status, 0) - before.get(status, 0)


def test_an_empty_bearer_never_passes(url, engine):
    body = encode_request(**make_request(engine, torch.Generator().manual_seed(0), 1, 8, 1, "seed"))
    for header in ("Bearer ", "Bearer", "Bearer  ", "", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}"):
        status, _, _ = post(url, body, token=None, headers={"Authorization": header})
        assert status == 401, header
    assert post(url, body)[0] == 200
    assert post(url, body, token=None, headers={"Authorization": f"bearer {TOKEN}"})[0] == 200  # (any case: RFC 9110)
    with pytest.raises(ValueError, match="token: got '', expected a non-empty bearer token"):
        ServeConfig(preset="tiny", token="")


def refused(engine: RewardEngine, gen: torch.Generator, kind: str) -> tuple[bytes, int, str]:
    """(body, status, the error's start) of one kind of bad request; 400s carry the engine's own message."""
    x = make_request(engine, gen, batch=2, side=8, prompts=1, kind="seed")
    envelope = {
        "seed -1": {**x, "seed": -1},
        "seed -2**63": {**x, "seed": -(2**63)},
        "float8 latents": {**x, "latents": x["latents"].to(torch.float8_e4m3fn)},
        "float8 prompt_embeds": {**x, "prompt_embeds": x["prompt_embeds"].to(torch.float8_e4m3fn)},
    }
    if kind in envelope:
        y = envelope[kind]
        tensors = {**y, "seed": torch.tensor(y["seed"])}
        name = kind.split()[-1] if kind.startswith("float8") else "seed"
        return save({k: v.contiguous() for k, v in tensors.items()}), 400, f"request: {name}: got"
    if kind == "not safetensors":
        return b"<html>not a body</html>", 400, "body is not a safetensors file"
    if kind == "truncated":
        return encode_request(**x)[:-7], 400, "body is not a safetensors file"
    if kind == "poisoned":  # passes every check, then fails inside the engine's forward
        x["latents"][0, 0, 0, 0] = POISON
        return encode_request(**x), 500, "scoring failed: RuntimeError: injected fault"
    bad = {
        "0 prompt rows": {**x, "prompt_embeds": x["prompt_embeds"][:0], "pooled": x["pooled"][:0]},
        "NaN latents": {**x, "latents": x["latents"].index_fill(0, torch.tensor([1]), float("nan"))},
        "3 channels": {**x, "latents": x["latents"][:, :3]},
        "odd side": {**x, "latents": x["latents"][:, :, :7, :7]},
        "prompt_index 5": {**x, "prompt_index": torch.tensor([0, 5])},
    }[kind]
    return encode_request(**bad), 400, engine_message(engine, bad)


BAD_KINDS = ["seed -1", "seed -2**63", "float8 latents", "float8 prompt_embeds", "not safetensors", "truncated",
             "poisoned", "0 prompt rows", "NaN latents", "3 channels", "odd side", "prompt_index 5"]  # fmt: skip


def answer_all(url: str, bodies: list[bytes]) -> list[tuple[int, bytes]]:
    """All bodies at once (so that they share batches); busy 503s of admission control are retried."""
    with ThreadPoolExecutor(len(bodies)) as pool:
        return [(s, b) for s, _, b in pool.map(lambda body: post_until_admitted(url, body), bodies)]


def check_answers(engine: RewardEngine, goods: list[dict], bads: list[tuple[bytes, int, str]], answers) -> None:
    for x, (status, body) in zip(goods, answers, strict=False):
        assert status == 200, body
        torch.testing.assert_close(decode_response(body)["rewards"], in_process(engine, x), rtol=0, atol=TOL)
    for (_, expected, message), (status, body) in zip(bads, answers[len(goods) :], strict=True):
        assert status == expected and json.loads(body)["error"].startswith(message), (status, body)


def test_bad_requests_alone_and_in_batches_get_their_own_answer(url, engine):
    """Batch wait 200 ms, 4 good bodies with 2 whose prompts have 0 rows: each gets its own answer; then
    every kind of bad request alone (400, or 500 for a fault inside the forward) and all of them together with good
    ones; the 500s are counted in /metrics."""
    gen = torch.Generator().manual_seed(1)
    before = counted(url)
    goods = [make_request(engine, gen, batch=1 + i % 3, side=8, prompts=1, kind="seed") for i in range(4)]
    bads = [refused(engine, gen, "0 prompt rows") for _ in range(2)]
    check_answers(engine, goods, bads, answer_all(url, [encode_request(**x) for x in goods] + [b[0] for b in bads]))
    bads = [refused(engine, gen, kind) for kind in BAD_KINDS]
    for bad in bads:
        status, _, body = post(url, bad[0])
        check_answers(engine, [], [bad], [(status, body)])
    goods = [make_request(engine, gen, batch=1 + i % 3, side=(8, 16)[i % 2], prompts=1, kind="noise") for i in range(6)]
    check_answers(engine, goods, bads, answer_all(url, [encode_request(**x) for x in goods] + [b[0] for b in bads]))
    assert counted_after(url, before, "500", 2) == 2  # the poisoned request, alone and in a batch


@pytest.mark.slow
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_property_malformed_bodies_never_change_a_good_ones_reward(url, engine, data):
    """Random malformed bodies mixed into batches of good ones: each good request gets exactly its in-process
    reward, each bad one its own error."""
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    goods = [
        make_request(engine, gen, batch=data.draw(st.integers(1, 3)), side=data.draw(st.sampled_from([8, 16])),
                     prompts=1, kind=data.draw(st.sampled_from(["noise", "seed", "common"])))
        for _ in range(data.draw(st.integers(1, 5), label="good requests"))
    ]  # fmt: skip
    kinds = data.draw(st.lists(st.sampled_from(BAD_KINDS), min_size=1, max_size=4), label="bad requests")
    bads = [refused(engine, gen, kind) for kind in kinds]
    check_answers(engine, goods, bads, answer_all(url, [encode_request(**x) for x in goods] + [b[0] for b in bads]))


def test_a_prompt_longer_than_the_cap_is_refused(url, engine):
    x = make_request(engine, torch.Generator().manual_seed(2), 1, 8, 1, "seed")
    x["prompt_embeds"] = torch.randn(1, 65, engine.config.joint_attention_dim)
    status, _, body = post(url, encode_request(**x))
    assert status == 400 and "65 tokens, more than this server's --max-prompt-tokens 64" in json.loads(body)["error"]


def test_openapi_documents_score(url):
    spec = json.loads(ScoreClient(url).get("/openapi.json"))
    score = spec["paths"]["/score"]["post"]
    assert set(score["requestBody"]["content"]) == {"application/octet-stream"}
    assert {"200", "400", "401", "413", "503"} <= set(score["responses"])
    assert "Retry-After" in score["responses"]["503"]["headers"]
    assert "latents [B, C, H, W]" in score["description"]


def stalled_uploads(url: str, count: int, source: str) -> list[socket.socket]:
    """`count` authenticated POST /score connections from address `source` that announce 1 MiB and send 10 bytes."""
    host, port = url.removeprefix("http://").split(":")
    head = (f"POST /score HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {2**20}\r\n\r\n").encode()  # fmt: skip
    sockets = []
    for _ in range(count):
        s = socket.create_connection((host, int(port)), timeout=10, source_address=(source, 0))
        s.sendall(head + b"0123456789")
        sockets.append(s)
    return sockets


def answers(sockets: list[socket.socket], timeout_s: float, count: int) -> dict[socket.socket, tuple[int, float]]:
    """The status and time (time.monotonic) of the first `count` of `sockets` to be answered, waiting up to
    `timeout_s`."""
    out: dict[socket.socket, tuple[int, float]] = {}
    with selectors.DefaultSelector() as selector:
        for s in sockets:
            selector.register(s, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout_s
        while len(out) < count and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.5):
                line = key.fileobj.recv(64)
                out[key.fileobj] = (int(line.split()[1]) if line else 0, time.monotonic())
                selector.unregister(key.fileobj)
    return out


@pytest.mark.slow
def test_stalled_senders_cannot_delay_good_requests(url, engine):
    """1,100 authenticated connections announcing 1 MiB and sending 10 bytes: one client address gets
    --max-uploads-per-client uploads at once (the rest are answered 503 at once); while those are held, good requests
    from another address are answered within 2 s each; the held ones are answered 408 after --upload-timeout-s."""
    try:  # Linux routes all of 127/8 to the loopback; macOS only 127.0.0.1 unless aliased
        socket.create_server(("127.0.0.2", 0)).close()
    except OSError:
        pytest.skip("needs a second loopback address (127.0.0.2) for the stalled senders")
    gen = torch.Generator().manual_seed(3)
    goods = [make_request(engine, gen, batch=2, side=8, prompts=1, kind="seed") for _ in range(8)]
    before = counted(url)
    start = time.monotonic()
    stalled = stalled_uploads(url, 1100, source="127.0.0.2")
    try:
        busy = answers(stalled, timeout_s=UPLOAD_TIMEOUT_S / 2, count=1100 - PER_CLIENT)
        refused_in = max(t for _, t in busy.values()) - start
        latencies = []
        for x in goods:
            sent = time.monotonic()
            status, _, answer = post(url, encode_request(**x))
            latencies.append(time.monotonic() - sent)
            assert status == 200, answer
            torch.testing.assert_close(decode_response(answer)["rewards"], in_process(engine, x), rtol=0, atol=TOL)
        held = [s for s in stalled if s not in busy]
        assert time.monotonic() - start < UPLOAD_TIMEOUT_S, "the uploads were not held while good requests ran"
        timed_out = answers(held, timeout_s=UPLOAD_TIMEOUT_S + 30, count=len(held))
    finally:
        for s in stalled:
            s.close()
    print(f"1100 stalled uploads: {len(busy)} refused within {refused_in:.1f} s; good requests answered in "
          f"{max(latencies):.2f} s at most (mean {sum(latencies) / len(latencies):.2f} s)")  # fmt: skip
    assert sorted({code for code, _ in busy.values()}) == [503] and len(busy) == 1100 - PER_CLIENT
    assert max(latencies) < 2.0, latencies
    assert len(timed_out) == PER_CLIENT and {code for code, _ in timed_out.values()} == {408}
    assert min(t for _, t in timed_out.values()) - start >= UPLOAD_TIMEOUT_S - 0.5
    assert counted_after(url, before, "408", PER_CLIENT) == PER_CLIENT
    assert counted_after(url, before, "503", 1100 - PER_CLIENT) == 1100 - PER_CLIENT
