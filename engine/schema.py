"""One declarative schema per input surface: a config file, a command line, a request. Each field states its type and
bounds once (pydantic), and parsing, validation and the error message all come from that statement:

    class ServeFlags(Schema):
        port: int = Field(8000, ge=1, le=65535, description="HTTP port")

    flags = parse_cli(ServeFlags, argv, prog="python -m engine.serve")  # an argparse parser built from the fields
    config = load_file(TrainConfig, "run.json")  # a JSON file through the safe reader (engine.io.files)
    config = validate(TrainConfig, {"steps": 10}, source="run.json")  # a mapping from anywhere

Every refusal is a `SchemaError` (a ValueError), one line per problem in the form
``<file or flag>: <field>: got <value>, expected <what>``. Schemas are strict: a bool is not a number, 16.0 is not an
integer, "8000" is not a number unless it comes from a command line, NaN and infinities are refused, unknown keys
are refused. A rule that relates several fields raises `invalid(field, value, expected)` from a validator.
"""

from __future__ import annotations

import argparse
import json
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from engine.io.files import read_json

S = TypeVar("S", bound="Schema")

# What `engine.score(seed=...)` draws from: a Philox key in [0, 2**63) (kernels.noise.near_clean).
SEED_RANGE = (0, 2**63)
Seed = typing.Annotated[int, Field(ge=SEED_RANGE[0], lt=SEED_RANGE[1], description="noise seed")]


class SchemaError(ValueError):
    """Input refused by a schema; the message has one line per problem, each naming the source and the field."""


class Schema(BaseModel):
    """Base of every input schema: strict types, no unknown keys, finite numbers, re-validated on assignment.
    Python callers may pass tuples for list fields and path objects for text fields."""

    model_config = ConfigDict(
        extra="forbid", strict=True, allow_inf_nan=False, validate_assignment=True, validate_default=True
    )

    @model_validator(mode="before")
    @classmethod
    def _python_values(cls, data: Any) -> Any:
        """Tuples as lists, path objects as text, numpy scalars as Python numbers (what a JSON round trip gives)."""
        if not isinstance(data, Mapping):
            return data
        return {key: _plain(value) for key, value in data.items()}

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise _schema_error(e, type(self).__name__, type(self)) from None

    # pydantic calls a model's own __init__ from model_validate unless it is marked as the base one: `validate`
    # formats its errors itself
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as e:
            raise _schema_error(e, type(self).__name__, type(self)) from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def replace(self: S, **changes: Any) -> S:
        """A copy with `changes` applied, validated like a new instance (frozen schemas included)."""
        return type(self)(**(dict(self) | changes))


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def invalid(field: str, got: Any, expected: str) -> PydanticCustomError:
    """The error a cross-field validator raises: `raise invalid("max_ongoing", 0, "an integer >= max_batch")`."""
    return PydanticCustomError("invalid", "{field}: got {got}, expected {expected}",
                               {"field": field, "got": _shown(got), "expected": expected})  # fmt: skip


# ------------------------------------------------------------------------------------------------ error messages


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_EXPECTED: dict[str, str | Callable[[dict], str]] = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "text",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "none_required": "null",
    "missing": "a value (required)",
    "greater_than": lambda c: f"a value > {c['gt']}",
    "greater_than_equal": lambda c: f"a value >= {c['ge']}",
    "less_than": lambda c: f"a value < {c['lt']}",
    "less_than_equal": lambda c: f"a value <= {c['le']}",
    "multiple_of": lambda c: f"a multiple of {c['multiple_of']}",
    "literal_error": lambda c: f"one of {c['expected']}",
    "too_short": lambda c: f"at least {c['min_length']} item(s)",
    "too_long": lambda c: f"at most {c['max_length']} item(s)",
    "string_too_short": lambda c: f"text of at least {c['min_length']} character(s)",
    "string_too_long": lambda c: f"text of at most {c['max_length']} character(s)",
    "string_pattern_mismatch": lambda c: f"text matching {c['pattern']}",
}


def _location(loc: tuple, flag: Callable[[str], str] | None) -> str:
    parts = [str(p) if isinstance(p, str) else f"[{p}]" for p in loc]
    # a union's branch names (int, str, ...) and a validator's position add nothing a user can act on
    parts = [p for p in parts if not p.startswith(("function-", "union[", "literal[")) and p not in _TYPE_TAGS]
    if not parts:
        return ""
    head = flag(parts[0]) if flag is not None else parts[0]
    return head + "".join(p if p.startswith("[") else "." + p for p in parts[1:])


_TYPE_TAGS = {"int", "float", "str", "bool", "list", "dict", "none", "list[str]", "list[int]", "list[float]"}


def _format(error: dict, source: str, model: type[BaseModel], flag: Callable[[str], str] | None) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "invalid":  # from `invalid`, raised by a cross-field validator
        field = flag(ctx["field"]) if flag is not None else ctx["field"]
        return f"{source}: {field}: got {ctx['got']}, expected {ctx['expected']}"
    field = _location(tuple(error["loc"]), flag)
    if kind == "extra_forbidden":
        known = ", ".join(flag(n) if flag else n for n in model.model_fields)
        return f"{source}: {field}: an unknown field, expected one of {known}"
    expected = _EXPECTED.get(kind)
    if callable(expected):
        expected = expected(ctx)
    if expected is None:  # a field validator's ValueError, or a pydantic message without an entry above
        expected = error["msg"].removeprefix("Value error, ").removeprefix("Input should be ")
    got = "missing" if kind == "missing" else f"got {_shown(error.get('input'))}"
    return f"{source}: {field + ': ' if field else ''}{got}, expected {expected}"


def _schema_error(err: ValidationError, source: str, model: type[BaseModel], flag=None) -> SchemaError:
    lines = dict.fromkeys(_format(e, source, model, flag) for e in err.errors())  # (unions repeat a problem)
    return SchemaError("\n".join(lines))


# ------------------------------------------------------------------------------------------------------ parsing


def validate(
    model: type[S], data: Any, source: str, *, flag: Callable[[str], str] | None = None, context: Any = None
) -> S:
    """`model` from a mapping (JSON object, keyword arguments); `source` names it in errors (a file, a flag set).
    `context` reaches the schema's validators (`ValidationInfo.context`): what a rule needs beyond the fields, e.g.
    the sizes of the model the values must fit."""
    if not isinstance(data, Mapping):
        raise SchemaError(f"{source}: got {type(data).__name__} {_shown(data)}, expected a JSON object of fields")
    try:
        return model.model_validate(dict(data), context=context)
    except ValidationError as e:
        raise _schema_error(e, source, model, flag) from None


def load_file(model: type[S], path: str | os.PathLike, what: str = "config file", **json_limits: Any) -> S:
    """`model` from a JSON file read by `engine.io.files.read_json` (size, depth and number limits)."""
    return validate(model, read_json(path, what, **json_limits), os.fspath(path))


def _union_args(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _takes_text(annotation: Any) -> bool:
    """Whether a field (or a list field's element) is text: its command-line value is kept as typed."""
    for arg in _union_args(annotation):
        if arg is str or (typing.get_origin(arg) is typing.Literal and all(isinstance(a, str) for a in
                                                                           typing.get_args(arg))):  # fmt: skip
            return True
    return False


def _list_element(annotation: Any) -> Any | None:
    for arg in _union_args(annotation):
        if typing.get_origin(arg) is list:
            return typing.get_args(arg)[0]
    return None


_PYTHON_LITERALS = {"True": True, "False": False, "None": None, "null": None}


def text_value(annotation: Any, raw: str) -> Any:
    """A value typed on a command line, for a field of `annotation`: JSON (`100`, `1e-4`, `[0.9, 0.95]`, `true`,
    `null`) or Python's True/False/None for non-text fields; text fields keep the text (`out_dir=2024` is a path),
    except null/None where the field allows it. What is not JSON stays text, for the schema to refuse by name."""
    allows_none = type(None) in _union_args(annotation)
    literal = _PYTHON_LITERALS.get(raw, raw)
    if raw in _PYTHON_LITERALS and (allows_none if literal is None else not _takes_text(annotation)):
        return literal
    if _takes_text(annotation) and not raw.lstrip().startswith("["):
        return raw
    try:
        value = json.loads(raw, parse_constant=lambda name: name)  # NaN/Infinity stay text: refused by type
    except (json.JSONDecodeError, RecursionError, ValueError):
        return raw
    element = _list_element(annotation)
    if element is not None and isinstance(value, list) and _takes_text(element):
        return [v if isinstance(v, str) else raw for v in value]
    return value


def parse_assignments(model: type[S], items: Sequence[str], source: str) -> dict[str, Any]:
    """``key=value`` overrides (see `text_value`) as a mapping for `validate`; unknown keys are left for it to name."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SchemaError(f"{source}: got {_shown(item)}, expected key=value")
        field = model.model_fields.get(key)
        values[key] = text_value(field.annotation, raw) if field is not None else raw
    return values


# ------------------------------------------------------------------------------------------------ command lines


def _cli(field) -> dict[str, Any]:
    extra = field.json_schema_extra
    return dict(extra.get("cli", {})) if isinstance(extra, dict) else {}


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(model: type[Schema], prog: str, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one option per field of `model` (`--field-name`; a field whose
    ``json_schema_extra={"cli": {"positional": True}}`` is positional, ``{"cli": {"short": "-o"}}`` adds a short
    flag, ``{"cli": {"flag": "--json"}}`` renames the option). Values are collected as text; `parse_cli` converts
    and validates them with the schema."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for name, field in model.model_fields.items():
        cli = _cli(field)
        default = "" if field.is_required() else f" (default: {field.get_default(call_default_factory=True)!r})"
        kwargs: dict[str, Any] = {"help": (field.description or "") + default, "default": argparse.SUPPRESS}
        element = _list_element(field.annotation)
        if element is not None:
            kwargs["nargs"] = cli.get("nargs", "+")
        elif field.annotation is bool and name.startswith("no_"):  # `--no-x` is itself the switch: it sets True
            kwargs |= {"action": "store_const", "const": True}
        elif field.annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction  # --x / --no-x
        if cli.get("positional"):
            kwargs.pop("default")
            if not field.is_required():
                kwargs["nargs"] = "?" if element is None else "*"
                kwargs["default"] = argparse.SUPPRESS
            parser.add_argument(name, metavar=name.upper(), **kwargs)
        else:
            flags = [cli.get("flag", flag_name(name))] + ([cli["short"]] if "short" in cli else [])
            if element is None and field.annotation is not bool:
                kwargs["metavar"] = cli.get("metavar", name.upper())
            parser.add_argument(*flags, dest=name, **kwargs)
    return parser


def cli_values(model: type[Schema], namespace: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line, converted from text by each field's type (see `text_value`)."""
    values = {}
    for name, raw in vars(namespace).items():
        annotation = model.model_fields[name].annotation
        if isinstance(raw, list):
            element = _list_element(annotation)
            values[name] = [text_value(element, r) for r in raw]
        elif isinstance(raw, str):
            values[name] = text_value(annotation, raw)
        else:
            values[name] = raw
    return values


def parse_cli(model: type[S], argv: Sequence[str] | None, prog: str, description: str | None = None) -> S:
    """Parse and validate a command line against `model`; a refused value exits with argparse's usage and the
    schema's message naming the flag (exit status 2)."""
    parser = build_parser(model, prog, description)
    namespace = parser.parse_args(argv)
    clis = {name: _cli(field) for name, field in model.model_fields.items()}
    flag = lambda name: name.upper() if clis[name].get("positional") else clis[name].get("flag", flag_name(name))
    try:
        return validate(model, cli_values(model, namespace), prog, flag=flag)
    except SchemaError as e:
        parser.error(str(e).replace(f"{prog}: ", "", 1) if "\n" not in str(e) else "\n" + str(e))


__all__ = [
    "Schema",
    "SEED_RANGE",
    "Seed",
    "SchemaError",
    "build_parser",
    "cli_values",
    "flag_name",
    "invalid",
    "load_file",
    "parse_assignments",
    "parse_cli",
    "text_value",
    "validate",
]
