"""One engine per (checkpoint, base, device, dtype, backends, options) in a process.

Flow-GRPO's trainer builds its reward functions twice (``multi_score`` for training and again for evaluation), and
every reward function that loads a checkpoint would otherwise hold its own MMDiT, VAE and three text encoders on the
GPU. `shared_engine` hands every caller asking for the same engine the same object. The registry holds engines
weakly: an engine lives as long as some reward function (or other caller) holds it, and is rebuilt after that.

The key is everything that defines the engine: the checkpoint's and base's resolved absolute paths and the identity
of their files' contents (size, mtime, inode: a checkpoint rewritten in place, which `save_pretrained` does
atomically, is a new engine), the device (a bare "cuda" is the current CUDA device), the dtype, the resolved
kernel and attention backends, and every other constructor option.
"""

from __future__ import annotations

import inspect
import os
import threading
import weakref
from pathlib import Path
from typing import Any

import torch

from engine.api import RewardEngine
from engine.checks import resolve_device, resolve_dtype
from engine.runtime.backends import Backends

# RewardEngine's options with their defaults (`fp8` comes from dtype="fp8"): an option passed at its default and
# one left out define the same engine.
ENGINE_OPTIONS = {
    name: p.default
    for name, p in inspect.signature(RewardEngine.__init__).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "fp8"
}

_engines: weakref.WeakValueDictionary[tuple, RewardEngine] = weakref.WeakValueDictionary()
_lock = threading.Lock()  # guards the two tables
_building: dict[tuple, threading.Lock] = {}  # one build at a time per key; other keys build concurrently


def _file_identity(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (path.name, st.st_size, st.st_mtime_ns, st.st_ino)


def _content_identity(path: Path) -> tuple:
    """What changes when the files at `path` are rewritten: a file's stat, or a directory's top-level files' (and
    its ``transformer/`` folder's, for a diffusers base). A path that does not exist has none (loading reports it)."""
    if path.is_file():
        return (_file_identity(path),)
    if not path.is_dir():
        return ()
    folders = [path] + ([path / "transformer"] if (path / "transformer").is_dir() else [])
    return tuple(
        _file_identity(f) for folder in folders for f in sorted(folder.iterdir(), key=lambda p: p.name) if f.is_file()
    )


def engine_key(
    checkpoint: str | os.PathLike,
    base: str | os.PathLike | None,
    device: torch.device | str | None,
    dtype: torch.dtype | str | None,
    engine_kwargs: dict[str, Any],
) -> tuple:
    """The registry key of ``RewardEngine.from_pretrained(checkpoint, base, dtype, device, **engine_kwargs)``."""
    device = resolve_device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    fp8 = dtype == "fp8"
    weights = resolve_dtype(dtype, torch.bfloat16)
    options = {**ENGINE_OPTIONS, **engine_kwargs}
    backends = Backends.resolve(options.pop("kernels_backend", None), options.pop("attention", None), device,
                                weights, fp8=fp8)  # fmt: skip
    paths = []
    for path in (checkpoint, base):
        resolved = None if path is None else Path(path).resolve()
        paths.append((resolved, None if resolved is None else _content_identity(resolved)))
    return (*paths, device, "fp8" if fp8 else weights, backends, tuple(sorted(options.items(), key=lambda kv: kv[0])))


def shared_engine(
    checkpoint: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = torch.bfloat16,
    **engine_kwargs: Any,
) -> RewardEngine:
    """``RewardEngine.from_pretrained(checkpoint, base=base, dtype=dtype, device=device, **engine_kwargs)``, built
    once per process for as long as someone holds it: callers asking for the same engine (see `engine_key`) get the
    same object. Thread-safe; concurrent callers of one key wait for its single build. A shared engine is shared
    state: `set_backends` or a weight edit through one holder is seen by all."""
    key = engine_key(checkpoint, base, device, dtype, engine_kwargs)
    with _lock:
        engine = _engines.get(key)
        if engine is not None:
            return engine
        build = _building.setdefault(key, threading.Lock())
    with build:
        with _lock:
            engine = _engines.get(key)
        if engine is None:
            try:
                engine = RewardEngine.from_pretrained(
                    checkpoint, base=base, dtype=dtype, device=key[2], **engine_kwargs
                )
                with _lock:
                    _engines[key] = engine
            finally:
                with _lock:
                    if _building.get(key) is build:
                        del _building[key]
    return engine


def shared_engines() -> list[RewardEngine]:
    """The engines alive in the registry now (for tests and diagnostics)."""
    with _lock:
        return list(_engines.values())
