"""Deterministic cost gates (no GPU): FLOPs, parameter bytes and dispatched ops of the SD3.5-Large forward, counted
on meta tensors, against bench/thresholds.json. A deliberately wasteful variant must trip the gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import costs
from engine.model.block import JointBlock

THRESHOLDS = json.loads((Path(__file__).parents[1] / "bench" / "thresholds.json").read_text())


def check(preset: str, resolution: int, measured: dict, diffusers: float | None = None) -> list[str]:
    """Names of the gates `measured` fails (empty: all pass)."""
    t, tol = THRESHOLDS[preset], THRESHOLDS["rel_tolerance"]
    failures = []
    if measured["flops_per_image"] > t[str(resolution)]["flops_per_image"] * (1 + tol):
        failures.append("flops")
    if measured["param_bytes_bf16"] > t["param_bytes_bf16"] * (1 + tol):
        failures.append("params")
    if measured["dispatched_ops"] > t["dispatched_ops_max"]:
        failures.append("ops")
    if diffusers is not None and measured["flops_per_image"] / diffusers > t[str(resolution)]["ratio_to_diffusers_max"]:
        failures.append("ratio")
    return failures


@pytest.mark.parametrize("resolution", [512, 1024])
def test_engine_costs_within_gates(resolution, capsys):
    measured = costs.engine_costs("sd35-large", resolution, 333)
    full = costs.diffusers_flops("sd35-large", resolution, 333)
    with capsys.disabled():
        print(
            f"\nsd35-large {resolution}²: engine {measured['flops_per_image'] / 1e12:.3f} TFLOP/img, diffusers "
            f"{full / 1e12:.3f}, ratio {measured['flops_per_image'] / full:.4f}; params "
            f"{measured['param_bytes_bf16'] / 2**30:.2f} GiB bf16; {measured['dispatched_ops']} aten ops"
        )
    assert check("sd35-large", resolution, measured, full) == []
    assert 7.9e12 * (resolution / 512) ** 2 < measured["flops_per_image"] * 1.1  # near DESIGN.md's 8.0 TFLOP floor


def test_gate_catches_extra_work(monkeypatch):
    """Injected regression: every block's work done twice (as if an extra block were computed and thrown away)."""
    original = JointBlock.forward

    def wasteful(self, *args):
        original(self, *args)
        return original(self, *args)

    monkeypatch.setattr(JointBlock, "forward", wasteful)
    measured = costs.engine_costs("sd35-large", 512, 333)
    assert {"flops", "ops"} <= set(check("sd35-large", 512, measured))


def test_gate_catches_pooling_on_a_copy(monkeypatch):
    """Injected regression: hidden states copied (e.g. stacked) before pooling: more dispatched ops."""
    from engine.runtime.ops import Ops

    real = Ops.mean_pool_into

    def copying(self, h, out, slot):
        real(self, h.clone().contiguous(), out, slot)
        torch.stack([h, h]).sum()

    monkeypatch.setattr(Ops, "mean_pool_into", copying)
    measured = costs.engine_costs("sd35-large", 512, 333)
    assert "ops" in check("sd35-large", 512, measured)
