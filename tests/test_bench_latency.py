"""`python -m bench.latency` completes on the CPU (tiny preset) for every interface and writes its JSON rows."""

from __future__ import annotations

import json

import pytest

from bench import latency

KEYS = {
    "interface",
    "path",
    "preset",
    "resolution",
    "batch",
    "dtype",
    "per_image_ms",
    "peak_gib",
    "device",
    "torch",
    "commit",
    "date",
}


@pytest.mark.parametrize("interface", ["latent", "pixel", "hpsv3"])
def test_latency_cli_runs_on_cpu(interface, tmp_path):
    out = tmp_path / "rows.json"
    rows = latency.main(
        ["--interface", interface, "--batch", "2", "--iters", "1", "--resolution", "128", "--json", str(out)]
    )
    assert rows and all(set(r) >= KEYS and r["per_image_ms"] > 0 for r in rows)
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))


def test_dtype_names_map_to_engine_arguments():
    assert latency.dtype_kwargs("bf16") == {"dtype": "bf16"}
    assert latency.dtype_kwargs("fp8+adaln") == {"dtype": "fp8", "fp8_adaln": True}
    assert latency.dtype_kwargs("fp8+host-adaln") == {"dtype": "fp8", "adaln_on_host": True}
    assert latency.dtype_kwargs("fp8+host-adaln+fast-accum") == {
        "dtype": "fp8",
        "adaln_on_host": True,
        "fp8_fast_accum": True,
    }
    for bad in ("fp8+cpu", "fp16", "fp8+adaln+adaln"):
        with pytest.raises(ValueError, match="benchmark dtype must be"):
            latency.dtype_kwargs(bad)
    with pytest.raises(ValueError, match="apply to fp8 only"):
        latency.dtype_kwargs("bf16+fast-accum")
    with pytest.raises(SystemExit):  # argparse refuses it before any model is built
        latency.parse_args(["--dtype", "bf16+adaln"])


def test_latent_rows_include_the_cached_path_and_device_weights(tmp_path):
    """The GRPO pattern is timed on its own (condition() once, then scoring against it), and host-resident adaLN
    weights are not counted as device weights (on the CPU: everything is host memory, so both count the same)."""
    argv = ["--batch", "2", "--iters", "1", "--resolution", "128", "--dtype", "fp32", "fp32+host-adaln"]
    rows = latency.main(argv)
    paths = {(r["dtype"], r["path"]) for r in rows}
    for dtype in ("fp32", "fp32+host-adaln"):
        assert {
            (dtype, "engine eager"),
            (dtype, "condition() per prompt"),
            (dtype, "engine eager, cond cached"),
        } <= paths
    cond = next(r for r in rows if r["path"] == "condition() per prompt")
    assert "flops_per_image" not in cond  # the forward's FLOPs are not the prompt-only work's
    weights = {r["dtype"]: r["weights_gib"] for r in rows if r["path"] == "engine eager"}
    assert weights["fp32"] == weights["fp32+host-adaln"] > 0
    # achieved TFLOP/s and the FLOP floor: counted FLOPs at the measured matmul ceiling, as a share of the time
    forward = next(r for r in rows if r["path"] == "engine eager")
    expected_tflop_s = forward["flops_per_image"] / (forward["per_image_ms"] * 1e-3) / 1e12
    assert forward["tflop_s"] == pytest.approx(expected_tflop_s, abs=0.051)
    assert forward["floor_pct"] > 0 and "floor_pct" not in cond


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--resolution", "100"], "multiple of 16"),
        (["--resolution", "0"], "--resolution[0]: got 0, expected a value >= 16"),
        (["--batch", "0"], "--batch[0]: got 0, expected a value >= 1"),
        (["--iters", "0"], "--iters: got 0, expected a value >= 1"),
        (["--iters", "nan"], "--iters: got 'nan', expected an integer"),
        (["--interface", "pixel", "--text-len", "50"], "--text-len: got 50, expected more than 77"),
        (["--dtype", "fp16"], "--dtype[0]: got 'fp16', expected <bf16|fp8|fp32>"),
        (["--preset", "sdxl"], "--preset: got 'sdxl', expected one of"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit):
        latency.parse_args(argv)
    assert message in capsys.readouterr().err


def test_checkpoint_rows_count_the_checkpoints_layers(tmp_path):
    """FLOPs (hence TFLOP/s and % floor) and labels follow the loaded checkpoint, not the preset's defaults."""
    import torch

    from bench.costs import engine_costs
    from engine import RewardEngine

    RewardEngine.from_preset("tiny", layers=(0,), dtype=torch.float32).save_pretrained(
        tmp_path / "ckpt", include_backbone=True
    )
    argv = ["--checkpoint", str(tmp_path / "ckpt"), "--batch", "1", "--iters", "1", "--resolution", "128"]
    rows = [r for r in latency.main(argv) if r["path"] == "engine eager"]
    assert rows and rows[0]["layers"] == [0] and rows[0]["preset"] == "tiny"
    assert rows[0]["flops_per_image"] == engine_costs("tiny", 128, 333, layers=(0,))["flops_per_image"]
    assert rows[0]["flops_per_image"] < engine_costs("tiny", 128, 333)["flops_per_image"] / 2


def test_pixel_rows_say_which_dtype_ran():
    rows = latency.main(
        ["--interface", "pixel", "--batch", "1", "--iters", "1", "--resolution", "64", "--dtype", "fp32"]
    )
    assert {r["dtype"] for r in rows if r["path"] != "engine on encoded"} == {"fp32"}  # the CPU front end's dtype
    assert [r["dtype"] for r in rows if r["path"] == "engine on encoded"] == ["fp32"]


def test_baselines_run_in_the_same_process_and_unavailable_ones_say_why(tmp_path, capsys):
    argv = ["--no-engine", "--baselines", "eager", "torchao-fp8", "--batch", "2", "--iters", "1"]
    rows = latency.main([*argv, "--resolution", "128", "--json", str(tmp_path / "rows.json")])
    eager = [r for r in rows if r["path"] == "diffusers eager+hooks"]
    assert len(eager) == 1 and eager[0]["per_image_ms"] > 0 and eager[0]["first_call_s"] >= 0
    (torchao,) = [r for r in rows if r["path"] == "torchao fp8"]  # one per compile mode: "default" on the CPU
    assert torchao["skipped"].startswith("skipped: needs CUDA sm≥8.9") and "per_image_ms" not in torchao
    assert torchao["dtype"] == "fp8" and torchao["compile_mode"] == "default"
    assert not any(r["path"].startswith("engine") for r in rows)  # --no-engine
    assert "skipped: needs CUDA sm≥8.9" in capsys.readouterr().out  # the printed table names the reason


def test_no_engine_needs_baselines(capsys):
    with pytest.raises(SystemExit):
        latency.parse_args(["--no-engine"])
    assert "--no-engine: got True, expected --baselines beside it" in capsys.readouterr().err
    assert latency.parse_args(["--baselines"]).baselines == list(latency.BASELINES)  # bare flag: every baseline


def test_rows_reach_the_sink_as_they_come_and_a_failing_path_costs_only_its_rows():
    seen = []
    argv = ["--batch", "2", "--iters", "1", "--resolution", "128", "--dtype", "fp32", "--baselines", "eager"]
    rows = latency.main([*argv, "--fail-path", "engine eager"], sink=seen.append)
    assert seen == rows  # every row, in order, handed over when it was made
    (failed,) = [r for r in rows if r["path"] == "engine eager"]
    assert failed["error"] == "error: RuntimeError: injected failure of 'engine eager' (--fail-path)"
    assert failed["batch"] == 2 and "per_image_ms" not in failed
    timed = {r["path"] for r in rows if r.get("per_image_ms", 0) > 0}
    assert {"condition() per prompt", "engine eager, cond cached", "diffusers eager+hooks"} <= timed


def test_an_engine_that_fails_to_build_costs_only_its_dtype():
    argv = ["--batch", "2", "--iters", "1", "--resolution", "128", "--dtype", "fp32", "bf16", "--baselines", "eager"]
    rows = latency.main([*argv, "--fail-path", "engine"])
    failed = [r for r in rows if r["path"] == "engine"]
    assert [r["dtype"] for r in failed] == ["fp32", "bf16"] and all(r["error"].startswith("error:") for r in failed)
    assert [r["path"] for r in rows if r.get("per_image_ms", 0) > 0] == ["diffusers eager+hooks"]


def test_a_spent_deadline_stops_every_row_with_a_reason():
    import time

    argv = ["--batch", "2", "--iters", "1", "--resolution", "128", "--dtype", "fp32", "--baselines", "eager"]
    rows = latency.main(argv, deadline=time.perf_counter())
    assert rows and all(r["skipped"].startswith("stopped: 0 s left") for r in rows)
    assert {r["path"] for r in rows} >= {"engine eager", "diffusers eager+hooks"}
