"""The server's settings and request checks without a running server: one schema for the flags (the command line
and Ray's app builder), the request envelope, the engine's rules before batching, and a batch that falls back to
scoring its requests one by one when its forward fails."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("ray.serve", reason="needs the serve extra: pip install -e '.[serve]'")

from serve_helpers import POISON, FaultyEngine  # noqa: E402

from engine import RewardEngine  # noqa: E402
from engine.schema import SchemaError  # noqa: E402
from engine.serve.__main__ import parse_args  # noqa: E402
from engine.serve.request import RequestError, check_request, check_scorable  # noqa: E402
from engine.serve.scorer import BatchScorer, ConditioningCache, Item  # noqa: E402

# Flags the issue found accepted (or silently rewritten), each with the refusal that names it.
REFUSED_FLAGS = [
    (["--token", ""], "--token: got '', expected a non-empty bearer token"),
    (["--token", "   "], "--token: got '   ', expected a non-empty bearer token"),
    (["--max-request-mb", "nan"], "--max-request-mb: got 'nan', expected a number"),
    (["--max-request-mb", "-1"], "--max-request-mb: got -1, expected a value > 0"),
    (["--max-ongoing", "-4"], "--max-ongoing: got -4, expected a value >= 1"),
    (["--max-ongoing", "0"], "--max-ongoing: got 0, expected a value >= 1"),
    (["--max-ongoing", "4"], "--max-ongoing: got 4, expected at least --max-batch 16"),
    (["--batch-wait-ms", "-5"], "--batch-wait-ms: got -5, expected a value >= 0"),
    (["--port", "70000"], "--port: got 70000, expected a value <= 65535"),
    (["--replicas", "0"], "--replicas: got 0, expected a value >= 1"),
    (["--autoscale", "4:1"], "--autoscale: got '4:1', expected MIN:MAX replicas"),
    (["--autoscale", "2:4", "--replicas", "2"], "--replicas: got 2, expected either --replicas or --autoscale"),
    (["--max-prompt-tokens", "0"], "--max-prompt-tokens: got 0, expected a value >= 1"),
    (["--upload-timeout-s", "inf"], "--upload-timeout-s: got 'inf', expected a number"),
    (["--max-uploads", "8", "--max-uploads-per-client", "9"], "--max-uploads-per-client: got 9, expected at most"),
    (["--dtype", "int8"], "--dtype: got 'int8', expected one of"),
]


@pytest.mark.parametrize(("argv", "message"), REFUSED_FLAGS, ids=[" ".join(a) for a, _ in REFUSED_FLAGS])
def test_bad_flags_are_refused_at_start_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--preset", "tiny", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_flags_parse_into_the_config_and_the_model_source_is_exactly_one(capsys):
    flags = parse_args(["--preset", "tiny", "--autoscale", "1:3", "--token", "s3cret", "--port", "8001"])
    assert flags.replica_range == (1, 3) and flags.token == "s3cret" and flags.port == 8001
    assert flags.ongoing_per_replica == 32 and flags.max_prompt_tokens == 77 + 512
    for argv in ([], ["--preset", "tiny", "--checkpoint", "c"], ["--preset", "tiny", "--base", "b"]):
        with pytest.raises(SystemExit):
            parse_args(argv)
    assert "expected exactly one of --checkpoint or --preset" in capsys.readouterr().err


def test_app_builder_takes_text_from_serve_run_and_typed_values_from_yaml():
    from ray.serve import Application

    from engine.serve.app import app_builder
    from engine.serve.config import config_from_args

    text = config_from_args({"preset": "tiny", "max_batch": "4", "autoscale": "1:2", "device": "cpu"})
    typed = config_from_args({"preset": "tiny", "max_batch": 4, "autoscale": "1:2", "device": "cpu"})
    assert text == typed and text.max_batch == 4 and text.replica_range == (1, 2)
    assert isinstance(app_builder({"preset": "tiny", "device": "cpu"}), Application)
    with pytest.raises(SchemaError, match="autoscale: got 64, expected MIN:MAX as text \\(in YAML quote it"):
        config_from_args({"preset": "tiny", "autoscale": 64})  # YAML reads an unquoted 1:4 as 64
    with pytest.raises(SchemaError, match="app_builder: max_batch: got 'many', expected an integer"):
        app_builder({"preset": "tiny", "max_batch": "many"})
    with pytest.raises(SchemaError, match="app_builder: replica: an unknown field"):
        app_builder({"preset": "tiny", "replica": 2})


# --------------------------------------------------------------------------------------- the request checks


@pytest.fixture(scope="module")
def engine() -> RewardEngine:
    return RewardEngine.from_preset("tiny", dtype="fp32")


def good(engine: RewardEngine, seed: int = 0, batch: int = 2) -> dict[str, torch.Tensor]:
    gen, cfg = torch.Generator().manual_seed(seed), engine.config
    return {
        "latents": torch.randn(batch, cfg.in_channels, 8, 8, generator=gen),
        "prompt_embeds": torch.randn(1, 12, cfg.joint_attention_dim, generator=gen),
        "pooled": torch.randn(1, cfg.pooled_projection_dim, generator=gen),
        "seed": torch.tensor(seed),
    }


def in_process_error(engine: RewardEngine, x: dict) -> str:
    with pytest.raises((ValueError, TypeError)) as info:
        engine.score(x["latents"], (x["prompt_embeds"], x["pooled"]), seed=int(x["seed"]))
    return str(info.value)


def test_requests_the_engine_refuses_are_refused_before_batching_with_its_message(engine):
    x = good(engine)
    f8 = torch.float8_e4m3fn
    for bad in (
        {**x, "prompt_embeds": x["prompt_embeds"][:0], "pooled": x["pooled"][:0]},  # 0 prompt rows
        {**x, "latents": x["latents"][:, :, :7]},  # not a multiple of the patch size
        {**x, "pooled": x["pooled"].repeat(2, 1)},  # rows disagree
        {**x, "latents": x["latents"].clone().fill_(float("inf"))},
    ):
        request = check_request(bad)
        with pytest.raises((ValueError, TypeError)) as info:
            check_scorable(request, engine, max_prompt_tokens=589)
        assert str(info.value) == in_process_error(engine, bad)
    for name in ("latents", "prompt_embeds", "pooled"):  # float8: refused by the envelope and in-process alike
        with pytest.raises(RequestError, match=f"{name}: got float8_e4m3fn tensor"):
            check_request({**x, name: x[name].to(f8)})
        y = {**x, name: x[name].to(f8)}
        with pytest.raises(TypeError, match=f"{name} must be a floating-point tensor \\(float32"):
            engine.score(y["latents"], (y["prompt_embeds"], y["pooled"]), seed=0)
    for seed in (-1, -(2**63)):  # what engine.score(seed=) refuses: outside [0, 2**63)
        with pytest.raises(RequestError, match=f"seed: got {seed}, expected a scalar \\(0-d tensor\\) of int64 in"):
            check_request({**x, "seed": torch.tensor(seed)})
        with pytest.raises(ValueError, match="seed must be an int in \\[0, 2\\*\\*63\\)"):
            engine.score(x["latents"], (x["prompt_embeds"], x["pooled"]), seed=seed)
    check_request({**x, "seed": torch.tensor(2**63 - 1)})  # the largest seed the engine takes
    long = {**x, "prompt_embeds": torch.randn(1, 590, engine.config.joint_attention_dim)}
    with pytest.raises(ValueError, match="prompt_embeds has 590 tokens, more than this server's --max-prompt-tokens"):
        check_scorable(check_request(long), engine, max_prompt_tokens=589)


def test_a_failed_batch_is_scored_request_by_request_each_with_its_own_answer():
    """An exception the checks cannot foresee (here injected into engine.score) fails the batch's forward; every
    request is then scored alone: the good ones get their in-process rewards, the faulty one a 500, and a request
    whose preparation fails gets its own answer without touching the others."""
    engine = FaultyEngine.from_preset("tiny", dtype="fp32")
    requests = [good(engine, seed=s, batch=1 + s % 3) for s in range(5)]
    requests[2]["latents"][0, 0, 0, 0] = POISON
    items = [Item(check_request(x), 0.0) for x in requests]
    seen: list[str] = []
    scorer = BatchScorer(engine, ConditioningCache(engine, 8), lambda what, n: seen.append(what))
    broken = Item(check_request(good(engine, seed=9)), 0.0)
    broken.request.pooled = torch.randn(1, 3)  # passes assignment checks (a tensor of rank 2), fails conditioning
    scorer.run([*items, broken])
    for x, item in zip(requests, items, strict=True):
        if x is requests[2]:
            assert item.result["status"] == 500 and "injected fault" in item.result["error"]
            continue
        expected = engine.score(x["latents"], (x["prompt_embeds"], x["pooled"]), seed=int(x["seed"]))
        torch.testing.assert_close(item.result["rewards"], expected, rtol=0, atol=1e-5)
    dim = engine.config.pooled_projection_dim
    assert broken.result["status"] == 400 and f"pooled must be [B, {dim}]" in broken.result["error"]
    assert seen.count("batch_images") == 4  # the four good requests, each alone after the batch failed
