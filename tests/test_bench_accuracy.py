"""`bench.accuracy` argument and input checks (its end-to-end run is in test_training.py)."""

from __future__ import annotations

import json

import pytest

from bench import accuracy


def test_empty_test_file_is_refused_by_name(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps([]))
    with pytest.raises(ValueError, match=r"empty.json holds no preference pairs"):
        accuracy.evaluate_file(None, None, empty, seed=0)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        accuracy.evaluate_file(None, None, empty, seed=0, batch_size=0)


def test_batch_size_zero_is_refused_at_parsing(capsys):
    with pytest.raises(SystemExit):
        accuracy.main(["--test-json", "t.json", "--checkpoint", "c", "--base", "b", "--batch-size", "0"])
    assert "--batch-size: got 0, expected a value >= 1" in capsys.readouterr().err
