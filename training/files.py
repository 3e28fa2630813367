"""File-system helpers of the training tools: atomic writes that report a full disk as such, and the run lock."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path


class DiskFullError(OSError):
    """A write failed for lack of space; the message gives the bytes the file needed and the bytes free."""


def _is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # safetensors' Rust writer raises SafetensorError, which carries the OS error only in its text.
    return type(error).__name__ == "SafetensorError" and ("os error 28" in str(error) or "os error 122" in str(error))


def atomic_write(path: Path, write: Callable[[Path], None], nbytes: int) -> None:
    """`write(tmp)` to a sibling temp file, fsync, then ``os.replace`` onto `path`: readers see the old file or the
    whole new one. `nbytes` is about what the file takes; a full disk raises `DiskFullError` naming it and the free
    space (the temp file is removed), instead of the writer's own message."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if _is_disk_full(e):
            free = shutil.disk_usage(path.parent).free
            raise DiskFullError(
                errno.ENOSPC,
                f"disk full writing {path}: it needs about {nbytes} bytes and {free} bytes are free on the file system "
                f"of {path.parent}; free space there or write to another disk",
            ) from e
        raise


def atomic_write_text(path: Path, text: str) -> None:
    data = text.encode("utf-8")
    atomic_write(path, lambda tmp: tmp.write_bytes(data), len(data))


@contextlib.contextmanager
def exclusive_lock(directory: Path, what: str = "a training run") -> Iterator[None]:
    """Hold ``directory/.lock`` (flock, exclusive) for the duration: a second holder gets a ValueError naming the
    process that has it. The kernel drops the lock when its process dies, so a lock file left by a killed run never
    blocks."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ".lock"
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
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield
    finally:
        fh.close()  # closing the descriptor releases the flock


__all__ = ["DiskFullError", "atomic_write", "atomic_write_text", "exclusive_lock"]
