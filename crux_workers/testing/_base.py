"""The kit's small types: its errors, the virtual clock, time points and advance reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from ..errors import CruxError, InvalidInput


class TestingError(CruxError):
    """The environment cannot go on: a flow keeps re-enqueueing, or waits for nothing."""

    __test__ = False  # not a pytest test class


class SimulatedCrash(BaseException):
    """Raised inside an execution to stand for its process dying there (``crash_test``).

    A ``BaseException``, like the engine's own control flow: the engine records
    nothing for it, so the record is left as a killed worker would leave it.
    """


class VirtualClock:
    """The environment's clock: it moves only when the environment advances it."""

    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None:
            raise InvalidInput("the virtual clock starts at an aware datetime (tzinfo=UTC)")
        self.now = start.astimezone(UTC)

    def __call__(self) -> datetime:
        return self.now

    def move_to(self, when: datetime) -> None:
        """Move forward to ``when`` (never back)."""
        if when > self.now:
            self.now = when


@dataclass(frozen=True, slots=True, order=True)
class TimePoint:
    """A moment something in the record is due: a timer, an expiry, a lapsed lease."""

    at: datetime
    flow_id: str = field(compare=False)
    flow_name: str = field(compare=False)
    kind: str = field(compare=False)


@dataclass(frozen=True, slots=True)
class AdvanceReport:
    """What ``advance`` did: the time points it fired, in order, and those still ahead."""

    started_at: datetime
    ended_at: datetime
    fired: list[TimePoint]
    upcoming: list[TimePoint]
