"""The reward server (engine.serve) on the CPU: one Ray instance and one tiny-preset server for the module.

Every reward is checked against an independent in-process `engine.score` on the same inputs and noise; batching,
error answers, backpressure and a replica killed under load are exercised against the running server.
"""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

pytest.importorskip("ray.serve", reason="needs the serve extra: pip install -e '.[serve]'")

import ray  # noqa: E402
from serve_helpers import (  # noqa: E402
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
)

from engine import RewardEngine  # noqa: E402
from engine.rl import dit_latent_reward_fn  # noqa: E402
from engine.serve import RemoteLatentReward, ScoreClient, decode_response, encode_request  # noqa: E402
from engine.serve.config import ServeConfig  # noqa: E402
from engine.serve.scorer import ConditioningCache  # noqa: E402
from engine.serve.wire import RequestError, decode_request  # noqa: E402

CONFIG = ServeConfig(
    preset="tiny",
    dtype="fp32",
    device="cpu",
    max_batch=8,
    batch_wait_ms=50,
    replicas=1,
    max_ongoing=8,
    max_queued=8,  # small, so that a burst sees 503s (the retrying clients absorb them)
    retry_after_s=1,
    max_request_mb=1,
    token=TOKEN,
    cache_size=64,
)


@pytest.fixture(scope="module")
def engine() -> RewardEngine:
    """The in-process reference: the same preset and seed as the server's replicas, built here independently."""
    return RewardEngine.from_preset("tiny", dtype="fp32")


@pytest.fixture(scope="module")
def url():
    yield start_server(CONFIG, name="serve-core")
    stop_server()


def batch_totals(url: str) -> tuple[float, float]:
    """(requests scored in batches, batches) so far."""
    prefix = "dit_reward_serve_"
    return tuple(sum(metric_values(url, prefix + n).values()) for n in ("batched_requests_total", "batches_total"))


def run_clients(url: str, requests: list[dict], clients: int) -> list[torch.Tensor]:
    client = ScoreClient(url, TOKEN, retry_timeout_s=60)

    def one(x: dict) -> torch.Tensor:
        return client.score(**x)["rewards"]

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, requests))


def test_concurrent_clients_match_in_process_and_batch(url, engine):
    """24 concurrent clients, batches of 1-4 latents at two latent sizes, explicit noise or seeds, one or several
    prompts per request: every reward equals in-process engine.score; batches hold more than one request."""
    gen = torch.Generator().manual_seed(0)
    requests = [
        make_request(
            engine,
            gen,
            batch=1 + i % 4,
            side=(16, 8)[i % 2],
            prompts=(1, 1 + i % 4, 2)[i % 3],
            kind=("noise", "seed")[i % 2 // 1 if i % 5 else 0],
        )  # fmt: skip
        for i in range(48)
    ]
    total_before, count_before = batch_totals(url)
    start = time.perf_counter()
    rewards = run_clients(url, requests, clients=24)
    print(f"{len(requests)} requests from 24 clients: {time.perf_counter() - start:.1f} s")
    for x, r in zip(requests, rewards, strict=True):
        assert r.dtype == torch.float32 and r.shape == (x["latents"].shape[0],)
        torch.testing.assert_close(r, in_process(engine, x), rtol=0, atol=TOL)
    deadline = time.monotonic() + 30  # Ray exports metrics about every second (later on a loaded machine)
    while True:
        time.sleep(1.0)
        total, count = batch_totals(url)
        if total - total_before >= len(requests) or time.monotonic() > deadline:
            break
    total, count = total - total_before, count - count_before
    print(f"/metrics: {total:g} requests in {count:g} batches, read after {time.perf_counter() - start:.1f} s")
    assert total == len(requests), "every request is scored in exactly one batch"
    assert total / count > 1, f"mean batch {total / count:.2f} requests: no batching under load"


def test_remote_latent_reward_is_a_drop_in(url, engine):
    """RemoteLatentReward vs dit_latent_reward_fn: same call (GRPO groups given as group_index), same rewards."""
    gen = torch.Generator().manual_seed(1)
    cfg = engine.config
    latents = torch.randn(6, cfg.in_channels, 16, 16, generator=gen)
    rows = torch.randn(2, 12, cfg.joint_attention_dim, generator=gen), torch.randn(2, cfg.pooled_projection_dim)
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    local = dit_latent_reward_fn(engine, seed=5)(latents, rows[0][group], rows[1][group], group_index=group)
    remote = RemoteLatentReward(url, token=TOKEN, seed=5)(latents, rows[0][group], rows[1][group], group_index=group)
    torch.testing.assert_close(remote, local, rtol=0, atol=TOL)
    with pytest.raises(ValueError, match="must be \\[B, 16, H, W\\]"):  # the engine's message, raised client-side
        RemoteLatentReward(url, token=TOKEN)(latents[:, :3], *rows)


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(url, engine):
    gen = torch.Generator().manual_seed(2)
    good = make_request(engine, gen, batch=2, side=16, prompts=1, kind="noise")
    nan_latents = {**good, "latents": good["latents"].clone().index_fill_(0, torch.tensor([1]), float("nan"))}
    wrong_channels = {**good, "latents": good["latents"][:, :3], "noise": good["noise"][:, :3]}
    bad_index = {**good, "prompt_embeds": good["prompt_embeds"].repeat(2, 1, 1), "pooled": good["pooled"].repeat(2, 1),
                 "prompt_index": torch.tensor([0, 5])}  # fmt: skip
    wrong_text_dim = {**good, "prompt_embeds": good["prompt_embeds"][..., :-1]}
    # the engine's own message comes back with 400
    for x in (nan_latents, wrong_channels, bad_index, wrong_text_dim):
        status, _, body = post(url, encode_request(**x))
        assert status == 400, body
        assert json.loads(body)["error"] == engine_message(engine, x)
    # the envelope, checked by the server
    from safetensors.torch import save

    plain = {k: v for k, v in good.items() if k != "noise"}
    cases = {
        b"not a safetensors body": "not a safetensors file",
        save({k: v for k, v in plain.items() if k != "pooled"}): "request: pooled: missing",
        save({**plain, "extra": torch.zeros(1)}): "request: extra: an unknown field",
        save({**plain, "latents": plain["latents"].long()}): "latents: got int64 tensor .* expected a tensor",
        save({**plain, "seed": torch.tensor([1, 2])}): "seed: got int64 tensor \\[2\\], expected a scalar",
        save({**plain, "prompt_index": torch.zeros(2, dtype=torch.int32)}): "prompt_index: got int32 tensor",
        save({**plain, "seed": torch.tensor(1), "noise": good["noise"]}): "at most one of noise, seed, fresh_noise",
    }
    for body, message in cases.items():
        status, _, answer = post(url, body)
        assert status == 400 and re.search(message, json.loads(answer)["error"]), (status, answer)
    assert post(url, encode_request(**good), token=None)[0] == 401
    assert post(url, encode_request(**good), token="wrong")[0] == 401
    big = {**good, "latents": torch.randn(8, 16, 64, 64), "noise": None}
    assert post(url, encode_request(**{k: v for k, v in big.items() if v is not None}))[0] == 413  # 2 MiB > 1
    # bad requests in the same batches as good ones: the good ones are scored correctly
    mixed = [good, nan_latents, wrong_channels, good, bad_index, good] * 2
    with ThreadPoolExecutor(len(mixed)) as pool:
        answers = list(pool.map(lambda x: post_until_admitted(url, encode_request(**x)), mixed))
    for x, (status, _, body) in zip(mixed, answers, strict=True):
        if x is good:
            assert status == 200, body
            torch.testing.assert_close(decode_response(body)["rewards"], in_process(engine, x), rtol=0, atol=TOL)
        else:
            assert status == 400, body
    assert ScoreClient(url, TOKEN).get("/healthz").startswith(b'{"status":"ok"')


def test_burst_past_the_queue_gets_503_with_retry_after(url, engine):
    gen = torch.Generator().manual_seed(3)
    x = make_request(engine, gen, batch=4, side=16, prompts=1, kind="noise")
    body = encode_request(**x)
    with ThreadPoolExecutor(48) as pool:
        answers = list(pool.map(lambda _: post(url, body), range(48)))
    statuses = sorted({a[0] for a in answers})
    assert set(statuses) <= {200, 503}, statuses
    busy = [headers for status, headers, _ in answers if status == 503]
    assert busy, "48 simultaneous requests against 8 in flight + 8 queued: expected some 503s"
    assert all(h.get("Retry-After") == "1" for h in busy)


def test_replica_killed_mid_load_is_restarted_and_clients_complete(url, engine):
    gen = torch.Generator().manual_seed(4)
    requests = [make_request(engine, gen, batch=1 + i % 3, side=16, prompts=1, kind="noise") for i in range(60)]

    def scorer_replicas() -> list[dict]:
        return [a for a in ray.util.list_named_actors(all_namespaces=True) if "Scorer" in a["name"]]

    replicas = scorer_replicas()
    assert len(replicas) == 1, replicas
    victim = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])
    client = ScoreClient(url, TOKEN, retry_timeout_s=60)
    done = threading.Semaphore(0)

    def one(x: dict) -> torch.Tensor:
        r = client.score(**x)["rewards"]
        done.release()
        return r

    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(one, x) for x in requests]
        for _ in range(8):  # kill once the load is running: 12 clients in flight, most requests still to come
            assert done.acquire(timeout=60)
        ray.kill(victim, no_restart=True)
        results = [f.result(timeout=120) for f in futures]
    for x, r in zip(requests, results, strict=True):
        torch.testing.assert_close(r, in_process(engine, x), rtol=0, atol=TOL)
    assert client.retries >= 1, "the kill hit no request in flight"
    deadline = time.monotonic() + 30
    while not (after := scorer_replicas()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert after and after[0]["name"] != replicas[0]["name"], "Ray Serve did not start a new replica"


def test_remote_image_reward_matches_score_images(url):
    """remote_reward_fn encodes in this process and sends latents: same scores as the engine's score_images."""
    from bench.tiny_base import default_tiny_base
    from engine.serve import remote_reward_fn

    base = default_tiny_base()
    gen = torch.Generator().manual_seed(7)
    images = [torch.randint(0, 256, size, generator=gen, dtype=torch.uint8).numpy() for size in
              ((64, 64, 3), (48, 32, 3), (64, 64, 3))]  # fmt: skip
    prompts = ["a red cube", "a blue sphere", "a red cube"]
    fn = remote_reward_fn(url, base=base, token=TOKEN, device="cpu", seed=3)
    scores, details = fn(images, prompts, {})
    reference = RewardEngine.from_preset("tiny", dtype="fp32")
    reference.base_path = base  # the VAE and text encoders score_images loads (as from_pretrained(base=) attaches)
    expected = reference.score_images(images, prompts, seed=3)
    assert details == {} and scores.dtype == np.float32
    torch.testing.assert_close(torch.from_numpy(scores), expected, rtol=0, atol=TOL)


def test_deployment_handle_skips_http(url, engine):
    """In-cluster callers: the Scorer handle takes the wire format's tensors and answers like POST /score."""
    from engine.serve.app import scorer_handle

    x = make_request(engine, torch.Generator().manual_seed(6), batch=3, side=8, prompts=1, kind="seed")
    handle = scorer_handle(name="serve-core")
    out = handle.score.remote({**x, "seed": torch.tensor(x["seed"])}).result(timeout_s=60)
    torch.testing.assert_close(out["rewards"], in_process(engine, x), rtol=0, atol=TOL)
    wrong = {**x, "latents": x["latents"][:, :3]}
    bad = handle.score.remote({**wrong, "seed": torch.tensor(x["seed"])}).result(timeout_s=60)
    assert bad["error"] == engine_message(engine, wrong)
    bad = handle.score.remote(x).result(timeout_s=60)  # seed as a Python int: the envelope says so
    assert bad["status"] == 400 and bad["error"].startswith("request: seed: got int"), bad


def test_default_noise_is_common_so_a_reward_ignores_its_call_batch_and_position(url, engine):
    """Without noise or seed the server scores with engine.common_noise: an image's reward is the same alone, in a
    permuted batch, from several threads batched with other requests, and through RemoteLatentReward; fresh noise
    (noise="fresh") moves rewards by more than the tolerance."""
    gen = torch.Generator().manual_seed(8)
    x = make_request(engine, gen, batch=4, side=16, prompts=1, kind="common")
    reference = in_process(engine, x)
    client = ScoreClient(url, TOKEN, retry_timeout_s=60)
    torch.testing.assert_close(client.score(**x)["rewards"], reference, rtol=0, atol=TOL)
    order = torch.tensor([2, 0, 3, 1])
    permuted = client.score(x["latents"][order], x["prompt_embeds"], x["pooled"])["rewards"]
    torch.testing.assert_close(permuted, reference[order], rtol=0, atol=TOL)
    alone = [client.score(x["latents"][i : i + 1], x["prompt_embeds"], x["pooled"])["rewards"] for i in range(4)]
    torch.testing.assert_close(torch.cat(alone), reference, rtol=0, atol=TOL)
    others = [make_request(engine, gen, batch=1 + i % 3, side=16, prompts=1, kind="common") for i in range(6)]
    for r in run_clients(url, [x] * 4 + others, clients=10)[:4]:
        torch.testing.assert_close(r, reference, rtol=0, atol=TOL)
    rows = x["prompt_embeds"].expand(4, -1, -1), x["pooled"].expand(4, -1)
    torch.testing.assert_close(RemoteLatentReward(url, TOKEN)(x["latents"], *rows), reference, rtol=0, atol=TOL)
    fresh = RemoteLatentReward(url, TOKEN, noise="fresh")
    a, b = fresh(x["latents"], *rows), fresh(x["latents"], *rows)
    # (near-clean noise moves the tiny preset's rewards by ~1e-4; equal draws would agree to ~1e-7)
    assert (a - b).abs().max() > 2 * TOL and (a - reference).abs().max() > 2 * TOL
    with pytest.raises(ValueError, match="seed= fixes the noise per image"):
        RemoteLatentReward(url, TOKEN, noise="fresh", seed=1)


# ------------------------------------------------------------------------------------------- without the server


def test_envelope_errors_are_request_errors():
    with pytest.raises(RequestError, match="not a safetensors file"):
        decode_request(b"\x00" * 16)


def test_conditioning_cache_conditions_each_row_once_and_is_bounded(engine):
    gen = torch.Generator().manual_seed(5)
    cfg = engine.config
    embeds = torch.randn(3, 12, cfg.joint_attention_dim, generator=gen)
    pooled = torch.randn(3, cfg.pooled_projection_dim, generator=gen)
    cache = ConditioningCache(engine, capacity=2)
    cond, fresh = cache(embeds[:2], pooled[:2])
    assert fresh == 2 and len(cache) == 2
    again, fresh = cache(embeds[[1, 0]], pooled[[1, 0]])
    assert fresh == 0
    direct = engine.condition(embeds[[1, 0]], pooled[[1, 0]])
    torch.testing.assert_close(again.modulation, direct.modulation, rtol=0, atol=TOL)
    torch.testing.assert_close(again.context, direct.context, rtol=0, atol=TOL)
    _, fresh = cache(embeds[2:], pooled[2:])
    assert fresh == 1 and len(cache) == 2  # row 1 (least recently used: row 0 was read after it) evicted
    assert cache(embeds[:1], pooled[:1])[1] == 0
    assert cache(embeds[1:2], pooled[1:2])[1] == 1
