"""Where backbone weights come from: lazy, memory-mapped views over safetensors files (`TensorSource`, never
pickle) and the diffusers directory layout (a sharded `transformer/`)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from engine.config import BackboneConfig

# ------------------------------------------------------------------------------------------------ tensor sources


class TensorSource(Mapping):
    """Lazy key -> tensor view over one or more safetensors files (a diffusers shard index or a single file).

    `keymap` exposes the stored tensors under other names: exposed key -> (stored key, transform or None), e.g. a
    slice of a fused qkv. Without it the stored names are exposed as they are."""

    def __init__(self, files: Iterable[Path], keymap: Mapping[str, tuple[str, Callable | None]] | None = None):
        self._file_of: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        for path in files:
            for key in self._handle(path).keys():  # noqa: SIM118 (safe_open is not a dict)
                self._file_of[key] = path
        self._keymap = dict(keymap) if keymap is not None else {k: (k, None) for k in self._file_of}

    def _handle(self, path: Path):
        if path not in self._handles:
            if not path.is_file():
                raise FileNotFoundError(f"weights file {path} does not exist")
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError, ValueError) as e:
                raise ValueError(f"cannot read safetensors file {path}: {e} (corrupt or not a safetensors file)") from e
        return self._handles[path]

    def stored(self, key: str) -> torch.Tensor:
        """A tensor by its stored name."""
        path = self._file_of[key]
        try:
            return self._handle(path).get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"cannot read tensor {key!r} from {path}: {e}") from e

    def stored_keys(self) -> set[str]:
        return set(self._file_of)

    def __getitem__(self, key: str) -> torch.Tensor:
        stored, transform = self._keymap[key]
        tensor = self.stored(stored)
        return tensor if transform is None else transform(tensor)

    def __iter__(self):
        return iter(self._keymap)

    def __len__(self) -> int:
        return len(self._keymap)

    def __contains__(self, key: object) -> bool:
        return key in self._keymap

    def describe(self) -> str:
        files = sorted({str(p) for p in self._file_of.values()})
        if not files:
            return "an empty weights source"
        return files[0] if len(files) == 1 else f"{len(files)} files in {Path(files[0]).parent}"


def _safetensors_in(directory: Path, stem: str) -> list[Path]:
    index = directory / f"{stem}.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"corrupt shard index {index}: {e}") from e
        return sorted({directory / name for name in weight_map.values()})
    single = directory / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no {stem}.safetensors or {stem}.safetensors.index.json in {directory}")


# ------------------------------------------------------------------------------------------------ diffusers layout


def transformer_dir(base: str | os.PathLike) -> Path:
    """The `transformer/` folder of an SD3/SD3.5 diffusers directory (or that folder itself)."""
    base = Path(base)
    for candidate in (base / "transformer", base):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"{base} is not an SD3/SD3.5 diffusers directory: expected {base / 'transformer' / 'config.json'}"
    )


def diffusers_dir_source(base: str | os.PathLike) -> tuple[BackboneConfig, TensorSource]:
    directory = transformer_dir(base)
    try:
        raw = json.loads((directory / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt transformer config {directory / 'config.json'}: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"transformer config {directory / 'config.json'} must hold a JSON object")
    if raw.get("_class_name", "SD3Transformer2DModel") != "SD3Transformer2DModel":
        raise ValueError(f"{directory} holds a {raw['_class_name']}, expected an SD3Transformer2DModel")
    try:
        config = BackboneConfig.from_diffusers(raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"transformer config {directory / 'config.json'}: {e}") from e
    return config, TensorSource(_safetensors_in(directory, "diffusion_pytorch_model"))
