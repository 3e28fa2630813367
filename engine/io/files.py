"""Opening what users hand us: every JSON file and every path read from a file goes through here.

- `open_regular` opens regular files only. A FIFO, device, socket or directory is refused without blocking (the open
  is non-blocking and the file type is checked on the descriptor), so no file can hang a loader.
- `read_json` adds a size limit, a nesting-depth limit, a length limit on integers, strict JSON (no NaN/Infinity)
  and UTF-8, each failure naming the file and the position.
- `inside` resolves a name read from a file and refuses it unless it lies inside the folder it belongs to (symlinks
  followed). A Hugging Face cache snapshot's files are symlinks into its repository's `blobs/` folder, which counts
  as inside the snapshot.

Every refusal is a `FileInputError` (a ValueError) whose message starts with the file or path: a 5000-character
path component, a symlink loop, a permission error or JSON nested 100,000 deep is an error a user can act on, not an
OSError or a RecursionError from deep inside a loader.
"""

from __future__ import annotations

import codecs
import errno
import fcntl
import json
import math
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

# Limits for JSON documents. Preference files are the largest the project reads (HPDv3's train.json is ~0.5 GB);
# configs and indexes are far below. Real documents nest a few levels deep and hold integers of at most ~20 digits.
MAX_JSON_BYTES = 2 * 2**30
MAX_JSON_DEPTH = 64
MAX_INT_DIGITS = 40


class FileInputError(ValueError):
    """A file or path cannot be read as expected; the message starts with the path and says what was expected."""


_OS_REASONS = {
    errno.ENOENT: "does not exist",
    errno.ENAMETOOLONG: "has a name longer than the file system allows (255 bytes per component)",
    errno.ELOOP: "is a symbolic link loop (or a chain of more than 40 links)",
    errno.EACCES: "is not readable (permission denied)",
    errno.EPERM: "is not readable (operation not permitted)",
    errno.ENOTDIR: "has a parent that is not a directory",
    errno.EISDIR: "is a directory",
}


def _explain(path: str | os.PathLike, error: OSError, what: str) -> FileInputError:
    reason = _OS_REASONS.get(error.errno, f"cannot be read ({error.strerror or error})")
    return FileInputError(f"{os.fspath(path)!s:.300}: {what} {reason}")


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def file_status(path: str | os.PathLike, what: str = "file") -> os.stat_result | None:
    """`os.stat(path)` (symlinks followed), None when nothing is there; any other failure (a name too long, a
    symlink loop, no permission) is a `FileInputError` naming `path`. Never blocks."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _explain(path, e, what) from None
    except ValueError as e:  # an embedded NUL byte
        raise FileInputError(f"{os.fspath(path)!r:.300}: {what} is not a valid path ({e})") from None


def is_regular_file(path: str | os.PathLike, what: str = "file") -> bool:
    """Whether a regular file is at `path`: False when nothing is there; a FIFO, device or directory where a file
    is expected, and unreadable paths, are `FileInputError`s rather than a silent False."""
    status = file_status(path, what)
    if status is None:
        return False
    if not stat.S_ISREG(status.st_mode):
        raise FileInputError(f"{os.fspath(path)}: {what} is {_kind(status.st_mode)}, expected a regular file")
    return True


def open_regular(path: str | os.PathLike, what: str = "file") -> BinaryIO:
    """Open a regular file for binary reading. The open itself is non-blocking (a FIFO without a writer would block a
    plain open forever) and the type is checked on the open descriptor (no window for a swap between check and
    open); reads then block as usual."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise _explain(path, e, what) from None
    except ValueError as e:
        raise FileInputError(f"{os.fspath(path)!r:.300}: {what} is not a valid path ({e})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise FileInputError(f"{os.fspath(path)}: {what} is {_kind(mode)}, expected a regular file")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: str | os.PathLike, what: str = "file", max_bytes: int = MAX_JSON_BYTES) -> bytes:
    """The whole of a regular file, refused beyond `max_bytes` (also when it grows while being read)."""
    with open_regular(path, what) as fh:
        size = os.fstat(fh.fileno()).st_size
        data = fh.read(max_bytes + 1) if size <= max_bytes else b""
        if size > max_bytes or len(data) > max_bytes:
            raise FileInputError(f"{os.fspath(path)}: {what} holds {max(size, len(data))} bytes, expected at most "
                                 f"{max_bytes}")  # fmt: skip
    return data


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} overflows to infinity")
    return value


def _depth(value: Any, limit: int) -> int | None:
    """The nesting depth of a parsed document if it exceeds `limit`, else None (iterative: no recursion limit)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return depth
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return None


def parse_json(text: str | bytes, source: str, max_depth: int = MAX_JSON_DEPTH, finite: bool = True) -> Any:
    """Strict JSON from text or UTF-8 bytes (`source` names it in errors): no NaN/Infinity, integers of at most
    `MAX_INT_DIGITS` digits, floats that stay finite, nesting at most `max_depth` deep. With `finite=False`, NaN,
    Infinity and overflowing numbers parse as float values, for a schema to refuse by record and field (a file of many
    records, whose parse error could not say which one)."""
    if isinstance(text, bytes):
        if text.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
            raise FileInputError(f"{source}: UTF-16/UTF-32 text (byte-order mark), expected UTF-8 JSON")
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = text[: e.start].count(b"\n") + 1
            raise FileInputError(
                f"{source}: byte {text[e.start]:#04x} at offset {e.start} (line {line}) is not UTF-8, expected UTF-8 "
                "JSON (re-encode it, e.g. from Latin-1 with iconv -f latin1 -t utf-8)"
            ) from None
    try:
        value = json.loads(
            text,
            parse_constant=_refuse_constant if finite else float,
            parse_int=_bounded_int,
            parse_float=_finite_float if finite else float,
        )
    except json.JSONDecodeError as e:
        raise FileInputError(f"{source}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise FileInputError(f"{source}: JSON nested too deep to parse, expected at most {max_depth} levels") from None
    except ValueError as e:  # from the hooks above
        raise FileInputError(f"{source}: {e}, expected plain finite JSON numbers") from None
    depth = _depth(value, max_depth) if isinstance(value, (dict, list)) else None
    if depth is not None:
        raise FileInputError(f"{source}: JSON nested {depth}+ levels deep, expected at most {max_depth}")
    return value


def read_json(
    path: str | os.PathLike,
    what: str = "JSON file",
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
    finite: bool = True,
) -> Any:
    """A JSON document from a regular file, within the size and depth limits (see `parse_json`)."""
    return parse_json(read_bytes(path, what, max_bytes), os.fspath(path), max_depth, finite)


# ------------------------------------------------------------------------------------------------ containment


def _hub_blobs(root: Path) -> Path | None:
    """The `blobs/` folder of a Hugging Face cache repository when `root` lies in one of its snapshots
    (`models--org--name/snapshots/<revision>/...`, whose files are symlinks to `../../blobs/<hash>`)."""
    for folder in (root, *root.parents):
        repo = folder.parent.parent
        if folder.parent.name == "snapshots" and repo.name.startswith(("models--", "datasets--")):
            return repo / "blobs" if (repo / "blobs").is_dir() else None
    return None


def inside(root: str | os.PathLike, name: object, field: str) -> Path:
    """`root / name` for a file that a file under `root` names, refused unless it resolves (symlinks followed) inside
    `root` (or, for a Hugging Face cache snapshot, inside its repository's `blobs/`): a checkpoint or an index must
    not reach `../other/x.safetensors` or `/etc/passwd`. `field` says where the name came from, e.g.
    "reward_config.json: backbone_weights"."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise FileInputError(f"{field}: got {name!r:.100}, expected a file name inside {root}")
    try:
        top = Path(root).resolve()
        path = (top / name).resolve()
    except OSError as e:
        raise _explain(Path(root) / name, e, f"{field} names a path that") from None
    except RuntimeError as e:  # Python < 3.13 reports symlink loops so
        raise FileInputError(f"{field}: {name!r:.100} cannot be resolved ({e})") from None
    allowed = [top] + [b.resolve() for b in [_hub_blobs(top)] if b is not None]
    if path == top or not any(path.is_relative_to(a) for a in allowed):
        raise FileInputError(
            f"{field}: {name!r:.100} resolves to {path}, outside {top}, expected a file inside that folder"
        )
    return path


__all__ = [
    "FileInputError",
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "file_status",
    "inside",
    "is_regular_file",
    "open_regular",
    "parse_json",
    "read_bytes",
    "read_json",
]
