"""The one fake clock: stores, the engine and tests read the same ``now``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

START = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)


class Clock:
    """A clock that only moves when a test calls ``advance``."""

    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
