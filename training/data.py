"""Preference pairs in HPSv3's JSON format, mixed from several files with weights, filtered with a report.

A file is a JSON list of records::

    {"prompt": str, "path1": str (the preferred image), "path2": str, "confidence": float | null,
     "choice_dist": [..] | null, "model1": str, "model2": str}

Relative image paths resolve against the JSON file's folder. A record is dropped when its confidence is below the
threshold (HPSv3 trains on confidence >= 0.95; a null confidence passes, as in HPSv3's human-labelled subsets) or,
with ``on_bad_image="skip"``, when an image is missing or unreadable; with ``on_bad_image="error"`` such a record
raises a ValueError naming the file, the record index and the path. `FilterReport` says what was dropped and why.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

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


def _check_image(path: Path) -> str | None:
    """None if `path` is a decodable image, else the reason (``missing_image`` / ``unreadable_image``)."""
    if not path.is_file():
        return "missing_image"
    try:
        with Image.open(path) as image:
            image.verify()  # reads the whole file: truncated PNGs fail here, not mid-training
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return "unreadable_image"
    return None


def _records(path: Path) -> list[dict[str, Any]]:
    try:
        records = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ValueError(f"preference file {path} does not exist") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"preference file {path} is not valid JSON: {e}") from e
    if not isinstance(records, list):
        raise ValueError(f"preference file {path} must hold a JSON list of records, got {type(records).__name__}")
    return records


def read_file(
    path: str | os.PathLike,
    confidence_threshold: float | None = HPSV3_CONFIDENCE,
    on_bad_image: str = "error",
    report: FilterReport | None = None,
    check_images: bool = True,
) -> list[PreferencePair]:
    """The kept pairs of one HPSv3-format file, in file order (see the module docstring for the rules)."""
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
    if confidence_threshold is not None and not 0.0 <= confidence_threshold <= 1.0:
        raise ValueError(
            f"confidence_threshold must lie in [0, 1] (HPSv3: {HPSV3_CONFIDENCE}) or be None, "
            f"got {confidence_threshold}"
        )
    path = Path(path).resolve()
    report = report if report is not None else FilterReport()
    source, pairs = str(path), []
    for i, record in enumerate(_records(path)):
        where = f"{path} record {i}"
        missing = [k for k in ("prompt", "path1", "path2") if not isinstance(record, dict) or k not in record]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}; HPSv3 records need prompt, path1, path2")
        for key in ("prompt", "path1", "path2"):
            if not isinstance(record[key], str):
                raise TypeError(f"{where}: {key} must be a string, got {record[key]!r}")
        confidence = record.get("confidence")
        if confidence is not None and (isinstance(confidence, bool) or not isinstance(confidence, (int, float))):
            raise TypeError(f"{where}: confidence must be a number or null, got {confidence!r}")
        if confidence is not None and not math.isfinite(confidence):  # Python's json reads NaN, which passes any filter
            raise ValueError(f"{where}: confidence must be finite or null, got {confidence!r}")
        if confidence_threshold is not None and confidence is not None and confidence < confidence_threshold:
            report.drop(source, "low_confidence", f"{where}: confidence {confidence} < {confidence_threshold}")
            continue
        images = [(path.parent / record[k]).resolve() for k in ("path1", "path2")]
        bad = [(p, r) for p in images if check_images and (r := _check_image(p)) is not None]
        if bad:
            image, reason = bad[0]
            if on_bad_image == "error":
                raise ValueError(
                    f"{where}: {reason.replace('_', ' ')} {image} (pass on_bad_image='skip' to skip such records)"
                )
            report.drop(source, reason, f"{where}: {image}")
            continue
        pairs.append(
            PreferencePair(
                prompt=record["prompt"],
                winner=images[0],
                loser=images[1],
                source=source,
                index=i,
                confidence=None if confidence is None else float(confidence),
                model1=record.get("model1"),
                model2=record.get("model2"),
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
    check_images: bool = True,
) -> tuple[list[PreferencePair], FilterReport]:
    """Read and mix several files. A file of weight w with `kept` pairs contributes int(w) whole copies of them plus
    round(frac(w) * kept) of them drawn at random, seeded by `seed` and the file (so weight 0.5 halves a file, 2
    doubles it, 1.5 on 5 pairs gives 5 + round(2.5) = 7). The order is file by file; the trainer shuffles."""
    report, mixed = FilterReport(), []
    for path, weight in parse_sources(sources):
        pairs = read_file(path, confidence_threshold, on_bad_image, report, check_images)
        whole, frac = divmod(weight, 1.0)
        extra = random.Random(f"{seed}:{path.resolve()}").sample(pairs, round(frac * len(pairs)))
        extra.sort(key=lambda p: p.index)
        chosen = pairs * int(whole) + extra
        report.weighted[str(path.resolve())] += len(chosen)
        mixed += chosen
    if not mixed:
        raise ValueError(f"no preference pairs left after filtering:\n{report}")
    return mixed, report


__all__ = [
    "BAD_IMAGE_POLICIES",
    "HPSV3_CONFIDENCE",
    "FilterReport",
    "PreferencePair",
    "load_pairs",
    "parse_sources",
    "read_file",
]
