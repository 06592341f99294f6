"""The one side-effect ledger: a file the test flows append to, one line per effect.

Flows in worker processes write a line with a single O_APPEND write (so lines from many
processes never interleave) to the file named by ``CRUXTEST_EFFECTS``; the test reads it
back. ``Effects`` is the file and the bounded wait; the two line formats the flows write
are its two parsers:

- ``StepEffects``: ``flow_id step pid``, written by tests/integration/flows.py and
  tests/integration/children.py;
- ``EventEffects``: ``kind flow_id name occurrence attempt pid unix_time token``, tab
  separated, written by tests/faults/flows.py (see its docstring).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

R = TypeVar("R")


class Effects(Generic[R]):
    """The effects file; ``parse`` turns one line into a record."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.touch()

    def parse(self, line: str) -> R:
        raise NotImplementedError

    def records(self) -> list[R]:
        return [self.parse(line) for line in self.path.read_text().splitlines()]

    def wait_until(self, pred: Callable[[R], bool], timeout: float, what: str) -> R:
        """The first record matching ``pred``, waiting up to ``timeout`` seconds for it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.records():
                if pred(record):
                    return record
            time.sleep(0.02)
        raise TimeoutError(f"no {what} within {timeout}s")


StepLine = tuple[str, str, int]  # flow_id, step, pid


class StepEffects(Effects[StepLine]):
    """Integration flows: one line ``flow_id step pid`` per call."""

    def parse(self, line: str) -> StepLine:
        flow_id, step, pid = line.split(" ")
        return flow_id, step, int(pid)

    def lines(self) -> list[StepLine]:
        return self.records()

    def count(self, flow_id: str | None = None) -> Counter[str]:
        """How often each step ran (of one flow, or of all)."""
        return Counter(s for f, s, _ in self.lines() if flow_id is None or f == flow_id)

    def wait_for(self, step: str, timeout: float = 20) -> StepLine:
        return self.wait_until(lambda line: line[1] == step, timeout, f"side effect {step!r}")


@dataclass(frozen=True, slots=True)
class Event:
    """One line of the fault flows' effects file (see tests/faults/flows.py)."""

    kind: str
    flow_id: str
    name: str
    occurrence: int
    attempt: int
    pid: int
    t: float
    token: str


class EventEffects(Effects[Event]):
    """Fault flows: one tab-separated ``Event`` per step start or gap."""

    def parse(self, line: str) -> Event:
        kind, flow_id, name, occ, attempt, pid, t, token = line.split("\t")
        return Event(kind, flow_id, name, int(occ), int(attempt), int(pid), float(t), token)

    def events(self) -> list[Event]:
        return self.records()

    def wait_for(self, pred: Callable[[Event], bool], timeout: float = 60) -> Event:
        return self.wait_until(pred, timeout, "matching side effect")
