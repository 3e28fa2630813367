"""The safe reader (engine.io.files): every JSON file and every path read from a file goes through it."""

from __future__ import annotations

import json
import os
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.io.files import FileInputError, inside, is_regular_file, open_regular, parse_json, read_json


def test_read_json_returns_the_document(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"a": [1, 2.5, "x", None, True], "b": {"c": -3}}))
    assert read_json(path) == {"a": [1, 2.5, "x", None, True], "b": {"c": -3}}


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "step_5.safetensors"
    os.mkfifo(fifo)
    outcome = {}

    def attempt():
        try:
            read_json(fifo)
        except FileInputError as e:
            outcome["error"] = str(e)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout=5)
    assert not worker.is_alive(), "opening a FIFO blocked"
    assert "FIFO" in outcome["error"] and str(fifo) in outcome["error"]
    with pytest.raises(FileInputError, match="FIFO"):
        is_regular_file(fifo)


def test_directories_and_devices_are_refused(tmp_path):
    with pytest.raises(FileInputError, match="a directory, expected a regular file"):
        open_regular(tmp_path)
    with pytest.raises(FileInputError, match="character device"):
        open_regular("/dev/null")


def test_long_names_and_symlink_loops_are_named(tmp_path):
    long = tmp_path / ("x" * 5000)
    with pytest.raises(FileInputError, match="longer than the file system allows") as err:
        read_json(long)
    assert len(str(err.value)) < 600  # the message quotes the path, shortened
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(FileInputError, match="symbolic link loop"):
        read_json(tmp_path / "a")
    with pytest.raises(FileInputError, match="symbolic link loop"):
        is_regular_file(tmp_path / "a")
    assert is_regular_file(tmp_path / "missing") is False


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested"),
        ("[[[[[[[[1]]]]]]]]", "nested 7\\+ levels deep, expected at most 6"),
        ("1" * 5000, "5000 digits"),
        ('{"a": NaN}', "NaN is not a JSON number"),
        ('{"a": 1e999}', "overflows to infinity"),
        ('{"a": 1', "not valid JSON: .* line 1 column 8"),
        ("\ufeff[1]".encode("utf-16"), "UTF-16"),
        (b'{"a": "\xff"}', "not UTF-8"),
    ],
)
def test_malformed_json_is_named(tmp_path, text, match):
    path = tmp_path / "bad.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(FileInputError, match=match) as err:
        read_json(path, max_depth=6)
    assert str(err.value).startswith(str(path))


def test_size_limit(tmp_path):
    path = tmp_path / "big.json"
    path.write_text("[" + "1," * 100 + "1]")
    with pytest.raises(FileInputError, match="expected at most 64"):
        read_json(path, max_bytes=64)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_bytes_give_a_document_or_a_named_error(data):
    try:
        parse_json(data, "request.json")
    except FileInputError as e:
        assert str(e).startswith("request.json: ")


def test_inside_keeps_names_in_their_folder(tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "w.safetensors").write_bytes(b"x")
    assert inside(root, "w.safetensors", "index: weight_map") == (root / "w.safetensors").resolve()
    (tmp_path / "elsewhere.safetensors").write_bytes(b"x")
    for name in ("../elsewhere.safetensors", str(tmp_path / "elsewhere.safetensors"), ".", "", None, 3, "a\x00b"):
        with pytest.raises(FileInputError, match="index: weight_map"):
            inside(root, name, "index: weight_map")
    (root / "link.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(FileInputError, match="outside"):
        inside(root, "link.safetensors", "index: weight_map")


def test_a_hub_snapshot_may_link_into_its_blobs(tmp_path):
    repo = tmp_path / "models--org--name"
    snapshot = repo / "snapshots" / "0123abcd" / "transformer"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "blobs" / "f00d").write_bytes(b"x")
    (snapshot / "w.safetensors").symlink_to(os.path.relpath(repo / "blobs" / "f00d", snapshot))
    assert inside(snapshot, "w.safetensors", "index").name == "f00d"
    (tmp_path / "other").write_bytes(b"x")
    (snapshot / "evil.safetensors").symlink_to(tmp_path / "other")
    with pytest.raises(FileInputError, match="outside"):
        inside(snapshot, "evil.safetensors", "index")
