"""Durations: ``"500ms"``, ``"90s"``, ``"15m"``, ``"24h"``, ``"7d"`` or a ``timedelta``."""

from __future__ import annotations

import math
import re
from datetime import timedelta

from .errors import InvalidDuration

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")

Duration = str | timedelta | int | float

# Far enough for any real timer, near enough that now + it is still a datetime.
MAX_SECONDS = 100 * 365 * 86400.0


def parse_duration(value: Duration, *, what: str = "duration") -> float:
    """Return the duration in seconds; raise ``InvalidDuration`` for anything unclear.

    Bare numbers are seconds. Zero and negative durations are refused: a timeout
    or a sleep of nothing is almost always a mistake in the caller.
    """
    if isinstance(value, bool):
        raise InvalidDuration(f"{what}: expected a duration like '90s', got {value!r}")
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _PATTERN.match(value)
        if match is None:
            raise InvalidDuration(
                f"{what}: {value[:40]!r} is not a duration; use e.g. '500ms', '90s', '15m', "
                "'24h', '7d' or a timedelta",
                value=value[:100],
            )
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise InvalidDuration(
            f"{what}: expected a duration string or timedelta, got {type(value).__name__}",
            value=repr(value),
        )
    if not seconds > 0:
        raise InvalidDuration(f"{what}: must be positive, got {value!r}", value=repr(value)[:100])
    if not math.isfinite(seconds) or seconds > MAX_SECONDS:
        raise InvalidDuration(
            f"{what}: {str(value)[:40]!r} is longer than the longest timer (100 years)",
            value=repr(value)[:100],
        )
    return seconds
