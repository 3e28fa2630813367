"""Packaging: every console script names an importable `main(argv)` whose --help works, and the extras exist."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import tomllib

PYPROJECT = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]


def test_one_script_per_main_cli():
    assert {"dit-reward-bench", "dit-reward-train", "dit-reward-serve", "dit-reward-cache"} <= set(SCRIPTS)
    assert all(name.startswith("dit-reward-") for name in SCRIPTS)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_scripts_resolve_and_print_help(name, capsys):
    module, _, attr = SCRIPTS[name].partition(":")
    main = getattr(importlib.import_module(module), attr)
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_extras():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert any(req.startswith("flash-attn") for req in extras["flash-attn"])
    assert any(req.startswith("huggingface_hub") for req in PYPROJECT["project"]["dependencies"])
