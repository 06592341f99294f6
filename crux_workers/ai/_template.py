"""Prompt templates: ``str.format`` syntax, filled from a dict or a pydantic model.

Placeholders are ``{field}``, ``{field.sub}`` for nested values and ``{field:spec}`` or
``{field!r}`` as in ``str.format``; ``{{`` and ``}}`` are literal braces. Only names are
looked up: indexing (``{items[0]}``), positional fields (``{}``, ``{0}``) and attribute
access on arbitrary objects are refused, so a template cannot reach into an object's
internals (``{x.__class__}``) the way plain ``str.format`` would let it.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

from pydantic import BaseModel

from ..errors import InvalidInput

TemplateInput: TypeAlias = Mapping[str, Any] | BaseModel
"""What a template is filled from: a mapping of field names, or a pydantic model."""


def fields_of(input: object) -> Mapping[str, Any]:
    """The named values a template may use, from a mapping or a pydantic model."""
    if isinstance(input, BaseModel):
        # Python mode keeps datetimes and decimals as objects, so format specs such as
        # {when:%Y-%m-%d} or {price:.2f} work on them.
        return input.model_dump()
    if isinstance(input, Mapping):
        return input
    raise InvalidInput(
        f"prompt input must be a dict or a pydantic model, got {type(input).__name__}"
    )


def fill(template: str, values: Mapping[str, Any], *, what: str = "prompt") -> str:
    """Return ``template`` with its placeholders replaced from ``values``.

    Raises ``InvalidInput`` naming the placeholder when a value is missing, or when the
    template itself is malformed (an unmatched brace, a format spec the value refuses).
    """
    if not isinstance(template, str):
        raise InvalidInput(f"{what} must be a string, got {type(template).__name__}")
    try:
        return _Formatter(values, what).vformat(template, (), {})
    except InvalidInput:
        raise
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"{what} template is malformed: {exc}") from exc


class _Formatter(string.Formatter):
    """A formatter that resolves placeholders only by name, in mappings and models."""

    def __init__(self, values: Mapping[str, Any], what: str) -> None:
        self._values = values
        self._what = what

    def get_field(
        self, field_name: str, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> tuple[Any, str]:
        parts = field_name.split(".")
        if not all(part.isidentifier() for part in parts):
            raise InvalidInput(
                f"{self._what} placeholder {{{field_name}}} is not supported: use a field "
                "name, or dotted names for nested fields (no positions, no [index])",
                placeholder=field_name,
            )
        value: Any = self._values
        for depth, part in enumerate(parts):
            found, value = _lookup(value, part)
            if not found:
                where = ".".join(parts[:depth]) or "the input"
                raise InvalidInput(
                    f"{self._what} placeholder {{{field_name}}} has no value: {where} has "
                    f"no field {part!r} (it has: {_names(value)})",
                    placeholder=field_name,
                )
        return value, parts[0]


def _lookup(container: Any, name: str) -> tuple[bool, Any]:
    """Look ``name`` up in a mapping or among a model's fields; on a miss, return the container."""
    if isinstance(container, BaseModel):
        container = container.model_dump()
    if isinstance(container, Mapping) and name in container:
        return True, container[name]
    return False, container


def _names(container: Any) -> str:
    if isinstance(container, Mapping) and container:
        return ", ".join(sorted(str(key) for key in container))
    return "no fields" if isinstance(container, Mapping) else f"a {type(container).__name__}"
