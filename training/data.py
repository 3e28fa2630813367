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

import hashlib
import io
import math
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from PIL import Image
from pydantic import AfterValidator, ConfigDict, Field

from engine.io.files import FileInputError, file_status, is_regular_file, open_regular, read_bytes, read_json
from engine.schema import Schema, validate

HPSV3_CONFIDENCE = 0.95
BAD_IMAGE_POLICIES = ("error", "skip")


class PathRule(Schema):
    """The image path rule's settings, as every tool that reads preference files takes them."""

    image_root: Annotated[str, Field(min_length=1)] | None = Field(
        None,
        description="folder that relative image paths resolve against and that every image must lie in (default: "
        "each JSON file's folder)",
    )
    allow_outside_root: bool = Field(False, description="accept image paths that resolve outside the image root")


class DataRules(PathRule):
    """What a tool keeps of a preference file: the path rule, the confidence filter and the bad-image policy."""

    confidence_threshold: float | None = Field(
        HPSV3_CONFIDENCE, ge=0.0, le=1.0, description="drop pairs below this confidence (HPSv3: 0.95); null keeps all"
    )
    on_bad_image: Literal[BAD_IMAGE_POLICIES] = Field(  # type: ignore[valid-type]
        "error", description='"skip" drops and counts records with missing/unreadable images; "error" stops'
    )


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
    """The absolute, symlink-free path of a record's image path `raw` (non-empty, no NUL: `PreferenceRecord`'s rule):
    relative paths resolve against `image_root` (absolute already). ValueError naming `where` (file and record) for
    a path that cannot be resolved (a symlink loop) and for one that resolves outside `image_root` unless
    `allow_outside_root`."""
    prefix = f"{where}: " if where else ""
    root = image_root.resolve()
    try:
        resolved = (root / raw).resolve()
    except (OSError, RuntimeError) as e:  # Python < 3.13 reports a symlink loop as RuntimeError
        raise ValueError(f"{prefix}{field_name}: got {raw!r:.100}, which cannot be resolved ({e})") from None
    if not allow_outside_root and not resolved.is_relative_to(root):
        raise ValueError(
            f"{prefix}{field_name} {raw!r:.100} resolves to {str(resolved):.200}, outside the image root {root}: move "
            "the image under the root, point image_root (--image-root) at a folder holding both, or pass "
            "allow_outside_root=True (--allow-outside-root) to read paths anywhere"
        )
    return resolved


# image_check(path) -> None for a good image, else (reason, detail): "missing_image" or "unreadable_image"
ImageCheck = Callable[[Path], "tuple[str, str] | None"]


@dataclass(frozen=True)
class ImageFile:
    """What `inspect_image` found: the problem (reason, detail) or None, and for a file that could be read the sha256
    of its bytes and, if it decodes, its (height, width) in pixels."""

    problem: tuple[str, str] | None
    digest: str | None = None
    size: tuple[int, int] | None = None


def read_image(path: Path) -> Image.Image:
    """The PIL image (lazily decoded) of a regular image file, read whole first: a FIFO or device is refused without
    blocking (`engine.io.files.open_regular`)."""
    return Image.open(io.BytesIO(read_bytes(path, "image")))


def inspect_image(path: Path) -> ImageFile:
    """`path` read once: its digest, and whether it decodes as the pixel front end decodes it. Problems:
    ``missing_image``, or ``unreadable_image`` (not a regular file, truncated or corrupt data, a decompression bomb,
    a float/16-bit image out of range)."""
    from engine.pixel import load_images

    try:
        if not is_regular_file(path, "image"):
            return ImageFile(("missing_image", "no such file"))
        data = read_bytes(path, "image")
    except FileInputError as e:
        return ImageFile(("unreadable_image", str(e)))
    digest = hashlib.sha256(data).hexdigest()
    try:
        # the header first; PIL raises DecompressionBombError beyond 2x its limit
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
                return ImageFile(
                    ("unreadable_image", f"{width}x{height} pixels exceeds PIL's decompression-bomb limit of "
                     f"{Image.MAX_IMAGE_PIXELS}"), digest
                )  # fmt: skip
            load_images([image], size_multiple=1)  # the full decode and range checks the cache and the benchmark run
    except Exception as e:  # decoders raise OSError, SyntaxError, zlib.error, ValueError, DecompressionBombError, ...
        return ImageFile(("unreadable_image", f"{type(e).__name__}: {e}"), digest)
    return ImageFile(None, digest, (height, width))


def image_problem(path: Path) -> tuple[str, str] | None:
    """`inspect_image`'s verdict alone: None for a good image, else (reason, detail)."""
    return inspect_image(path).problem


def _missing_image_hint(raw: str, image_root: Path) -> str:
    """For a missing image: whether the same relative path exists relative to the working directory (HPSv3's rule)."""
    candidate = Path.cwd() / raw
    if Path(raw).is_absolute() or not candidate.is_file():
        return ""
    return (
        f"; {raw!r} is not under the image root {image_root.resolve()}, but {candidate.resolve()} exists relative to "
        f"the working directory: pass image_root={str(Path.cwd())!r} (--image-root {Path.cwd()}) to resolve paths there"
    )


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's \udcff escapes decode to lone surrogates, which no encoder accepts
        raise ValueError(f"valid Unicode text (an unpaired surrogate at character {e.start}: fix the record)") from None
    return text


def _a_path(text: str) -> str:
    if "\0" in text:
        raise ValueError("an image path without NUL characters (no file system path can hold one)")
    return text


def _votes(votes: list[float]) -> list[float]:
    if sum(votes) <= 0:
        raise ValueError("votes for path1 and path2 with a positive sum")
    return votes


Text = Annotated[str, AfterValidator(_unicode)]
ImagePath = Annotated[str, Field(min_length=1), AfterValidator(_a_path), AfterValidator(_unicode)]


class PreferenceRecord(Schema):
    """One record of an HPSv3-format file. Keys it does not name are ignored, as HPSv3's loader ignores them."""

    model_config = ConfigDict(extra="ignore")

    prompt: Text = Field(description="the prompt both images were generated for")
    path1: ImagePath = Field(description="the preferred image")
    path2: ImagePath = Field(description="the other image")
    confidence: float | None = Field(None, ge=0.0, le=1.0, description="the label's probability; null: human-labelled")
    choice_dist: Annotated[
        list[Annotated[float, Field(ge=0.0)]], Field(min_length=2, max_length=2), AfterValidator(_votes)
    ] | None = Field(None, description="annotators' votes (or shares) for path1 and path2")  # fmt: skip
    model1: Text | None = Field(None, description="the generator of path1")
    model2: Text | None = Field(None, description="the generator of path2")


def _records(path: Path) -> list[Any]:
    records = read_json(path, "preference file", finite=False)  # a NaN confidence is refused by record and field
    if not isinstance(records, list):
        raise ValueError(f"{path}: got a JSON {type(records).__name__}, expected a JSON list of records")
    return records


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (hard links); False when either cannot be examined (the image check says why)."""
    try:
        sa, sb = file_status(a), file_status(b)
    except FileInputError:
        return False
    return sa is not None and sb is not None and (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


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
    rules = {"confidence_threshold": confidence_threshold, "on_bad_image": on_bad_image, "image_root": image_root}
    validate(DataRules, {**rules, "allow_outside_root": allow_outside_root}, "read_file")
    path = Path(path).resolve()
    root = path.parent if image_root is None else Path(image_root)
    if not root.is_dir():
        raise ValueError(f"image_root {root} is not a directory (the folder that relative image paths resolve against)")
    report = report if report is not None else FilterReport()
    image_check = image_problem if image_check is None else image_check
    source, pairs = str(path), []
    for i, raw in enumerate(_records(path)):
        where = f"{path} record {i}"
        record = validate(PreferenceRecord, raw, where)
        confidence = record.confidence
        images = [
            resolve_image_path(getattr(record, k), root, allow_outside_root, where, k) for k in ("path1", "path2")
        ]
        if images[0] == images[1] or _same_file(*images):
            raise ValueError(
                f"{where}: path1 and path2 are the same image {images[0]} (the same file, or hard links to one); a "
                "pair compares two images"
            )
        if confidence_threshold is not None and confidence is not None and confidence < confidence_threshold:
            report.drop(source, "low_confidence", f"{where}: confidence {confidence} < {confidence_threshold}")
            continue
        checked = zip(("path1", "path2"), images, strict=True)
        bad = [(k, p, found) for k, p in checked if (found := image_check(p)) is not None]
        if bad:
            key, image, (reason, detail) = bad[0]
            if reason == "missing_image":
                detail += _missing_image_hint(getattr(record, key), root)
            if on_bad_image == "error":
                raise ValueError(
                    f"{where}: {reason.replace('_', ' ')} {key} {image} ({detail}) "
                    "(pass on_bad_image='skip' to skip such records)"
                )
            report.drop(source, reason, f"{where}: {key} {image} ({detail})")
            continue
        pairs.append(
            PreferencePair(
                prompt=record.prompt,
                winner=images[0],
                loser=images[1],
                source=source,
                index=i,
                confidence=confidence,
                model1=record.model1,
                model2=record.model2,
                choice_dist=None if record.choice_dist is None else tuple(record.choice_dist),
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


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a regular file's bytes (what a training checkpoint records of each data file)."""
    digest = hashlib.sha256()
    with open_regular(path, "data file") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


__all__ = [
    "BAD_IMAGE_POLICIES",
    "HPSV3_CONFIDENCE",
    "DataRules",
    "FilterReport",
    "ImageCheck",
    "ImageFile",
    "PathRule",
    "PreferencePair",
    "PreferenceRecord",
    "file_digest",
    "image_problem",
    "inspect_image",
    "load_pairs",
    "parse_sources",
    "read_file",
    "read_image",
    "resolve_image_path",
]
