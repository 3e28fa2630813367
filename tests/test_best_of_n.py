"""examples/best_of_n.py run small on the tiny base: the transformer steps pruning saves, and the pruned run's pick
scored as the plain run scores the same candidate."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def load_example():
    path = Path(__file__).resolve().parents[1] / "examples" / "best_of_n.py"
    spec = importlib.util.spec_from_file_location("best_of_n", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_best_of_n_saves_the_pruned_steps_and_keeps_the_candidates_rewards(capsys):
    out = load_example().main(["--candidates", "6", "--steps", "8", "--prune-at", "2", "5", "--keep", "0.5"])
    plain, pruned = out["plain"], out["pruned"]
    # 6 candidates for steps 0-2, ceil(0.5 * 6) = 3 for steps 3-5, ceil(0.5 * 3) = 2 for steps 6-7
    assert plain["candidate_steps"] == 6 * 8 and pruned["candidate_steps"] == 6 * 3 + 3 * 3 + 2 * 2
    assert out["saved"] == 48 - 31 and len(pruned["final_rewards"]) == 2 and len(plain["final_rewards"]) == 6
    # every survivor followed the trajectory it has in the plain run (same seed; only the batch around it shrank,
    # which moves fp32 GEMM summation order): its final reward is the plain run's for that candidate
    for candidate, reward in pruned["final_rewards"].items():
        assert reward == pytest.approx(plain["final_rewards"][candidate], rel=1e-5, abs=1e-7)
    assert pruned["reward"] == pytest.approx(plain["final_rewards"][pruned["pick"]], rel=1e-5, abs=1e-7)
    assert plain["reward"] == max(plain["final_rewards"].values()) >= pruned["reward"]
    assert len(set(plain["final_rewards"].values())) == 6  # the candidates differ (the comparisons can fail)
    # one Conditioning for both runs: each step's level is made once (the last step's clean latent is scored at the
    # checkpoint's own t), and found again by the second run
    assert (plain["cache_misses"], plain["cache_hits"]) == (7, 1)
    assert (pruned["cache_misses"], pruned["cache_hits"]) == (0, 8)
    printed = capsys.readouterr().out
    assert "17 of 48 transformer candidate-steps saved" in printed and "8/8 hits (100%)" in printed


def test_a_pruning_step_past_the_run_is_refused():
    with pytest.raises(SystemExit):
        load_example().main(["--steps", "8", "--prune-at", "7"])
