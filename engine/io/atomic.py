"""Writing files so that a reader sees the old file or the whole new one, and a full disk is reported as such.

A full disk surfaces from many writers in many forms: `OSError` ENOSPC/EDQUOT from Python's own writes, a
`SafetensorError` whose text carries "os error 28" from safetensors' Rust writer. `reporting_disk_full` turns each into
one `DiskFullError` naming the file, the bytes it needed and the bytes free; `atomic_write` adds the temp-file-and-
rename that keeps the old file whole."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path


class DiskFullError(OSError):
    """A write failed for lack of space; the message gives the bytes the file needed and the bytes free."""


def is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # safetensors' Rust writer raises SafetensorError, which carries the OS error only in its text.
    return type(error).__name__ == "SafetensorError" and ("os error 28" in str(error) or "os error 122" in str(error))


def _free_bytes(path: Path) -> int | str:
    for folder in (path.parent, *path.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(folder).free
    return "unknown"


@contextlib.contextmanager
def reporting_disk_full(path: str | os.PathLike, nbytes: int) -> Iterator[None]:
    """Run a write of about `nbytes` to `path`; a full disk inside is re-raised as `DiskFullError` naming `path`, the
    bytes needed and the bytes free (the original error chained), any other error as it is."""
    try:
        yield
    except BaseException as e:
        if not is_disk_full(e):
            raise
        path = Path(path)
        raise DiskFullError(
            errno.ENOSPC,
            f"disk full writing {path}: it needs about {nbytes} bytes and {_free_bytes(path)} bytes are free on the "
            f"file system of {path.parent}; free space there or write to another disk",
        ) from e


def atomic_write(path: Path, write: Callable[[Path], None], nbytes: int) -> None:
    """`write(tmp)` to a sibling temp file, fsync, then ``os.replace`` onto `path`: readers see the old file or the
    whole new one. `nbytes` is about what the file takes; a full disk raises `DiskFullError` (the temp file is
    removed)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with reporting_disk_full(path, nbytes):
        try:
            write(tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def atomic_write_text(path: Path, text: str) -> None:
    data = text.encode("utf-8")
    atomic_write(path, lambda tmp: tmp.write_bytes(data), len(data))


__all__ = ["DiskFullError", "atomic_write", "atomic_write_text", "is_disk_full", "reporting_disk_full"]
