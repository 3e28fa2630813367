"""Latency regression gate (pytest-benchmark, CPU, `tiny` preset): the engine's latent path against the diffusers
forward-hook reference, timed in the same test on the same inputs, gated on their RATIO.

Absolute CPU milliseconds say nothing across CI machines; the ratio to a reference that runs the same backbone
through diffusers cancels the machine's speed and most of its load. A deliberately slowed engine must trip the gate.

The timings are also written, with the pytest-benchmark statistics, to `.benchmarks/tiny-latent-gate.json`
(git-ignored) so that a CI log or artifact keeps them; `python -m pytest -q` needs no extra flags.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_diffusers_transformer

from bench.baselines import DiffusersHookReward
from engine import RewardEngine

# Engine time / diffusers time must stay below this. Measured here (2-core CPU, torch 2.13, torch.set_num_threads(1),
# batch 2, 256² = 256 image tokens, 77 text tokens, median of 40 paired rounds): 0.91-0.93 on a quiet machine; 0.84-1.11
# with a CPU-bound process competing for the cores at a load average of 4-5. The block-twice regression below measured
# 1.64-1.73 under the same conditions. 1.3 sits between the two, ~17% above the worst healthy ratio; it catches a ~40%
# engine slowdown on a quiet runner. With two torch threads under load the healthy ratio swung up to 1.8, which is
# why the measurement pins one thread.
MAX_RATIO = 1.3
ROUNDS, WARMUP_ROUNDS = 40, 5  # ~0.8 s per test on a quiet 2-core machine, ~4 s under heavy contention
BATCH, LATENT_SIDE, TEXT_TOKENS = 2, 32, 77  # 256² image; large enough that the blocks' math, not Python, dominates
JSON_PATH = Path(__file__).parents[1] / ".benchmarks" / "tiny-latent-gate.json"


@dataclass(frozen=True)
class GateResult:
    """Outcome of `ratio_gate`: `ratio` is the median over rounds of candidate time / reference time."""

    ratio: float
    max_ratio: float
    candidate_median_ms: float
    reference_median_ms: float

    @property
    def passed(self) -> bool:
        return self.ratio <= self.max_ratio

    def __str__(self) -> str:
        verdict = "within" if self.passed else "EXCEEDS"
        return (
            f"engine {self.candidate_median_ms:.2f} ms vs diffusers {self.reference_median_ms:.2f} ms: ratio "
            f"{self.ratio:.3f} {verdict} the gate {self.max_ratio}"
        )


def ratio_gate(candidate_s: list[float], reference_s: list[float], max_ratio: float) -> GateResult:
    """Gate on paired timings (seconds; `candidate_s[i]` and `reference_s[i]` ran back to back).

    The median of per-round ratios, not the ratio of medians: both calls of a round see the same machine load, so a
    burst of contention moves a few rounds' ratios rather than one side's median.
    """
    if len(candidate_s) != len(reference_s) or not candidate_s:
        raise ValueError(f"need equally many paired timings, got {len(candidate_s)} and {len(reference_s)}")
    ratios = [c / r for c, r in zip(candidate_s, reference_s, strict=True)]
    return GateResult(
        ratio=statistics.median(ratios),
        max_ratio=max_ratio,
        candidate_median_ms=1e3 * statistics.median(candidate_s),
        reference_median_ms=1e3 * statistics.median(reference_s),
    )


def paired_benchmark(benchmark: Any, candidate: Callable[[], Any], reference: Callable[[], Any]) -> GateResult:
    """Time `candidate` with the pytest-benchmark fixture and `reference` right before it in every round.

    `benchmark.pedantic` calls `setup` (untimed by it) before each round, warm-up included: the reference runs and
    is timed there, so the two alternate and each pair shares the machine's state.
    """
    reference_s: list[float] = []

    def time_reference() -> None:
        start = time.perf_counter()
        reference()
        reference_s.append(time.perf_counter() - start)

    benchmark.pedantic(candidate, setup=time_reference, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    if benchmark.stats is None:  # --benchmark-disable: one untimed call, nothing to gate
        pytest.skip("pytest-benchmark is disabled")
    candidate_s = list(benchmark.stats.stats.data)
    result = ratio_gate(candidate_s, reference_s[WARMUP_ROUNDS:], MAX_RATIO)
    benchmark.extra_info.update(asdict(result))
    return result


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for the timed tests: on a shared 2-core runner, two torch threads fighting another process
    for the cores turn a few rounds into 10x outliers (see MAX_RATIO)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def scorers(one_thread: None) -> tuple[RewardEngine, DiffusersHookReward, tuple[torch.Tensor, ...]]:
    """The engine (tiny preset, fp32, torch kernels), the diffusers reference of the same config, and one input."""
    engine = RewardEngine.from_preset("tiny", dtype="fp32", kernels_backend="torch")
    engine.check_finite = False  # the RL-loop setting, as in bench.latency: no host-side NaN scan per call
    reference = DiffusersHookReward(make_diffusers_transformer(), engine.reward_config.layers, t=0.1)
    cfg = engine.config
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(BATCH, cfg.in_channels, LATENT_SIDE, LATENT_SIDE, generator=gen)
    prompt_embeds = torch.randn(BATCH, TEXT_TOKENS, cfg.joint_attention_dim, generator=gen)
    pooled = torch.randn(BATCH, cfg.pooled_projection_dim, generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    yield engine, reference, (latents, prompt_embeds, pooled, noise)
    reference.remove()


def _write_json(result: GateResult, benchmark: Any) -> None:
    payload = {
        "gate": {**asdict(result), "passed": result.passed},
        "engine_stats_s": benchmark.stats.stats.as_dict(),
        "setup": dict(preset="tiny", dtype="fp32", batch=BATCH, latent_side=LATENT_SIDE, text_tokens=TEXT_TOKENS),
        "env": dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine()),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    JSON_PATH.parent.mkdir(parents=True, exist_ok=True)
    JSON_PATH.write_text(json.dumps(payload, indent=1))


def test_engine_not_slower_than_diffusers(benchmark, scorers) -> None:
    engine, reference, (latents, prompt_embeds, pooled, noise) = scorers
    result = paired_benchmark(
        benchmark,
        lambda: engine.score(latents, (prompt_embeds, pooled), noise=noise),
        lambda: reference.score(latents, prompt_embeds, pooled, noise=noise),
    )
    _write_json(result, benchmark)
    print(f"\n{result}")
    assert result.passed, str(result)


def test_gate_fails_on_slowed_engine(benchmark, scorers, monkeypatch) -> None:
    """A regression that computes every backbone block twice (e.g. a lost fast path recomputing activations) must
    fail the gate: ~1.8x the engine's time, a ratio of 1.64-1.73 against 1.3."""
    engine, reference, (latents, prompt_embeds, pooled, noise) = scorers
    for block in engine.backbone.transformer_blocks:
        once = block.forward
        monkeypatch.setattr(block, "forward", lambda *args, once=once: (once(*args), once(*args))[1])
    result = paired_benchmark(
        benchmark,
        lambda: engine.score(latents, (prompt_embeds, pooled), noise=noise),
        lambda: reference.score(latents, prompt_embeds, pooled, noise=noise),
    )
    print(f"\nslowed: {result}")
    assert not result.passed, f"the gate missed a block-twice regression: {result}"


def test_ratio_gate_is_a_median_of_paired_ratios() -> None:
    # One round with a 10x stall on the candidate side does not move the median; a uniform 2x slowdown does.
    reference = [1.0] * 9
    assert ratio_gate([0.9] * 8 + [9.0], reference, 1.3).passed
    slowed = ratio_gate([2.0] * 9, reference, 1.3)
    assert not slowed.passed and slowed.ratio == pytest.approx(2.0)
    with pytest.raises(ValueError, match="paired"):
        ratio_gate([1.0], [1.0, 1.0], 1.3)
