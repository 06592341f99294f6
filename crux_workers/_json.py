"""JSON in and out: the only encoding of every stored value and message."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python


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
