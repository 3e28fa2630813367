"""HPSv3 JSON validation, the image path rule and the image decode check of `training.data`, which the cache, the
trainer, the probe and bench.accuracy all read their pairs through. Bad files are generated here."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from training.data import inspect_image, load_pairs, read_file

# ---------------------------------------------------------------------------------------------------- bad images


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def decompression_bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A few hundred bytes that declare a width x height grayscale PNG (PIL's bomb check reads the header)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (width + 1) * 4)  # the first rows; the check never gets to decode
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def corrupt_zlib_png(rng: np.random.Generator) -> bytes:
    """A PNG whose IDAT zlib stream is damaged while every chunk CRC is valid (so only a full decode notices)."""
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG", compress_level=1)
    png = buffer.getvalue()
    at = png.index(b"IDAT")
    length = struct.unpack(">I", png[at - 4 : at])[0]
    data = bytearray(png[at + 4 : at + 4 + length])
    data[2 : length // 2] = bytes(b ^ 0x5A for b in data[2 : length // 2])  # keep the 2-byte zlib header
    fixed = _png_chunk(b"IDAT", bytes(data))
    return png[: at - 4] + fixed + png[at + 8 + length :]


def truncated_jpeg(rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def float_tiff(value: float) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16), value, dtype=np.float32), mode="F").save(buffer, format="TIFF")
    return buffer.getvalue()


@pytest.fixture
def bad_images(tmp_path: Path) -> dict[str, str]:
    rng = np.random.default_rng(0)
    files = {
        "truncated.jpg": truncated_jpeg(rng),
        "corrupt_zlib.png": corrupt_zlib_png(rng),
        "bomb.png": decompression_bomb_png(),
        "float_out_of_range.tif": float_tiff(5.0),
        "float_nan.tif": float_tiff(float("nan")),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    Image.new("RGB", (32, 32), (10, 20, 30)).save(tmp_path / "good.png")
    Image.new("RGB", (32, 32), (30, 20, 10)).save(tmp_path / "good2.png")
    return {name: name for name in files}


def test_every_undecodable_image_is_skipped_or_named(tmp_path: Path, bad_images: dict[str, str]) -> None:
    records = [{"prompt": "p", "path1": "good.png", "path2": "good2.png"}]
    records += [{"prompt": "p", "path1": "good.png", "path2": name} for name in bad_images]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(records))

    pairs, report = load_pairs([path], None, on_bad_image="skip")
    assert [p.index for p in pairs] == [0]
    assert report.total_dropped("unreadable_image") == len(bad_images)

    for i, name in enumerate(bad_images, start=1):
        path.write_text(json.dumps([records[0], records[i]]))
        with pytest.raises(ValueError) as caught:
            read_file(path, None, on_bad_image="error")
        message = str(caught.value)
        assert f"{path} record 1" in message and name in message and "path2" in message, message
        assert "images[" not in message, message


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    (tmp_path / "bomb.png").write_bytes(decompression_bomb_png(12000, 12000))  # 1.6x PIL's limit: only a warning
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "p", "path1": "ok.png", "path2": "bomb.png"}]))
    with (
        pytest.warns(Image.DecompressionBombWarning),
        pytest.raises(ValueError, match=r"record 0: unreadable image path2 .*bomb\.png.*decompression-bomb limit"),
    ):
        read_file(path, None)


def test_the_cache_decodes_each_image_once(tmp_path: Path, bad_images: dict[str, str], monkeypatch) -> None:
    import training.cache
    from bench.tiny_base import default_tiny_base

    records = [{"prompt": "p", "path1": "good.png", "path2": "good2.png"}] * 4
    records += [{"prompt": "p", "path1": "good.png", "path2": "truncated.jpg"}] * 3
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(records))
    decoded: list[str] = []

    def counted(image: Path):
        decoded.append(image.name)
        return inspect_image(image)

    monkeypatch.setattr(training.cache, "inspect_image", counted)
    cache = training.cache.build_cache(
        [path], default_tiny_base(), tmp_path / "cache", max_sequence_length=16, area=64 * 64, progress=False,
        confidence_threshold=None, on_bad_image="skip",
    )  # fmt: skip
    assert sorted(decoded) == ["good.png", "good2.png", "truncated.jpg"]
    assert list(training.cache.LatentCache(cache).bad_images) == [str(tmp_path / "truncated.jpg")]


# ------------------------------------------------------------------------------------------------------ path rule


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """tmp/data/{a,b}.png, tmp/outside.png and a JSON file maker."""
    (tmp_path / "data").mkdir()
    for name in ("data/a.png", "data/b.png", "outside.png"):
        Image.new("RGB", (16, 16)).save(tmp_path / name)
    return tmp_path


def write_json(path: Path, *records: dict) -> Path:
    path.write_text(json.dumps([{"prompt": "p", **r} for r in records]))
    return path


def test_paths_outside_the_image_root_are_refused_unless_allowed(dataset: Path) -> None:
    data = dataset / "data"
    cases = {
        "dotdot": "../outside.png",
        "absolute": str(dataset / "outside.png"),
    }
    (data / "link.png").symlink_to(dataset / "outside.png")
    cases["symlink"] = "link.png"
    for label, outside in cases.items():
        path = write_json(
            data / f"{label}.json", {"path1": "a.png", "path2": "b.png"}, {"path1": "a.png", "path2": outside}
        )
        with pytest.raises(
            ValueError, match=rf"{path} record 1: path2 .* outside the image root .*--allow-outside-root"
        ):
            read_file(path, None)
        pairs = read_file(path, None, allow_outside_root=True)
        assert pairs[1].loser == (dataset / "outside.png").resolve()
    # An absolute path inside the root is fine.
    path = write_json(data / "abs.json", {"path1": str(data / "a.png"), "path2": "b.png"})
    assert read_file(path, None)[0].winner == (data / "a.png").resolve()


def test_image_root_resolves_relative_paths_and_names_the_flag(dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = dataset / "lists"
    elsewhere.mkdir()
    path = write_json(elsewhere / "pairs.json", {"path1": "data/a.png", "path2": "data/b.png"})
    pairs = read_file(path, None, image_root=dataset)
    assert pairs[0].winner == (dataset / "data" / "a.png").resolve()

    # HPSv3 resolves against the working directory: a missing image that exists there says so and names the flag.
    monkeypatch.chdir(dataset)
    with pytest.raises(
        ValueError, match=r"record 0: missing image path1 .*exists relative to the working directory.*--image-root"
    ):
        read_file(path, None)
    with pytest.raises(ValueError, match="image_root .* is not a directory"):
        read_file(path, None, image_root=dataset / "nope")


def test_every_tool_applies_the_path_rule(dataset: Path) -> None:
    from bench.accuracy import evaluate_file
    from bench.tiny_base import default_tiny_base
    from training.cache import build_cache
    from training.probe import run_probe

    path = write_json(dataset / "data" / "p.json", {"path1": "a.png", "path2": "../outside.png"})
    outside = r"outside the image root"
    with pytest.raises(ValueError, match=outside):
        build_cache([path], default_tiny_base(), dataset / "cache", progress=False)
    with pytest.raises(ValueError, match=outside):
        evaluate_file(None, None, path, seed=0)
    with pytest.raises(ValueError, match=outside):
        run_probe("no-cache", [str(path)], [str(path)], "no-base", confidence_threshold=None)
    with pytest.raises(ValueError, match="image root"):  # the command lines take the flags
        from training.probe import main

        main(
            [
                "--cache",
                "c",
                "--train-json",
                str(path),
                "--val-json",
                str(path),
                "--base",
                "b",
                "--image-root",
                str(dataset / "data"),
            ]
        )


# ------------------------------------------------------------------------------------------------- JSON records


def test_record_values_and_encodings_are_refused_by_record(dataset: Path) -> None:
    data = dataset / "data"
    good = {"path1": "a.png", "path2": "b.png"}
    path = data / "f.json"
    cases = [
        ({**good, "confidence": 5.0}, "confidence: got 5.0, expected a value <= 1.0"),
        ({**good, "confidence": 1e308}, "confidence: got 1e\\+308, expected a value <= 1.0"),
        ({**good, "confidence": -0.1}, "confidence: got -0.1, expected a value >= 0.0"),
        ({"path1": "a.png", "path2": "a.png"}, "path1 and path2 are the same image"),
        ({"path1": "a.png", "path2": "./a.png"}, "path1 and path2 are the same image"),
        ({**good, "prompt": "bad \udcff text"}, "prompt: got .*, expected valid Unicode text \\(an unpaired surrogate"),
        ({"path1": "a\0.png", "path2": "b.png"}, "path1: got .*, expected an image path without NUL characters"),
        ({"path1": "", "path2": "b.png"}, "path1: got '', expected text of at least 1 character"),
        ({**good, "model1": 3}, "model1: got 3, expected text"),
    ]
    for record, match in cases:
        # json.dumps writes lone surrogates as \udcff escapes, as a file on disk would hold them.
        path.write_text(json.dumps([{"prompt": "p", **good}, {"prompt": "p", **record}]))
        with pytest.raises((ValueError, TypeError), match=rf"{path} record 1: {match}"):
            read_file(path, None)

    text = json.dumps([{"prompt": "café", **good}], ensure_ascii=False)
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{path}: byte 0xe9 at offset \d+ \(line 1\) is not UTF-8"):
        read_file(path, None)
    path.write_bytes(text.encode("utf-16"))
    with pytest.raises(ValueError, match=rf"{path}: UTF-16"):
        read_file(path, None)
    path.write_bytes(text.encode("utf-8-sig"))  # a UTF-8 byte-order mark is harmless
    assert read_file(path, None)[0].prompt == "café"


_text = st.one_of(st.text(max_size=12), st.sampled_from(["\udcff", "a\ud800b"]))  # lone surrogates too
_value = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), _text, st.lists(st.integers(), max_size=2)
)
_path = st.sampled_from(["a.png", "b.png", "./b.png", "../outside.png", "missing.png", "a\0.png", ""])
# Mostly well-formed records (so that the rules about what may be kept get exercised), some with any value anywhere.
_record = st.one_of(
    st.fixed_dictionaries(
        {"prompt": _text, "path1": _path, "path2": _path},
        optional={"confidence": st.one_of(st.none(), st.floats(-1, 2), st.sampled_from([1e308, 5.0])), "model1": _text},
    ),
    st.fixed_dictionaries(
        {}, optional={"prompt": _value, "path1": _value, "path2": _value, "confidence": _value, "model1": _value}
    ),
    _value,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(_record, min_size=1, max_size=4))
def test_any_record_loads_or_is_refused_by_name(dataset: Path, records: list) -> None:
    """Whatever a file holds, read_file returns valid pairs or raises ValueError/TypeError naming the file and the
    record; nothing else escapes, and a kept pair satisfies every rule."""
    path = dataset / "data" / "h.json"
    path.write_text(json.dumps(records))
    try:
        pairs = read_file(path, None, on_bad_image="error")
    except (ValueError, TypeError) as e:
        assert str(path) in str(e) and ("record " in str(e) or "must hold a JSON list" in str(e)), e
        return
    root = (dataset / "data").resolve()
    for pair in pairs:
        confidence = records[pair.index].get("confidence")
        assert confidence is None or 0.0 <= confidence <= 1.0
        assert pair.winner != pair.loser and pair.winner.is_relative_to(root) and pair.loser.is_relative_to(root)
        pair.prompt.encode("utf-8")
