"""The memory store's state: its rows, and the lock that stands in for row locks."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

from ._types import FlowRow, RejectedRow, SignalRow, StepErrorRow, StepRow


@dataclasses.dataclass
class MemoryFlow:
    """A flow's row with its steps, signals and step errors."""

    id: str
    name: str
    status: str
    input: str
    created_at: datetime
    updated_at: datetime
    result: str | None = None
    error: str | None = None
    cancel_reason: str | None = None
    waiting_on: str | None = None
    deadline: datetime | None = None
    wake_at: datetime | None = None
    wake_kind: str | None = None
    lease_owner: str | None = None
    lease_until: datetime | None = None
    epoch: int = 0
    next_seq: int = 0
    runs: int = 0
    retry_attempt: int = 0
    finished_at: datetime | None = None
    steps: list[StepRow] = dataclasses.field(default_factory=list)
    signals: list[SignalRow] = dataclasses.field(default_factory=list)
    step_errors: list[StepErrorRow] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class MemoryTask:
    """A child task's row."""

    flow_id: str
    name: str
    task_id: str
    attempt: int
    call: str
    created_at: datetime
    sent_at: datetime
    status: str = "pending"
    result: str | None = None
    error: str | None = None
    sends: int = 1


class MemoryState:
    """Everything a ``MemoryStore`` holds, shared by its pieces."""

    def __init__(self, clock: Callable[[], datetime]) -> None:
        self.flows: dict[str, MemoryFlow] = {}
        self.tasks: dict[tuple[str, int], MemoryTask] = {}
        self.rejected: list[RejectedRow] = []
        self.lock = threading.RLock()
        self.now = clock


def flow_row(f: MemoryFlow, *, details: bool) -> FlowRow:
    """The flow as the store's plain row."""
    fields: dict[str, Any] = {
        k.name: getattr(f, k.name)
        for k in dataclasses.fields(FlowRow)
        if k.name not in ("steps", "signals", "step_errors")
    }
    # Plain strings, as the SQL store reads them back.
    fields["status"] = str(f.status)
    fields["wake_kind"] = None if f.wake_kind is None else str(f.wake_kind)
    if details:
        fields["steps"], fields["signals"] = list(f.steps), list(f.signals)
        fields["step_errors"] = list(f.step_errors)
    return FlowRow(**fields)
