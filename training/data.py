"""Preference pairs in HPSv3's JSON format, mixed from several files with weights, filtered with a report.

A file is a JSON list of records::

    {"prompt": str, "path1": str (the preferred image), "path2": str, "confidence": float | null,
     "choice_dist": [..] | null, "model1": str, "model2": str}

Files are UTF-8 JSON. Image paths follow one rule (`resolve_image_path`, which the cache, the trainer, the probe and
bench.accuracy all go through): relative paths resolve against the image root (``image_root``, default the JSON
file's folder), symlinks are resolved, and a path that lands outside the image root is an error naming the file and
record unless ``allow_outside_root`` is set. A record is dropped when its confidence is below the threshold (HPSv3
trains on confidence >= 0.95; a null confidence passes, as in HPSv3's human-labelled subsets) or, with
``on_bad_image="skip"``, when an image is missing or does not decode (truncated files, corrupt compressed streams,
decompression bombs, float images outside [0, 1]); with ``on_bad_image="error"`` such a record raises a ValueError
naming the file, the record index and the path. A malformed record (wrong types, confidence outside [0, 1], the same
image twice, text that is not valid Unicode, a NUL in a path) is a ValueError/TypeError whatever the policy.
`FilterReport` says what was dropped and why.
"""

from __future__ import annotations

import argparse
import codecs
import hashlib
import json
import math
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

HPSV3_CONFIDENCE = 0.95
BAD_IMAGE_POLICIES = ("error", "skip")


@dataclass(frozen=True)
class PreferencePair:
    """One human judgement: `winner` (HPSv3's path1) was preferred over `loser` (path2) for `prompt`."""

    prompt: str
    winner: Path  # absolute
    loser: Path  # absolute
    source: str  # the JSON file it came from
    index: int  # record position in that file
    confidence: float | None = None
    model1: str | None = None
    model2: str | None = None
    choice_dist: tuple[float, float] | None = None  # annotators' votes (or shares) for path1 and path2


@dataclass
class FilterReport:
    """What `load_pairs` kept and dropped, per source file and reason (``low_confidence``, ``missing_image``,
    ``unreadable_image``), with up to `max_examples` example messages per reason."""

    kept: Counter = field(default_factory=Counter)  # source -> pairs kept (before weighting)
    dropped: Counter = field(default_factory=Counter)  # (source, reason) -> count
    weighted: Counter = field(default_factory=Counter)  # source -> pairs after weighting
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 3

    def drop(self, source: str, reason: str, message: str) -> None:
        self.dropped[(source, reason)] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.max_examples:
            shown.append(message)

    def total_dropped(self, reason: str | None = None) -> int:
        return sum(n for (_, r), n in self.dropped.items() if reason is None or r == reason)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kept": dict(self.kept),
            "weighted": dict(self.weighted),
            "dropped": [{"source": s, "reason": r, "count": n} for (s, r), n in sorted(self.dropped.items())],
            "examples": self.examples,
        }

    def __str__(self) -> str:
        lines = []
        for source in self.kept.keys() | {s for s, _ in self.dropped}:
            drops = ", ".join(f"{r} {n}" for (s, r), n in sorted(self.dropped.items()) if s == source) or "none"
            lines.append(
                f"{source}: kept {self.kept[source]} -> {self.weighted[source]} after weighting; dropped: {drops}"
            )
        for reason, shown in self.examples.items():
            lines += [f"  e.g. {reason}: {m}" for m in shown]
        return "\n".join(lines)


def resolve_image_path(
    raw: str, image_root: Path, allow_outside_root: bool = False, where: str = "", field_name: str = "path"
) -> Path:
    """The absolute, symlink-free path of a record's image path `raw`: relative paths resolve against `image_root`
    (absolute already). ValueError naming `where` (file and record) for a NUL or an empty path, and for a path that
    resolves outside `image_root` unless `allow_outside_root`."""
    prefix = f"{where}: " if where else ""
    if not raw:
        raise ValueError(f"{prefix}{field_name} is empty; expected an image path")
    if "\0" in raw:
        raise ValueError(f"{prefix}{field_name} {raw!r} contains a NUL character; no file system path can hold one")
    root = image_root.resolve()
    resolved = (root / raw).resolve()
    if not allow_outside_root and not resolved.is_relative_to(root):
        raise ValueError(
            f"{prefix}{field_name} {raw!r} resolves to {resolved}, outside the image root {root}: move the image under "
            "the root, point image_root (--image-root) at a folder holding both, or pass allow_outside_root=True "
            "(--allow-outside-root) to read paths anywhere"
        )
    return resolved


# image_check(path) -> None for a good image, else (reason, detail): "missing_image" or "unreadable_image"
ImageCheck = Callable[[Path], "tuple[str, str] | None"]


def image_problem(path: Path) -> tuple[str, str] | None:
    """None if `path` decodes as the pixel front end decodes it, else (reason, detail): ``missing_image`` or
    ``unreadable_image`` (truncated or corrupt data, a decompression bomb, a float/16-bit image out of range)."""
    from engine.pixel import load_images

    if not path.is_file():
        return "missing_image", "no such file"
    try:
        with Image.open(path) as image:  # the header only; PIL raises DecompressionBombError beyond 2x its limit
            width, height = image.size
        if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
            return "unreadable_image", (
                f"{width}x{height} pixels exceeds PIL's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS}"
            )
        load_images([path], size_multiple=1)  # the full decode and range checks the cache and the benchmark run
    except Exception as e:  # decoders raise OSError, SyntaxError, zlib.error, ValueError, DecompressionBombError, ...
        return "unreadable_image", f"{type(e).__name__}: {e}"
    return None


def _missing_image_hint(raw: str, image_root: Path) -> str:
    """For a missing image: whether the same relative path exists relative to the working directory (HPSv3's rule)."""
    candidate = Path.cwd() / raw
    if Path(raw).is_absolute() or not candidate.is_file():
        return ""
    return (
        f"; {raw!r} is not under the image root {image_root.resolve()}, but {candidate.resolve()} exists relative to "
        f"the working directory: pass image_root={str(Path.cwd())!r} (--image-root {Path.cwd()}) to resolve paths there"
    )


def _records(path: Path) -> list[Any]:
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise ValueError(f"preference file {path} does not exist") from e
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        raise ValueError(f"preference file {path} is UTF-16/UTF-32 encoded (byte-order mark); re-save it as UTF-8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(
            f"preference file {path} is not UTF-8: byte {data[e.start]:#04x} at offset {e.start} (line {line}); "
            "HPSv3 files are UTF-8 JSON (re-encode it, e.g. from Latin-1 with iconv -f latin1 -t utf-8)"
        ) from e
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"preference file {path} is not valid JSON: {e}") from e
    if not isinstance(records, list):
        raise ValueError(f"preference file {path} must hold a JSON list of records, got {type(records).__name__}")
    return records


def _check_text(value: str, where: str, key: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's \udcff escapes decode to lone surrogates, which no encoder accepts
        raise ValueError(
            f"{where}: {key} holds an unpaired surrogate {value[e.start]!r} at character {e.start}; it is not valid "
            "Unicode text: fix the record"
        ) from e


def _check_record(record: Any, where: str) -> float | None:
    """Types and ranges of one record's fields; returns its confidence."""
    if not isinstance(record, dict):
        raise TypeError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    missing = [k for k in ("prompt", "path1", "path2") if k not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; HPSv3 records need prompt, path1, path2")
    for key in ("prompt", "path1", "path2", "model1", "model2"):
        value = record.get(key)
        if key in ("model1", "model2") and value is None:
            continue
        if not isinstance(value, str):
            raise TypeError(f"{where}: {key} must be a string, got {value!r}")
        _check_text(value, where, key)
    confidence = record.get("confidence")
    if confidence is None:
        return None
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)):
        raise TypeError(f"{where}: confidence must be a number or null, got {confidence!r}")
    if not math.isfinite(confidence):  # Python's json reads NaN, which passes any filter
        raise ValueError(f"{where}: confidence must be finite or null, got {confidence!r}")
    if not 0.0 <= confidence <= 1.0:
        raise ValueError(f"{where}: confidence must lie in [0, 1] (a probability) or be null, got {confidence!r}")
    return float(confidence)


def _choice_dist(record: dict, where: str) -> tuple[float, float] | None:
    """A record's ``choice_dist``: null, or two finite numbers >= 0 with a positive sum (votes for path1, path2)."""
    value = record.get("choice_dist")
    if value is None:
        return None
    numbers = isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not numbers or len(value) != 2 or not all(math.isfinite(v) and v >= 0 for v in value) or sum(value) <= 0:
        raise ValueError(
            f"{where}: choice_dist must be null or two numbers >= 0 with a positive sum (votes for path1, path2), "
            f"got {value!r}"
        )
    return float(value[0]), float(value[1])


def read_file(
    path: str | os.PathLike,
    confidence_threshold: float | None = HPSV3_CONFIDENCE,
    on_bad_image: str = "error",
    report: FilterReport | None = None,
    image_check: ImageCheck | None = None,
    image_root: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
) -> list[PreferencePair]:
    """The kept pairs of one HPSv3-format file, in file order (see the module docstring for the rules). `image_root`
    defaults to the file's folder. `image_check(path)` says whether an image is bad, as `image_problem` (the default,
    a full decode) does; the trainer and the probe pass `LatentCache.image_problem`, which reads what the cache found
    instead of decoding again."""
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
    if confidence_threshold is not None and not 0.0 <= confidence_threshold <= 1.0:
        raise ValueError(
            f"confidence_threshold must lie in [0, 1] (HPSv3: {HPSV3_CONFIDENCE}) or be None, "
            f"got {confidence_threshold}"
        )
    path = Path(path).resolve()
    root = path.parent if image_root is None else Path(image_root)
    if not root.is_dir():
        raise ValueError(f"image_root {root} is not a directory (the folder that relative image paths resolve against)")
    report = report if report is not None else FilterReport()
    image_check = image_problem if image_check is None else image_check
    source, pairs = str(path), []
    for i, record in enumerate(_records(path)):
        where = f"{path} record {i}"
        confidence = _check_record(record, where)
        choice_dist = _choice_dist(record, where)
        images = [resolve_image_path(record[k], root, allow_outside_root, where, k) for k in ("path1", "path2")]
        if images[0] == images[1]:
            raise ValueError(f"{where}: path1 and path2 are the same image {images[0]}; a pair compares two images")
        if confidence_threshold is not None and confidence is not None and confidence < confidence_threshold:
            report.drop(source, "low_confidence", f"{where}: confidence {confidence} < {confidence_threshold}")
            continue
        checked = zip(("path1", "path2"), images, strict=True)
        bad = [(k, p, found) for k, p in checked if (found := image_check(p)) is not None]
        if bad:
            key, image, (reason, detail) = bad[0]
            if reason == "missing_image":
                detail += _missing_image_hint(record[key], root)
            if on_bad_image == "error":
                raise ValueError(
                    f"{where}: {reason.replace('_', ' ')} {key} {image} ({detail}) "
                    "(pass on_bad_image='skip' to skip such records)"
                )
            report.drop(source, reason, f"{where}: {key} {image} ({detail})")
            continue
        pairs.append(
            PreferencePair(
                prompt=record["prompt"],
                winner=images[0],
                loser=images[1],
                source=source,
                index=i,
                confidence=confidence,
                model1=record.get("model1"),
                model2=record.get("model2"),
                choice_dist=choice_dist,
            )
        )
    report.kept[source] += len(pairs)
    return pairs


def parse_sources(sources: Iterable[str | os.PathLike | tuple[str | os.PathLike, float]]) -> list[tuple[Path, float]]:
    """`["a.json", ("b.json", 2.0), "c.json:0.5"]` -> [(path, weight), ...]; weight 1 when not given. Whatever follows
    the last colon is the weight if it reads as a number (``:1e-1``, ``:-1`` too, which then fails the check)."""
    out = []
    for item in sources:
        if isinstance(item, (tuple, list)):
            path, weight = item
        else:
            text = str(item)
            head, sep, tail = text.rpartition(":")
            try:
                path, weight = (head, float(tail)) if sep else (text, 1.0)
            except ValueError:
                path, weight = text, 1.0
        weight = float(weight)
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"mixing weight of {path} must be a positive number, got {weight}")
        out.append((Path(path), weight))
    if not out:
        raise ValueError("no preference files given: pass at least one HPSv3-format JSON file")
    return out


def load_pairs(
    sources: Sequence[str | os.PathLike | tuple[str | os.PathLike, float]],
    confidence_threshold: float | None = HPSV3_CONFIDENCE,
    on_bad_image: str = "error",
    seed: int = 0,
    image_check: ImageCheck | None = None,
    image_root: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
) -> tuple[list[PreferencePair], FilterReport]:
    """Read and mix several files. A file of weight w with `kept` pairs contributes int(w) whole copies of them plus
    round(frac(w) * kept) of them drawn at random, seeded by `seed` and the file (so weight 0.5 halves a file, 2
    doubles it, 1.5 on 5 pairs gives 5 + round(2.5) = 7). The order is file by file; the trainer shuffles.
    `image_check`, `image_root` and `allow_outside_root` as in `read_file`, for every file."""
    report, mixed = FilterReport(), []
    for path, weight in parse_sources(sources):
        pairs = read_file(path, confidence_threshold, on_bad_image, report, image_check, image_root, allow_outside_root)
        whole, frac = divmod(weight, 1.0)
        extra = random.Random(f"{seed}:{path.resolve()}").sample(pairs, round(frac * len(pairs)))
        extra.sort(key=lambda p: p.index)
        chosen = pairs * int(whole) + extra
        report.weighted[str(path.resolve())] += len(chosen)
        mixed += chosen
    if not mixed:
        raise ValueError(f"no preference pairs left after filtering:\n{report}")
    return mixed, report


def add_path_rule_arguments(parser: argparse.ArgumentParser) -> None:
    """``--image-root`` and ``--allow-outside-root``: the path rule's flags, as every command line offers them."""
    parser.add_argument(
        "--image-root",
        default=None,
        help="folder that relative image paths resolve against and that every image must lie in "
        "(default: each JSON file's folder)",
    )
    parser.add_argument(
        "--allow-outside-root", action="store_true", help="accept image paths that resolve outside the image root"
    )


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (what a training checkpoint records of each data file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


__all__ = [
    "BAD_IMAGE_POLICIES",
    "add_path_rule_arguments",
    "HPSV3_CONFIDENCE",
    "FilterReport",
    "ImageCheck",
    "PreferencePair",
    "load_pairs",
    "parse_sources",
    "file_digest",
    "image_problem",
    "read_file",
    "resolve_image_path",
]
