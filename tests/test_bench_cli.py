"""The bench command lines refuse bad flags through their schemas, naming the flag, before any work starts."""

from __future__ import annotations

import pytest

from bench import accuracy, report, targets, tiny_base

REQUIRED = ["--test-json", "a.json", "--checkpoint", "ckpt", "--base", "base"]


def refusal(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "flag", "expected"),
    [
        (["--seed", "-1"], "--seed", ">= 0"),
        (["--seed", str(-(2**63))], "--seed", ">= 0"),
        (["--seed", str(2**63)], "--seed", "< 9223372036854775808"),
        (["--seed", "1.5"], "--seed", "integer"),
        (["--batch-size", "0"], "--batch-size", ">= 1"),
        (["--dtype", "fp16"], "--dtype", "'fp32' or 'bf16'"),
        (["--area", "nan"], "--area", "integer"),
        (["--json", ""], "--json", "at least 1 character"),
    ],
)
def test_accuracy_refuses_bad_flags_by_name(capsys, argv, flag, expected):
    err = refusal(capsys, accuracy.main, REQUIRED + argv)
    assert f"{flag}: got" in err and expected in err


def test_accuracy_needs_its_files(capsys):
    err = refusal(capsys, accuracy.main, ["--checkpoint", "c", "--base", "b"])
    assert "--test-json" in err and "required" in err


def test_accuracy_parses_a_good_command_line():
    args = accuracy.parse_cli(
        accuracy.AccuracyArgs, REQUIRED + ["--seed", "7", "--json", "out.json", "--allow-outside-root"], "acc"
    )
    assert (args.seed, args.json_out, args.allow_outside_root, args.batch_size) == (7, "out.json", True, 32)


def test_tiny_base_refuses_a_negative_seed(capsys, tmp_path):
    err = refusal(capsys, tiny_base.main, [str(tmp_path / "base"), "--seed", "-1"])
    assert "--seed: got -1" in err
    assert not (tmp_path / "base").exists()


def test_report_refuses_an_empty_results_folder(tmp_path):
    with pytest.raises(SystemExit, match="--results: no"):
        report.main(["--results", str(tmp_path), "--no-plot"])


def test_report_reads_results_through_the_safe_reader(tmp_path):
    (tmp_path / "deep.json").write_text("[" * 100 + "]" * 100)
    with pytest.raises(ValueError, match="deep.json.*nested"):
        report.main(["--results", str(tmp_path), "--no-plot"])


def test_targets_names_a_results_path_that_is_not_a_file(tmp_path):
    with pytest.raises(SystemExit, match="RESULTS: .*expected a regular file"):
        targets.main([str(tmp_path)])


def test_a_no_flag_switches_its_field_on():
    assert report.parse_cli(report.ReportArgs, ["--no-plot"], "report").no_plot is True
    assert report.parse_cli(report.ReportArgs, [], "report").no_plot is False
    assert report.parse_cli(report.ReportArgs, ["--latest-only"], "report").latest_only is True


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], "--out: got None, expected an output folder (or --plan)"),
        (["--out", "o", "--only", "bogus"], "--only[0]: got 'bogus', expected one of 'ceilings'"),
        (
            ["--out", "o", "--only", "max_autotune_512"],
            "--only: got ['max_autotune_512'], expected max_autotune_512 only",
        ),
        (["--out", "o", "--deadline-s", "nan"], "--deadline-s: got 'nan', expected a number"),
        (["--out", "o", "--deadline-s", "-5"], "--deadline-s: got -5, expected a value > 0"),
    ],
)
def test_gpu_check_refuses_bad_flags_before_any_work(capsys, argv, expected):
    from bench import gpu_check

    assert expected in refusal(capsys, gpu_check.main, argv)
