"""What the prompt and image encoders share: progress bars, and reading a diffusers directory's json files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

# Progress bars appear by default from this many items on: below it a bar is noise in tests and RL logs.
PROGRESS_MIN_ITEMS = 64


def progress_bar(total: int, desc: str, unit: str, progress: bool | None) -> tqdm:
    """A tqdm bar; ``progress=None`` shows it only from `PROGRESS_MIN_ITEMS` items on."""
    enabled = total >= PROGRESS_MIN_ITEMS if progress is None else progress
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False)


def read_model_json(path: Path) -> dict[str, Any]:
    """A json file of a local diffusers directory, refused with a ValueError naming the layout when absent."""
    if not path.is_file():
        raise ValueError(f"{path} not found: expected a local SD3/SD3.5 diffusers directory (model_index.json, ...)")
    return json.loads(path.read_text())
