"""Text bounds shared by every backend (no SQLAlchemy here)."""

from __future__ import annotations

from .._json import safe_text


def clip(value: str | None) -> str | None:
    """A refused message's short field, bounded like its column (it may carry anything)."""
    return safe_text(value)[:200] if isinstance(value, str) else None
