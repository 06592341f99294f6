"""The memory store's state: its rows, and the lock that stands in for row locks."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from ..errors import FlowNotFound, LeaseLost, RecordRefused
from . import _lifecycle as life
from ._lifecycle import FlowStatus, TaskStatus
from ._types import Checkpoint, FlowRow, Lease, RejectedRow, SignalRow, StepErrorRow, StepRow


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
    lapses: int = 0
    history_digest: str | None = None
    finished_at: datetime | None = None
    waiting_schema: str | None = None
    forked_from: str | None = None
    forked_at: int | None = None
    retries: int = 0
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
    status: str = TaskStatus.PENDING
    result: str | None = None
    error: str | None = None
    sends: int = 1


class MemoryState:
    """Everything a ``MemoryStore`` holds, shared by its pieces."""

    def __init__(self, clock: Callable[[], datetime]) -> None:
        self.flows: dict[str, MemoryFlow] = {}
        self.tasks: dict[tuple[str, int], MemoryTask] = {}
        self.rejected: list[RejectedRow] = []
        self.rejected_ids = 0
        self.lock = threading.RLock()
        self.now = clock
        self.commits = 0

    def get(self, flow_id: str) -> MemoryFlow:
        """The flow, or ``FlowNotFound``."""
        flow = self.flows.get(flow_id)
        if flow is None:
            raise FlowNotFound(f"no flow {flow_id!r}", flow_id=flow_id)
        return flow

    def fenced(self, lease: Lease) -> MemoryFlow:
        """The flow if ``lease`` still holds it, else ``LeaseLost``."""
        flow = self.flows.get(lease.flow_id)
        if flow is None or not life.holds_lease(
            flow.status, flow.epoch, lease.epoch, flow.lease_owner, lease.owner
        ):
            raise LeaseLost(f"flow {lease.flow_id}: epoch {lease.epoch} no longer holds the lease")
        return flow

    def touch(self, lease: Lease, ttl: float) -> MemoryFlow:
        """The fenced write every executor call starts with: extend the lease."""
        flow = self.fenced(lease)
        now = self.now()
        flow.lease_until = now + timedelta(seconds=ttl)
        flow.updated_at = now
        return flow

    def insert_step(
        self, flow: MemoryFlow, cp: Checkpoint, started_at: datetime | None, attempts: int
    ) -> None:
        """Append a checkpoint; a second one at the same seq or name is refused."""
        if any(
            s.seq == cp.seq or (s.name, s.occurrence) == (cp.name, cp.occurrence)
            for s in flow.steps
        ):
            raise RecordRefused(f"checkpoint {cp.seq} of flow {flow.id} exists already")
        flow.steps.append(
            StepRow(
                cp.seq,
                cp.kind,
                cp.name,
                cp.occurrence,
                cp.result,
                attempts,
                started_at,
                self.now(),
            )
        )
        flow.next_seq = cp.seq + 1
        flow.history_digest = life.next_digest(
            flow.history_digest, cp.seq, cp.kind, cp.name, cp.occurrence, cp.result
        )
        flow.lapses = 0  # a checkpoint is progress
        self.commits += 1

    def cancel_requested(self, flow: MemoryFlow) -> bool:
        """After the fenced touch: end the flow cancelled if that was asked."""
        if flow.cancel_reason is None:
            return False
        self.end(flow, FlowStatus.CANCELLED)
        return True

    def end(self, flow: MemoryFlow, status: str) -> None:
        """Give the flow a terminal status: it no longer has a lease, a wake or a wait."""
        flow.status, flow.finished_at = status, self.now()
        flow.updated_at = flow.finished_at
        flow.lease_owner = flow.lease_until = flow.wake_at = flow.wake_kind = None
        flow.waiting_on = flow.deadline = flow.waiting_schema = None
        flow.lapses = 0

    def suspend(self, flow: MemoryFlow, wake_at: datetime | None, kind: str | None) -> None:
        """Suspend the flow until ``wake_at`` (for ``kind``) and free its lease."""
        flow.status = FlowStatus.SUSPENDED
        flow.lease_owner = flow.lease_until = None
        flow.lapses = 0  # a suspend is progress
        flow.wake_at, flow.wake_kind = wake_at, kind


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
