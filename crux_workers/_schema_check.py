"""Check a signal payload against the JSON Schema its flow recorded with the wait.

The sender rarely has the flow's suspend model (it may be another service), but the
record holds the model's JSON Schema (``model_json_schema()``). This checks the subset
of JSON Schema pydantic writes: ``$ref`` into ``$defs``, ``type``, ``properties``,
``required``, ``additionalProperties``, ``items``, ``prefixItems``, ``enum``, ``const``,
``anyOf``/``oneOf``/``allOf`` and the length, size and range bounds. Unknown keywords
pass: the flow validates with its model again when it consumes the signal, so this
check may be looser than the model, and is meant never to be stricter. That is why the
scalar types accept what pydantic's lax mode accepts from JSON (``"5"`` or ``true`` for
an integer, ``"yes"`` for a boolean, a number for a datetime).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

Error = dict[str, Any]

_MAX_ERRORS = 20
_SHAPE = {"type", "enum", "const", "anyOf", "oneOf"}
_TIME_FORMATS = {"date-time", "date", "time", "duration"}
_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off"}


def wait_schema(model: type[BaseModel] | None, limit: int) -> str | None:
    """The JSON Schema text recorded with a wait on ``model``, for senders to check.

    None for no model, a model without a JSON Schema, or a schema larger than a stored
    value may be: such a payload is checked only when a suspend consumes it.
    """
    if model is None:
        return None
    try:
        text = json.dumps(model.model_json_schema(), separators=(",", ":"))
    except Exception:
        return None
    return text if len(text.encode()) <= limit else None


def schema_errors(schema: dict[str, Any], value: Any) -> list[Error]:
    """What in ``value`` fails ``schema``: ``[{"loc": [...], "msg": ..., "type": ...}]``."""
    errors: list[Error] = []
    _Checker(schema, errors).check(schema, value, [])
    return errors[:_MAX_ERRORS]


class _Checker:
    def __init__(self, root: dict[str, Any], errors: list[Error]) -> None:
        self.root = root
        self.errors = errors

    def fail(self, loc: list[Any], kind: str, msg: str) -> None:
        if len(self.errors) < _MAX_ERRORS:
            self.errors.append({"loc": list(loc), "msg": msg, "type": kind})

    def any_of(self, key: str, options: list[Any], value: Any, loc: list[Any]) -> bool:
        """True if one form passes; else report why the form of the value's type failed."""
        results = [_errors_of(self.root, o, value, loc) for o in options]
        if any(not r for r in results):
            return True
        for errors in results:
            # The value had this form's type (e.g. the object of an ``X | None``): what
            # failed inside it is the useful detail.
            if not any(e["loc"] == loc and e["type"] in _SHAPE for e in errors):
                for e in errors:
                    self.fail(e["loc"], e["type"], e["msg"])
                return False
        self.fail(loc, key, "Input matches none of the allowed forms")
        return False

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        ref = schema.get("$ref")
        seen = 0
        while isinstance(ref, str) and ref.startswith("#/") and seen < 32:
            target: Any = self.root
            for part in ref[2:].split("/"):
                target = target.get(part) if isinstance(target, dict) else None
            if not isinstance(target, dict):
                return {}
            # Siblings of $ref (a description, a default) apply as well.
            schema = {**{k: v for k, v in schema.items() if k != "$ref"}, **target}
            ref = target.get("$ref")
            seen += 1
        return schema

    def check(self, schema: Any, value: Any, loc: list[Any]) -> None:
        if schema is True or not isinstance(schema, dict):
            return
        schema = self.resolve(schema)
        if "const" in schema and value != schema["const"]:
            self.fail(loc, "const", f"Input should be {schema['const']!r}")
            return
        if "enum" in schema and isinstance(schema["enum"], list) and value not in schema["enum"]:
            options = ", ".join(repr(v) for v in schema["enum"][:10])
            self.fail(loc, "enum", f"Input should be one of {options}")
            return
        for key in ("anyOf", "oneOf"):
            options = schema.get(key)
            if isinstance(options, list) and options and not self.any_of(key, options, value, loc):
                return
        for part in schema.get("allOf") or []:
            self.check(part, value, loc)
        kinds = schema.get("type")
        if kinds is None:
            return
        kinds = kinds if isinstance(kinds, list) else [kinds]
        if schema.get("format") in _TIME_FORMATS and _is("number", value):
            return  # pydantic reads a number as a timestamp or a count of seconds
        kind = next((k for k in kinds if _is(k, value)), None)
        if kind is None:
            self.fail(loc, "type", f"Input should be of type {' or '.join(map(str, kinds))}")
            return
        if kind == "object":
            self.check_object(schema, value, loc)
        elif kind == "array":
            self.check_array(schema, value, loc)
        elif kind == "string":
            self.check_string(schema, value, loc)
        elif kind in ("integer", "number"):
            self.check_number(schema, _number(value), loc)

    def check_object(self, schema: dict[str, Any], value: dict[str, Any], loc: list[Any]) -> None:
        props = schema.get("properties") or {}
        for name in schema.get("required") or []:
            if name not in value:
                self.fail([*loc, name], "missing", "Field required")
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in props:
                self.check(props[name], item, [*loc, name])
            elif extra is False:
                self.fail([*loc, name], "extra_forbidden", "Extra inputs are not permitted")
            elif isinstance(extra, dict):
                self.check(extra, item, [*loc, name])

    def check_array(self, schema: dict[str, Any], value: list[Any], loc: list[Any]) -> None:
        _bounds(self, loc, len(value), schema.get("minItems"), schema.get("maxItems"), "items")
        prefix = schema.get("prefixItems") or []
        for i, item in enumerate(value):
            if i < len(prefix):
                self.check(prefix[i], item, [*loc, i])
            elif "items" in schema:
                if schema["items"] is False:
                    self.fail([*loc, i], "too_long", "Too many items")
                else:
                    self.check(schema["items"], item, [*loc, i])

    def check_string(self, schema: dict[str, Any], value: str, loc: list[Any]) -> None:
        _bounds(self, loc, len(value), schema.get("minLength"), schema.get("maxLength"), "chars")
        pattern = schema.get("pattern")
        if isinstance(pattern, str):
            try:
                matched = re.search(pattern, value) is not None
            except re.error:  # a pattern Python's re does not read: the model checks it
                return
            if not matched:
                self.fail(loc, "pattern", f"String should match pattern {pattern!r}")

    def check_number(self, schema: dict[str, Any], value: int | float, loc: list[Any]) -> None:
        checks: tuple[tuple[str, Callable[[float], bool], str], ...] = (
            ("minimum", lambda b: value >= b, "greater than or equal to"),
            ("maximum", lambda b: value <= b, "less than or equal to"),
            ("exclusiveMinimum", lambda b: value > b, "greater than"),
            ("exclusiveMaximum", lambda b: value < b, "less than"),
        )
        for key, ok, words in checks:
            bound = schema.get(key)
            if isinstance(bound, int | float) and not isinstance(bound, bool) and not ok(bound):
                self.fail(loc, key, f"Input should be {words} {bound}")


def _errors_of(root: dict[str, Any], schema: Any, value: Any, loc: list[Any]) -> list[Error]:
    errors: list[Error] = []
    _Checker(root, errors).check(schema, value, loc)
    return errors


def _bounds(checker: _Checker, loc: list[Any], size: int, low: Any, high: Any, unit: str) -> None:
    if isinstance(low, int) and size < low:
        checker.fail(loc, "too_short", f"Should have at least {low} {unit}")
    if isinstance(high, int) and size > high:
        checker.fail(loc, "too_long", f"Should have at most {high} {unit}")


def _is(kind: str, value: Any) -> bool:
    """``value`` is of JSON type ``kind``, or is what pydantic's lax mode turns into one."""
    if kind == "null":
        return value is None
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        if isinstance(value, bool):
            return True
        if isinstance(value, int | float):
            return value in (0, 1)
        return isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE
    if kind in ("integer", "number"):
        try:
            number = _number(value)
        except (TypeError, ValueError, OverflowError):
            return False
        if kind == "number" or isinstance(number, int):
            return True
        return math.isfinite(number) and number.is_integer()
    return True  # a type this check does not know: the model decides


def _number(value: Any) -> int | float:
    """A JSON number, or the number pydantic's lax mode reads from a bool or a string."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            return float(text)
    raise TypeError(f"not a number: {type(value).__name__}")
