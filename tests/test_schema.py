"""The schema layer (engine.schema): one declaration per field gives parsing, validation and the error message."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import Field, model_validator

from engine.schema import Schema, SchemaError, invalid, load_file, parse_assignments, parse_cli, validate


class Flags(Schema):
    checkpoint: str | None = Field(None, description="a reward checkpoint")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")
    rate: float = Field(1.0, gt=0)
    dtype: Literal["bf16", "fp32"] = "bf16"
    layers: list[int] | None = None
    names: list[str] = Field(default_factory=list)
    verbose: bool = False
    path: str = Field("out", json_schema_extra={"cli": {"positional": True}})

    @model_validator(mode="after")
    def _rates_need_a_checkpoint(self):
        if self.rate > 10 and self.checkpoint is None:
            raise invalid("rate", self.rate, "at most 10 without checkpoint")
        return self


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"port": True}, "cfg.json: port: got True, expected an integer"),
        ({"port": 16.0}, "cfg.json: port: got 16.0, expected an integer"),
        ({"port": 70000}, "cfg.json: port: got 70000, expected a value <= 65535"),
        ({"rate": float("nan")}, "cfg.json: rate: got nan, expected a finite number"),
        ({"rate": -1}, "cfg.json: rate: got -1, expected a value > 0"),
        ({"dtype": "fp8"}, "cfg.json: dtype: got 'fp8', expected one of 'bf16' or 'fp32'"),
        ({"layers": [1, "2"]}, "cfg.json: layers[1]: got '2', expected an integer"),
        ({"colour": 1}, "cfg.json: colour: an unknown field, expected one of checkpoint, port"),
        ({"rate": 11}, "cfg.json: rate: got 11.0, expected at most 10 without checkpoint"),
        ([1, 2], "cfg.json: got list [1, 2], expected a JSON object of fields"),
    ],
)
def test_refusals_name_source_field_value_and_expectation(data, message):
    with pytest.raises(SchemaError) as err:
        validate(Flags, data, "cfg.json")
    assert str(err.value).startswith(message)


def test_python_values_are_accepted_as_their_json_form():
    flags = validate(Flags, {"layers": (1, np.int64(3)), "rate": np.float32(2.5), "port": 1}, "kwargs")
    assert flags.layers == [1, 3] and flags.rate == 2.5 and flags.port == 1
    with pytest.raises(SchemaError, match="port: got 0"):
        flags.port = 0  # assignment is validated too


def test_cli_parses_and_names_the_flag(capsys):
    flags = parse_cli(Flags, ["--port", "9000", "--layers", "1", "2", "--verbose", "p"], prog="prog")
    assert (flags.port, flags.layers, flags.verbose, flags.path) == (9000, [1, 2], True, "p")
    assert parse_cli(Flags, ["--names", "1", "x"], prog="prog").names == ["1", "x"]  # text stays text
    for argv, message in [
        (["--port", "70000"], "--port: got 70000, expected a value <= 65535"),
        (["--rate", "nan"], "--rate: got 'nan', expected a number"),
        (["--rate", "1e999"], "--rate: got inf, expected a finite number"),
        (["--layers", "1", "x"], "--layers[1]: got 'x', expected an integer"),
        (["--rate", "20"], "--rate: got 20.0, expected at most 10 without checkpoint"),
    ]:
        with pytest.raises(SystemExit) as err:
            parse_cli(Flags, argv, prog="prog")
        assert err.value.code == 2
        assert message in capsys.readouterr().err


def test_assignments_and_files(tmp_path):
    values = parse_assignments(Flags, ["port=9000", "checkpoint=2024", "layers=[1,2]", "checkpoint=None"], "argv")
    assert values == {"port": 9000, "checkpoint": None, "layers": [1, 2]}
    assert parse_assignments(Flags, ["checkpoint=2024"], "argv") == {"checkpoint": "2024"}  # a path, not a number
    with pytest.raises(SchemaError, match="argv: got 'port', expected key=value"):
        parse_assignments(Flags, ["port"], "argv")
    path = tmp_path / "cfg.json"
    path.write_text('{"port": 1, "rate": 1e400}')
    with pytest.raises(ValueError, match=f"{path}: .*overflows to infinity"):
        load_file(Flags, path)
    path.write_text('{"port": 0}')
    with pytest.raises(SchemaError, match=f"{path}: port: got 0, expected a value >= 1"):
        load_file(Flags, path)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["port", "rate", "dtype", "layers", "verbose", "x"]),
                       st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5)
                       | st.lists(st.integers() | st.text(max_size=2), max_size=3)))  # fmt: skip
def test_any_mapping_validates_or_is_refused_by_name(data):
    try:
        flags = validate(Flags, data, "req")
    except SchemaError as e:
        assert all(line.startswith("req: ") for line in str(e).splitlines())
    else:
        assert 1 <= flags.port <= 65535 and flags.rate > 0
