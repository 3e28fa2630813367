"""What the prompt and image encoders share: progress bars, and reading a diffusers directory's json files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from engine.io.files import is_regular_file, read_json
from engine.schema import SchemaError

# Progress bars appear by default from this many items on: below it a bar is noise in tests and RL logs.
PROGRESS_MIN_ITEMS = 64


def progress_bar(total: int, desc: str, unit: str, progress: bool | None) -> tqdm:
    """A tqdm bar; ``progress=None`` shows it only from `PROGRESS_MIN_ITEMS` items on."""
    enabled = total >= PROGRESS_MIN_ITEMS if progress is None else progress
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False)


def read_model_json(path: Path) -> dict[str, Any]:
    """A json file of a local diffusers directory (safe reader), refused with a ValueError naming the layout when
    absent or not an object."""
    if not is_regular_file(path, "model config"):
        raise ValueError(f"{path} not found: expected a local SD3/SD3.5 diffusers directory (model_index.json, ...)")
    document = read_json(path, "model config", max_bytes=16 * 2**20)
    if not isinstance(document, dict):
        raise SchemaError(f"{path}: got {type(document).__name__}, expected a JSON object")
    return document
