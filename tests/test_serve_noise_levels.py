"""The noise level `t` and `add_noise` on the reward server's surface: the request schema, the batching scorer
(per-request t inside one forward, levels kept per (prompt row, t)) and the clients. Every reward is checked against
in-process `engine.score` with the same t. The batch scorer runs as a replica runs it and the clients talk to a
scripted HTTP server; one test (the last) starts a live tiny server on Ray."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load

pytest.importorskip("ray.serve", reason="needs the serve extra: pip install -e '.[serve]'")

from test_serve_client import LATENTS, PROMPT, ok, server  # noqa: E402, F401 (the scripted server fixture)

from engine import RewardEngine  # noqa: E402
from engine.serve import RemoteLatentReward, ScoreClient, encode_request  # noqa: E402
from engine.serve.request import RequestError, check_request, check_scorable  # noqa: E402
from engine.serve.scorer import BatchScorer, ConditioningCache, Item  # noqa: E402
from engine.serve.wire import decode_request  # noqa: E402


@pytest.fixture(scope="module")
def engine() -> RewardEngine:
    return RewardEngine.from_preset("tiny", dtype="fp32")


def request(engine: RewardEngine, draw: int, batch: int = 3, side: int = 8, **extra) -> dict:
    gen, cfg = torch.Generator().manual_seed(draw), engine.config
    return {
        "latents": torch.randn(batch, cfg.in_channels, side, side, generator=gen),
        "prompt_embeds": torch.randn(1, 12, cfg.joint_attention_dim, generator=gen),
        "pooled": torch.randn(1, cfg.pooled_projection_dim, generator=gen),
        **extra,
    }


def in_process(engine: RewardEngine, x: dict) -> torch.Tensor:
    """`engine.score` as a caller in the same process would call it: t a Python float or the tensor itself."""
    t = x.get("t")
    t = float(t) if isinstance(t, torch.Tensor) and t.ndim == 0 else t
    add_noise = bool(x.get("add_noise", True))
    noise = x.get("noise")
    if add_noise and noise is None and x.get("seed") is None:
        noise = engine.common_noise(x["latents"])
    seed = None if x.get("seed") is None else int(x["seed"])
    return engine.score(x["latents"], (x["prompt_embeds"], x["pooled"]), noise, seed, t=t, add_noise=add_noise)


def run_batch(engine: RewardEngine, requests: list[dict]) -> list[dict]:
    items = [Item(check_request(x), 0.0) for x in requests]
    for item in items:
        check_scorable(item.request, engine, max_prompt_tokens=589)
    BatchScorer(engine, ConditioningCache(engine, 16), lambda what, n: None).run(items)
    return [item.result for item in items]


def test_the_envelope_takes_t_and_refuses_bad_ones_naming_the_field(engine):
    x = request(engine, 0)
    check_request({**x, "t": torch.tensor(0.3, dtype=torch.float64)})
    check_request({**x, "t": torch.tensor([0.2, 0.5, 1.0]), "add_noise": torch.tensor(False)})
    cases = [
        (
            torch.tensor([0.2, float("nan"), 0.5]),
            "t\\[1\\]: got nan, expected a scalar \\(0-d tensor\\) or a tensor "
            "\\[B\\] of float32 or float64 in \\[0, 1\\]",
        ),  # fmt: skip
        (torch.tensor(1.5), "t: got 1.5, expected"),
        (torch.tensor([0.2, -0.1, 0.5]), "t\\[1\\]: got -0.1"),
        (torch.tensor(float("inf")), "t: got inf"),
        (torch.tensor([0.2, 0.5]), "t: got float32 tensor \\[2\\], expected a scalar or one level per latent, \\[3\\]"),
        (torch.tensor([[0.2, 0.5, 0.1]]), "t: got float32 tensor \\[1, 3\\], expected a scalar \\(0-d tensor\\) or"),
        (torch.tensor([1, 0, 0]), "t: got int64 tensor \\[3\\]"),
        (torch.tensor(0.3, dtype=torch.bfloat16), "t: got bfloat16 tensor \\[\\]"),
    ]
    for t, message in cases:
        with pytest.raises(RequestError, match=message):
            check_request({**x, "t": t})
    for name, value in (("seed", torch.tensor(3)), ("fresh_noise", torch.tensor(True)), ("noise", x["latents"])):
        with pytest.raises(RequestError, match=f"{name}: got .* expected no noise source with add_noise false"):
            check_request({**x, name: value, "add_noise": torch.tensor(False)})
    with pytest.raises(RequestError, match="add_noise: got float32 tensor \\[\\], expected a scalar \\(0-d tensor\\) "
                       "of bool"):  # fmt: skip
        check_request({**x, "add_noise": torch.tensor(0.0)})


def test_the_checkpoints_range_of_t_is_the_engines_own_message(engine):
    """What the envelope lets through but the checkpoint's time schedule refuses (t = 0, or pure noise to be added)
    is refused before batching with the message in-process `engine.score` raises."""
    x = request(engine, 1)
    for bad in ({**x, "t": torch.tensor(1.0)}, {**x, "t": torch.tensor([0.1, 0.0, 0.3])}):
        with pytest.raises(ValueError) as served:
            check_scorable(check_request(bad), engine, max_prompt_tokens=589)
        with pytest.raises(ValueError) as local:
            in_process(engine, bad)
        assert str(served.value) == str(local.value) and "t" in str(served.value)
    # pure noise is a sampler's first state: scored as it is
    check_scorable(check_request({**x, "t": torch.tensor(1.0), "add_noise": torch.tensor(False)}), engine, 589)


def test_a_request_alone_scores_bit_equal_to_engine_score(engine):
    """One request, one forward: the same ops on the same inputs as the in-process call, t a Python float (sent as
    float64), a float32 scalar, or a tensor [B], with noise added or on x_t."""
    cases = [
        request(engine, 2, seed=torch.tensor(7)),
        request(engine, 3, t=torch.tensor(0.35, dtype=torch.float64)),
        request(engine, 4, t=torch.tensor(0.35), noise=torch.randn(3, 16, 8, 8)),
        request(engine, 5, t=torch.tensor([0.2, 0.9, 0.55]), seed=torch.tensor(1)),
        request(engine, 6, t=torch.tensor(0.6), add_noise=torch.tensor(False)),
        request(engine, 7, t=torch.tensor([1.0, 0.5, 0.05]), add_noise=torch.tensor(False)),
    ]
    for x in cases:
        (result,) = run_batch(engine, [x])
        assert torch.equal(result["rewards"], in_process(engine, x)), x.keys()
    # t moves the reward (the comparisons above can fail)
    base = in_process(engine, {**cases[1], "t": None})
    assert (in_process(engine, cases[1]) - base).abs().max() > 1e-4


def test_requests_at_different_levels_share_one_forward_each_at_its_own_t(engine):
    """A batch mixing the checkpoint's t, a float t, float32 [B] t's and (in a second forward) x_t requests:
    every request gets the rewards of its own in-process call (up to fp32 summation order across batch shapes and
    the ulp of a float32 t, as in tests/test_noise_levels.py)."""
    requests = [
        request(engine, 10, batch=2, seed=torch.tensor(3)),
        request(engine, 11, batch=1, t=torch.tensor(0.7, dtype=torch.float64)),
        request(engine, 12, batch=3, t=torch.tensor([0.15, 0.45, 0.95])),
        request(engine, 13, batch=2, t=torch.tensor([0.3, 0.8]), add_noise=torch.tensor(False)),
        request(engine, 14, batch=2, t=torch.tensor(0.5), add_noise=torch.tensor(False)),
        request(engine, 15, batch=2),
    ]
    scored: list[int] = []
    items = [Item(check_request(x), 0.0) for x in requests]
    scorer = BatchScorer(engine, ConditioningCache(engine, 16), lambda what, n: scored.append(n) if what ==
                         "batch_images" else None)  # fmt: skip
    scorer.run(items)
    assert sorted(scored) == [4, 8]  # two forwards: 8 latents noised to their levels, 4 scored as x_t
    for x, item in zip(requests, items, strict=True):
        torch.testing.assert_close(item.result["rewards"], in_process(engine, x), rtol=0, atol=1e-5)


def test_the_wire_carries_t_exactly(engine):
    x = request(engine, 20)
    t32 = torch.tensor([0.1, 0.2000001, 0.3])
    back = decode_request(encode_request(x["latents"], x["prompt_embeds"], x["pooled"], t=t32, add_noise=False))
    assert torch.equal(back.t, t32) and back.t.dtype == torch.float32 and back.adds_noise is False
    back = decode_request(encode_request(x["latents"], x["prompt_embeds"], x["pooled"], t=0.1))
    assert back.noise_level() == 0.1 and back.add_noise is None  # a Python float comes back as the same float
    with pytest.raises(RequestError, match="t: got 2.0"):
        encode_request(x["latents"], x["prompt_embeds"], x["pooled"], t=2.0)
    with pytest.raises(RequestError, match="seed: got .* no noise source with add_noise false"):
        encode_request(x["latents"], x["prompt_embeds"], x["pooled"], seed=1, add_noise=False)


def test_clients_send_t_and_add_noise(server):  # noqa: F811 (the fixture)
    url, script = server
    script.answers = [ok(rewards=torch.ones(2))]
    ScoreClient(url).score(LATENTS, *PROMPT, t=0.4)
    RemoteLatentReward(url, seed=3)(LATENTS, *PROMPT, t=torch.tensor([0.2, 0.6]), add_noise=False)
    RemoteLatentReward(url, noise="fresh")(LATENTS, *PROMPT, t=0.25)
    RemoteLatentReward(url)(LATENTS, *PROMPT)
    one, x_t, fresh, plain = (load(b) for b in script.bodies)
    assert one["t"].dtype == torch.float64 and float(one["t"]) == 0.4 and "add_noise" not in one
    # on x_t the seed is not sent: the latents are scored as they are
    assert torch.equal(x_t["t"], torch.tensor([0.2, 0.6])) and not bool(x_t["add_noise"]) and "seed" not in x_t
    assert float(fresh["t"]) == 0.25 and bool(fresh["fresh_noise"])
    assert not {"t", "add_noise"} & set(plain)
    with pytest.raises(ValueError, match="request: t\\[0\\]: got nan"):
        RemoteLatentReward(url)(LATENTS, *PROMPT, t=torch.tensor([float("nan"), 0.1]))
    assert len(script.bodies) == 4, "a bad t is refused before anything is sent"


def test_levels_are_kept_per_prompt_row_and_t_across_batches(engine):
    """A sampler's client sends the same prompts at the same timesteps batch after batch: each (prompt row, t) is
    made once, later batches find it, and the rewards do not depend on where the level came from."""
    seen: dict[str, int] = {}
    scorer = BatchScorer(
        engine, ConditioningCache(engine, 16), lambda what, n: seen.update({what: seen.get(what, 0) + n})
    )

    def run(*requests):
        items = [Item(check_request(x), 0.0) for x in requests]
        scorer.run(items)
        return [item.result["rewards"] for item in items]

    two = request(engine, 30, batch=2)
    two["prompt_embeds"], two["pooled"] = two["prompt_embeds"].repeat(2, 1, 1), torch.randn(2, two["pooled"].shape[1])
    at_x_t = {**two, "t": torch.tensor([0.3, 0.6]), "add_noise": torch.tensor(False)}
    first = run(at_x_t)[0]
    assert (seen["cache_level_miss"], seen.get("cache_level_hit", 0)) == (2, 0)  # row 0 at 0.3, row 1 at 0.6
    other = request(engine, 31, batch=1, t=torch.tensor([0.6]), add_noise=torch.tensor(False))
    again, _ = run(at_x_t, other)
    assert (seen["cache_level_miss"], seen["cache_level_hit"]) == (2 + 1, 2)  # only the new prompt's row is made
    assert torch.equal(again, first)
    torch.testing.assert_close(first, in_process(engine, at_x_t), rtol=0, atol=1e-5)
    run(request(engine, 32, batch=2, seed=torch.tensor(1)))  # the checkpoint's t: the rows' own level
    assert seen["cache_level_miss"] + seen["cache_level_hit"] == 5


@pytest.fixture(scope="module")
def url():
    from serve_helpers import start_server, stop_server

    from engine.serve.config import ServeConfig

    config = ServeConfig(preset="tiny", dtype="fp32", device="cpu", max_batch=8, batch_wait_ms=50, replicas=1)
    yield start_server(config, name="serve-noise-levels")
    stop_server()


def test_a_live_server_scores_at_t_like_engine_score(url, engine):
    """Through HTTP, Ray Serve's batching and the clients: a sampler's x_t at per-latent levels, a float t with a
    seed, and a t the checkpoint refuses (400 with the engine's message)."""
    from engine.rl import dit_latent_reward_fn

    x = request(engine, 40, batch=4)
    rows = x["prompt_embeds"].expand(4, -1, -1), x["pooled"].expand(4, -1)
    levels = torch.tensor([0.9, 0.5, 0.5, 0.1])
    remote = RemoteLatentReward(url)(x["latents"], *rows, group_index=[0] * 4, t=levels, add_noise=False)
    local = dit_latent_reward_fn(engine)(x["latents"], *rows, group_index=[0] * 4, t=levels, add_noise=False)
    torch.testing.assert_close(remote, local, rtol=0, atol=1e-5)
    seeded = ScoreClient(url).score(x["latents"], x["prompt_embeds"], x["pooled"], seed=3, t=0.4)["rewards"]
    torch.testing.assert_close(seeded, in_process(engine, {**x, "seed": torch.tensor(3), "t": 0.4}), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="reward server answered 400: t must lie in \\(0, 1\\)") as refused:
        ScoreClient(url).score(x["latents"], x["prompt_embeds"], x["pooled"], t=0.0)
    with pytest.raises(ValueError) as local_error:
        engine.score(x["latents"], (x["prompt_embeds"], x["pooled"]), t=0.0)
    assert refused.value.message == str(local_error.value)
