"""JSON in and out: the only encoding of every stored value and message."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from .errors import ValueTooLarge


def _default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return to_jsonable_python(value)


def dumps(value: Any) -> str:
    """Compact JSON; pydantic models, datetimes, UUIDs and dataclasses are converted.

    Raises ``TypeError`` or ``ValueError`` for anything JSON cannot hold (NaN included,
    which JSON has no spelling for).
    """
    return json.dumps(value, separators=(",", ":"), allow_nan=False, default=_default)


loads = json.loads

MAX_DEPTH = 100


def check_depth(value: Any, limit: int = MAX_DEPTH) -> None:
    """Raise ``ValueError`` if lists and dicts nest deeper than ``limit``.

    Deep nesting is refused up front: encoding, decoding and validating it recurse,
    and a stack overflow on a worker must not be what rejects a payload.
    """
    todo: list[tuple[Any, int]] = [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, dict | list | tuple):
            if depth > limit:
                raise ValueError(f"nested deeper than {limit} levels")
            children = item.values() if isinstance(item, dict) else item
            todo.extend((child, depth + 1) for child in children)


def check_size(text: str, limit: int, what: str) -> str:
    """Return ``text``; raise ``ValueTooLarge`` when its UTF-8 form is over ``limit`` bytes."""
    size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise ValueTooLarge(
            f"{what} is {size} bytes as JSON, over the limit of {limit} "
            "(CRUX_MAX_VALUE_BYTES); store large data elsewhere and keep a reference",
            size=size,
            limit=limit,
        )
    return text


def safe_text(text: str) -> str:
    """``text`` as Postgres can store it: NUL and unpaired surrogates backslash-escaped.

    For free text that quotes untrusted input (a refused message, an error detail):
    one bad byte there must not make the record refuse the write, again and again.
    """
    text = text.replace("\x00", "\\x00")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
