"""Pure helpers the console's pages and API share: text, times, JSON, cursors.

Nothing here touches the record or the web framework, so each piece is unit-tested
on its own.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime
from typing import Any

from .._cli_flows import safe

__all__ = [
    "ago",
    "countdown",
    "decode_cursor",
    "encode_cursor",
    "error_line",
    "json_text",
    "preview",
    "safe",
    "safe_lines",
    "span",
]


def safe_lines(text: str) -> str:
    """``safe`` line by line: newlines (and tabs) kept, every other control escaped."""
    return "\n".join(safe(line.replace("\t", "    ")) for line in text.split("\n"))


def _amount(seconds: float) -> str:
    seconds = abs(seconds)
    if seconds < 1:
        return "now"
    if seconds < 60:
        return f"{int(seconds)}s"
    minutes = seconds / 60
    if minutes < 60:
        rest = int(seconds % 60)
        return f"{int(minutes)}m" + (f" {rest}s" if rest and minutes < 10 else "")
    hours = minutes / 60
    if hours < 48:
        rest = int(minutes % 60)
        return f"{int(hours)}h" + (f" {rest}m" if rest and hours < 10 else "")
    return f"{int(hours / 24)}d"


def ago(when: datetime | None, now: datetime) -> str:
    """``when`` relative to ``now``, for a past time: "12s ago", "3h 5m ago", "4d ago"."""
    if when is None:
        return "-"
    text = _amount((now - when).total_seconds())
    return "just now" if text == "now" else f"{text} ago"


def countdown(when: datetime | None, now: datetime) -> str:
    """How long until ``when``: "in 4m 10s", or "overdue 2m" once it has passed."""
    if when is None:
        return "-"
    left = (when - now).total_seconds()
    text = _amount(left)
    if text == "now":
        return "now"
    return f"in {text}" if left > 0 else f"overdue {text}"


def span(start: datetime | None, end: datetime | None) -> str:
    """The duration between two times: "35ms", "2.4s", "3m 2s"; "-" when one is missing."""
    if start is None or end is None:
        return "-"
    seconds = (end - start).total_seconds()
    if seconds < 1:
        return f"{max(seconds, 0) * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    return _amount(seconds)


def json_text(value: Any, *, indent: int | None = 2) -> str:
    """``value`` as JSON text for a page; non-ASCII and control characters as escapes."""
    return json.dumps(value, indent=indent, ensure_ascii=True, sort_keys=False, default=str)


def preview(value: Any, width: int = 80) -> str:
    """One line of JSON (a string shown as is), cut to ``width`` with an ellipsis."""
    text = safe(value) if isinstance(value, str) else json_text(value, indent=None)
    return text if len(text) <= width else text[: width - 1] + "…"


def error_line(error_json: str | None, width: int = 70) -> str:
    """A recorded error (``ErrorInfo`` JSON) as one short line: "RuntimeError: refused"."""
    if not error_json:
        return ""
    try:
        error = json.loads(error_json)
        kind = str(error.get("type", "error")).rsplit(".", 1)[-1]
        text = f"{kind}: {error.get('message', '')}"
    except (ValueError, AttributeError):
        text = error_json
    return preview(text.splitlines()[0] if text else "", width)


def encode_cursor(created_at: datetime, flow_id: str) -> str:
    """The keyset cursor after a row: opaque, URL-safe text."""
    raw = json.dumps([created_at.astimezone(UTC).isoformat(), flow_id])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(text: str) -> tuple[datetime, str]:
    """The ``(created_at, id)`` a cursor stands for; ``ValueError`` for anything else."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        at, flow_id = json.loads(raw)
        when = datetime.fromisoformat(at)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError("not a cursor this console made") from exc
    if not isinstance(flow_id, str) or when.tzinfo is None:
        raise ValueError("not a cursor this console made")
    return when, flow_id
