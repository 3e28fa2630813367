"""File-system helpers of the training tools: the run lock, and safetensors files opened only when they are regular
files inside their folder (a FIFO named like a shard or a checkpoint would block `safe_open` forever)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.io.atomic import reporting_disk_full
from engine.io.files import FileInputError, is_regular_file


@contextlib.contextmanager
def exclusive_lock(directory: Path, what: str = "a training run") -> Iterator[None]:
    """Hold ``directory/.lock`` (flock, exclusive) for the duration: a second holder gets a ValueError naming the
    process that has it. The kernel drops the lock when its process dies, so a lock file left by a killed run never
    blocks."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ".lock"
    is_regular_file(path, "the run lock")  # a FIFO there is refused by name instead of opened
    fh = open(path, "a+")  # noqa: SIM115 (held open for the whole run)
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise ValueError(
                f"{directory} is in use by {what} (process {holder} holds {path}): wait for it to finish or use "
                "another directory"
            ) from e
        with reporting_disk_full(path, 32):
            fh.seek(0)
            fh.truncate()
            fh.write(str(os.getpid()))
            fh.flush()
        yield
    finally:
        fh.close()  # closing the descriptor releases the flock


def open_safetensors(path: Path, what: str) -> Any:
    """`safetensors.safe_open` of a regular file; anything else at `path` (missing, a FIFO, a directory, a truncated or
    foreign file) is a `FileInputError` naming `what` and the path."""
    from safetensors import safe_open

    if not is_regular_file(path, what):
        raise FileInputError(f"{path}: {what} does not exist")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # SafetensorError (truncated, foreign header), OSError
        raise FileInputError(f"{path}: {what} cannot be read as safetensors ({type(e).__name__}: {e})") from None


__all__ = ["exclusive_lock", "open_safetensors"]
