"""Where backbone weights come from: lazy, memory-mapped views over safetensors files (`TensorSource`, never
pickle) and the diffusers directory layout (a sharded `transformer/`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from pydantic import ConfigDict, Field
from safetensors import SafetensorError, safe_open

from engine.config import BackboneConfig
from engine.io.files import inside, is_regular_file, read_json
from engine.schema import Schema, SchemaError, validate

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
            if not is_regular_file(path, "weights file"):  # (safe_open would block on a FIFO)
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


class ShardIndex(Schema):
    """A diffusers `*.safetensors.index.json`: which shard file holds each tensor."""

    model_config = ConfigDict(extra="allow")  # ("metadata" and tools' own keys)
    weight_map: dict[str, str] = Field(min_length=1)


def _safetensors_in(directory: Path, stem: str) -> list[Path]:
    """The shard files of `stem` in `directory` (each named by the index and kept inside `directory`), or its one
    unsharded file."""
    index = directory / f"{stem}.safetensors.index.json"
    if is_regular_file(index, "shard index"):
        weight_map = validate(ShardIndex, read_json(index, "shard index", max_bytes=64 * 2**20), str(index)).weight_map
        return sorted({inside(directory, name, f"{index}: weight_map[{key!r}]") for key, name in weight_map.items()})
    single = directory / f"{stem}.safetensors"
    if is_regular_file(single, "weights file"):
        return [single]
    raise FileNotFoundError(f"no {stem}.safetensors or {stem}.safetensors.index.json in {directory}")


# ------------------------------------------------------------------------------------------------ diffusers layout


def transformer_dir(base: str | os.PathLike) -> Path:
    """The `transformer/` folder of an SD3/SD3.5 diffusers directory (or that folder itself)."""
    base = Path(base)
    for candidate in (base / "transformer", base):
        if is_regular_file(candidate / "config.json", "transformer config"):
            return candidate
    raise FileNotFoundError(
        f"{base} is not an SD3/SD3.5 diffusers directory: expected {base / 'transformer' / 'config.json'}"
    )


def diffusers_dir_source(base: str | os.PathLike) -> tuple[BackboneConfig, TensorSource]:
    directory = transformer_dir(base)
    path = directory / "config.json"
    raw = read_json(path, "transformer config", max_bytes=16 * 2**20)
    if not isinstance(raw, dict):
        raise SchemaError(f"{path}: got {type(raw).__name__}, expected a JSON object (a diffusers model config)")
    if raw.get("_class_name", "SD3Transformer2DModel") != "SD3Transformer2DModel":
        raise SchemaError(f"{path}: _class_name: got {raw['_class_name']!r:.80}, expected 'SD3Transformer2DModel'")
    return BackboneConfig.from_diffusers(raw, str(path)), TensorSource(
        _safetensors_in(directory, "diffusion_pytorch_model")
    )


def describe_source(source: Mapping) -> str:
    return source.describe() if hasattr(source, "describe") else "the in-memory state dict"
