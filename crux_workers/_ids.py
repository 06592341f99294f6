"""Identifiers the record can hold: flow ids, signal names and keys."""

from __future__ import annotations

from .errors import InvalidInput

MAX_ID = 200


def valid_id(value: object) -> bool:
    """Whether ``value`` is a non-empty string the record can store as an identifier."""
    # Postgres text holds neither NUL nor lone surrogates (which json.loads can produce).
    if not isinstance(value, str) or not value or len(value) > MAX_ID or "\x00" in value:
        return False
    if value.isascii():  # the common case, checked on every replayed checkpoint
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_id(value: object, what: str) -> None:
    """Refuse an identifier the record cannot hold (``InvalidInput``)."""
    if not valid_id(value):
        raise InvalidInput(
            f"{what} must be a non-empty string of at most {MAX_ID} characters, "
            "without NUL or unpaired surrogates"
        )
