"""The recorded form of an error: what the record keeps of an exception, always storable."""

from __future__ import annotations

import traceback
from collections.abc import Callable

from . import _json
from ._models import ErrorInfo
from .errors import StepFailed

_MAX_MESSAGE = 10_000
_MAX_TRACEBACK = 50_000


def _text(value: str, limit: int) -> str:
    # What the record can always hold: no NUL, no lone surrogate, bounded. Recording an
    # error must not fail, or the flow would be retried as if the record were down.
    value = _json.safe_text(value)
    return value if len(value) <= limit else value[:limit] + f"... [{len(value) - limit} more]"


def _safely(render: Callable[[], str]) -> str:
    try:
        return render()
    except Exception as exc:  # a user exception whose __str__ itself raises
        return f"<unprintable: {type(exc).__name__} while rendering the error>"


def error_json(exc: BaseException, *, step: str | None = None) -> str:
    """The recorded form of an error: type, message, traceback, structured details."""
    if isinstance(exc, StepFailed):
        info = ErrorInfo(
            type=_text(exc.error_type, 500),
            message=_text(exc.error_message, _MAX_MESSAGE),
            traceback=_text(exc.traceback, _MAX_TRACEBACK),
            step=None if exc.step is None else _text(exc.step, 500),
            details={"attempt": exc.attempt},
        )
    else:
        details = {
            k: _text(v, _MAX_MESSAGE) if isinstance(v, str) else v
            for k, v in getattr(exc, "_attrs", {}).items()
            if isinstance(v, str | int | float | bool | type(None))
        }
        info = ErrorInfo(
            type=_text(f"{type(exc).__module__}.{type(exc).__qualname__}", 500),
            message=_text(_safely(lambda: str(exc)), _MAX_MESSAGE),
            traceback=_text(
                _safely(lambda: "".join(traceback.format_exception(exc))), _MAX_TRACEBACK
            ),
            step=None if step is None else _text(step, 500),
            details=details,
        )
    return info.model_dump_json()
