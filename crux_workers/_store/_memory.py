"""``CruxStore`` in memory: the reference for unit tests of the engine.

It keeps the same contract as the SQL store (the contract suite runs against
both) and calls the same rules (``_lifecycle``); one lock stands in for the row
locks and transactions. Composed like the SQL store: the rows and the fenced
helpers in ``_memory_state``, child tasks in ``_memory_tasks``, the operator's
side in ``_memory_admin``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Literal

from .._json import safe_text
from ..errors import (
    FlowAlreadyFinished,
    FlowNotWaiting,
    LeaseLost,
)
from . import _lifecycle as life
from ._clock import utcnow
from ._lifecycle import (
    CheckpointKind,
    FlowStatus,
    SignalStatus,
    WakeKind,
)
from ._memory_admin import MemoryAdmin
from ._memory_ops import MemoryOps
from ._memory_state import MemoryFlow, MemoryState, flow_row
from ._memory_tasks import MemoryTasks
from ._roles import CruxStore
from ._types import (
    Checkpoint,
    Claimed,
    FlowFilter,
    FlowPage,
    FlowRow,
    Lease,
    MetricsSnapshot,
    NotClaimed,
    RecordOverview,
    RejectedRow,
    SchemaCheck,
    SignalResult,
    SignalRow,
    StepCommit,
    StepErrorRow,
    SuspendOutcome,
    Suspension,
    SweepResult,
    TaskError,
    TaskPoint,
    TaskSend,
    Validator,
    WaitRow,
)


class MemoryStore:
    """``CruxStore`` in a dict under one lock."""

    def __init__(self, clock: Callable[[], datetime] = utcnow) -> None:
        self._s = state = MemoryState(clock)
        self._flows, self._lock, self._now = state.flows, state.lock, clock
        self._tasks = MemoryTasks(state)
        self._admin = MemoryAdmin(state)
        self._ops = MemoryOps(state, self._tasks)
        self._signal_ids = 0
        self._ticks: set[int] = set()
        self._last_sweep: datetime | None = None

    @property
    def commits(self) -> int:
        """Checkpoints committed so far (for tests that count round trips)."""
        return self._s.commits

    def create_flow(self, flow_id: str, name: str, input_json: str) -> tuple[FlowRow, bool]:
        """Insert a pending flow, or return the existing row."""
        with self._lock:
            if flow_id in self._flows:
                return flow_row(self._flows[flow_id], details=False), False
            now = self._now()
            flow = MemoryFlow(flow_id, name, FlowStatus.PENDING, input_json, now, now, wake_at=now)
            flow.wake_kind = WakeKind.RUN
            self._flows[flow_id] = flow
            return flow_row(flow, details=False), True

    def create_flows(self, items: Sequence[tuple[str, str, str]]) -> list[tuple[FlowRow, bool]]:
        """Insert many pending flows at once; all or nothing."""
        return self._ops.create_flows(items)

    def claim(
        self, flow_id: str, owner: str, ttl: float, *, max_lapses: int | None = None
    ) -> Claimed | NotClaimed:
        """Take the lease if it is free; park a flow that took ``max_lapses`` lapses."""
        with self._lock:
            now = self._now()
            flow = self._flows.get(flow_id)
            if flow is None:
                return NotClaimed("missing")
            if life.is_terminal(flow.status):
                return NotClaimed("finished")
            if not life.claimable(
                flow.status, flow.wake_kind, flow.wake_at, flow.lease_owner, flow.lease_until, now
            ):
                if life.lease_busy(flow.lease_owner, flow.lease_until, now):
                    assert flow.lease_until is not None
                    return NotClaimed("busy", (flow.lease_until - now).total_seconds())
                return NotClaimed("idle")
            woke_at, woke_by = flow.wake_at, flow.wake_kind
            flow.lapses = life.lapses_after_claim(flow.lease_owner, flow.lapses)
            flow.status = FlowStatus.RUNNING
            flow.lease_owner, flow.lease_until = owner, now + timedelta(seconds=ttl)
            flow.epoch += 1
            flow.runs += 1
            flow.wake_at = flow.wake_kind = None
            flow.updated_at = now
            if life.parks(flow.lapses, max_lapses):
                lapses = flow.lapses
                self._s.end(flow, FlowStatus.FAILED)
                flow.error = life.crash_loop_error(lapses)
                return NotClaimed("parked")
            return Claimed(
                Lease(flow_id, owner, flow.epoch),
                flow.name,
                flow.input,
                flow.next_seq,
                failed_attempts=flow.retry_attempt,
                cancel_requested=flow.cancel_reason is not None,
                woke_at=woke_at,
                woke_by=None if woke_by is None else str(woke_by),
                runs=flow.runs,
                history_digest=flow.history_digest,
            )

    def renew(self, lease: Lease, ttl: float) -> bool:
        """Extend the lease; False when it was lost."""
        with self._lock:
            try:
                flow = self._s.fenced(lease)
            except LeaseLost:
                return False
            flow.lease_until = self._now() + timedelta(seconds=ttl)
            return True

    def release(self, lease: Lease) -> None:
        """Give the lease up without changing the flow."""
        with self._lock:
            try:
                flow = self._s.fenced(lease)
            except LeaseLost:
                return
            flow.lease_owner = flow.lease_until = None
            flow.wake_at, flow.wake_kind = self._now(), WakeKind.RUN

    def load_checkpoints(self, flow_id: str) -> list[Checkpoint]:
        """All committed checkpoints of the flow, in sequence order."""
        with self._lock:
            flow = self._flows.get(flow_id)
            rows = list(flow.steps) if flow else []
        return [Checkpoint(r.seq, r.kind, r.name, r.occurrence, r.result) for r in rows]

    def commit_checkpoint(
        self, lease: Lease, cp: Checkpoint, *, started_at: datetime, attempts: int, ttl: float
    ) -> bool:
        """Commit a checkpoint if ``lease`` still holds; True if the flow is now cancelled."""
        with self._lock:
            return self._commit(lease, StepCommit(cp, started_at, attempts), ttl)

    def _commit(self, lease: Lease, step: StepCommit, ttl: float) -> bool:
        """Commit ``step`` (the caller holds the lock); True if the flow is now cancelled."""
        flow = self._s.touch(lease, ttl)
        self._s.insert_step(flow, step.cp, step.started_at, step.attempts)
        flow.retry_attempt = 0
        return self._s.cancel_requested(flow)

    def now(self) -> datetime:
        """The store's clock."""
        return self._now()

    def fail_step(
        self,
        lease: Lease,
        seq: int,
        name: str,
        attempt: int,
        error: str,
        retry_in: float | None,
    ) -> SuspendOutcome | Literal["failed"]:
        """Record a failed attempt; back off until ``retry_in`` seconds, or fail the flow."""
        with self._lock:
            flow = self._s.touch(lease, 1.0)
            now = self._now()
            recorded = max((e.attempt for e in flow.step_errors if e.seq == seq), default=None)
            number = life.error_number(attempt, recorded)
            flow.step_errors.append(StepErrorRow(seq, number, name, error, now))
            if self._s.cancel_requested(flow):
                return "cancelled"
            if retry_in is None:
                self._s.end(flow, FlowStatus.FAILED)
                flow.error = error
                return "failed"
            flow.retry_attempt = attempt
            flow.waiting_on = flow.deadline = None
            self._s.suspend(flow, now + timedelta(seconds=retry_in), WakeKind.RETRY)
            return "suspended"

    def suspend_until(self, lease: Lease, wake_at: datetime, kind: str) -> SuspendOutcome:
        """Suspend until ``wake_at``."""
        with self._lock:
            flow = self._s.touch(lease, 1.0)
            if self._s.cancel_requested(flow):
                return "cancelled"
            flow.waiting_on = flow.deadline = None
            self._s.suspend(flow, wake_at, kind)
            return "suspended"

    def poll_later(self, lease: Lease, point: Suspension, every: float) -> SuspendOutcome:
        """Look again in ``every`` seconds, or expire past the deadline."""
        with self._lock:
            flow = self._s.touch(lease, 1.0)
            if self._s.cancel_requested(flow):
                return "cancelled"
            now = self._now()
            deadline = life.deadline(point.name, point.timeout, flow.waiting_on, flow.deadline, now)
            if life.expired(deadline, now):
                self._s.end(flow, FlowStatus.EXPIRED)
                return "expired"
            flow.waiting_on, flow.deadline = point.name, deadline
            wake_at = life.poll_wake(now + timedelta(seconds=every), deadline)
            self._s.suspend(flow, wake_at, WakeKind.POLL)
            return "suspended"

    def cancel(self, flow_id: str, reason: str) -> str:
        """Cancel at once, or at the running executor's next step."""
        with self._lock:
            flow = self._s.get(flow_id)
            if life.is_terminal(flow.status):
                raise FlowAlreadyFinished(
                    f"flow {flow_id!r} is already {flow.status}; nothing to cancel",
                    flow_id=flow_id,
                    status=str(flow.status),
                )
            flow.cancel_reason = reason
            if life.cancels_at_next_step(
                flow.status, flow.lease_owner, flow.lease_until, self._now()
            ):
                return "cancelling"
            self._s.end(flow, FlowStatus.CANCELLED)
            return "cancelled"

    def claim_tick(self, tick: int) -> bool:
        """True for the first sweep of a tick."""
        with self._lock:
            if tick in self._ticks:
                return False
            self._ticks.add(tick)
            self._last_sweep = self._now()
            return True

    def sweep(self, *, limit: int, redrive_after: float) -> SweepResult:
        """Expire overdue suspends; mark due and stalled flows and return them to publish."""
        with self._lock:
            now = self._now()
            result = SweepResult()
            # As the SQL sweep: at most ``limit`` due flows and ``limit`` stalled ones.
            taken = {"due": 0, "stalled": 0}
            for flow in list(self._flows.values()):
                action = life.sweep_action(
                    flow.status, flow.wake_kind, flow.wake_at, flow.lease_until, now, redrive_after
                )
                if action is None:
                    continue
                which = "stalled" if flow.wake_at is None else "due"
                if taken[which] >= limit:
                    continue
                taken[which] += 1
                if action == "expire":
                    self._s.end(flow, FlowStatus.EXPIRED)
                    result.expired.append(flow.id)
                else:
                    flow.wake_kind, flow.wake_at = WakeKind.RUN, now
                    result.due.append((flow.name, flow.id))
            return result

    def take_signal_or_suspend(
        self,
        lease: Lease,
        point: Suspension,
        validate: Validator,
        ttl: float,
        *,
        step: StepCommit | None = None,
    ) -> Checkpoint | SuspendOutcome:
        """Consume the oldest valid pending signal of that name as a checkpoint, or suspend."""
        with self._lock:
            if step is not None and self._commit(lease, step, ttl):
                return "cancelled"
            flow = self._s.touch(lease, ttl)
            if self._s.cancel_requested(flow):
                return "cancelled"
            for i, sig in enumerate(flow.signals):
                if sig.name != point.name or sig.status != SignalStatus.PENDING:
                    continue
                try:
                    result = validate(sig.payload)
                except ValueError as exc:
                    flow.signals[i] = dataclasses.replace(
                        sig,
                        status=SignalStatus.REJECTED.value,
                        error=safe_text(str(exc)),
                        consumed_at=self._now(),
                    )
                    continue
                flow.signals[i] = dataclasses.replace(
                    sig,
                    status=SignalStatus.CONSUMED.value,
                    consumed_seq=point.seq,
                    consumed_at=self._now(),
                )
                cp = Checkpoint(
                    point.seq, CheckpointKind.SUSPEND.value, point.name, point.occurrence, result
                )
                self._s.insert_step(flow, cp, None, 1)
                flow.waiting_on = flow.deadline = flow.waiting_schema = None
                return cp
            now = self._now()
            deadline = life.deadline(point.name, point.timeout, flow.waiting_on, flow.deadline, now)
            if life.expired(deadline, now):
                self._s.end(flow, FlowStatus.EXPIRED)
                return "expired"
            flow.waiting_on, flow.deadline = point.name, deadline
            flow.waiting_schema = point.schema
            self._s.suspend(flow, *life.signal_wait(deadline))
            return "suspended"

    def finish(
        self,
        lease: Lease,
        status: str,
        *,
        result: str | None = None,
        error: str | None = None,
        step: StepCommit | None = None,
    ) -> str:
        """End the flow with a terminal status if ``lease`` still holds; returns the status."""
        with self._lock:
            if step is not None and self._commit(lease, step, 1.0):
                return FlowStatus.CANCELLED.value
            flow = self._s.fenced(lease)
            self._s.end(flow, status)
            flow.result, flow.error = result, error
            return status

    def record_signal(
        self,
        flow_id: str,
        name: str,
        payload: str,
        key: str | None,
        *,
        check: SchemaCheck | None = None,
    ) -> SignalResult:
        """Durably record a signal; raise ``FlowNotFound`` or ``FlowNotWaiting``."""
        with self._lock:
            flow = self._s.get(flow_id)
            if key is not None:
                for sig in flow.signals:
                    if sig.key == key:
                        return SignalResult(sig.id, flow.name, duplicate=True, wake=False)
            if not life.accepts_signal(flow.status):
                raise FlowNotWaiting(
                    f"flow {flow_id!r} is {flow.status}; signal {name!r} refused",
                    flow_id=flow_id,
                    status=str(flow.status),
                    signal=name,
                )
            if check is not None and life.checks_at_send(
                flow.status, flow.waiting_on, flow.waiting_schema, name
            ):
                assert flow.waiting_schema is not None
                check(flow.waiting_schema)
            self._signal_ids += 1
            now = self._now()
            flow.signals.append(
                SignalRow(
                    self._signal_ids,
                    name,
                    payload,
                    key,
                    SignalStatus.PENDING.value,
                    None,
                    None,
                    now,
                    None,
                )
            )
            wake = life.signal_wakes(flow.status, flow.waiting_on, name)
            if wake:
                flow.wake_at, flow.wake_kind, flow.updated_at = now, WakeKind.RUN, now
            return SignalResult(self._signal_ids, flow.name, duplicate=False, wake=wake)

    def request_resume(self, flow_id: str) -> str:
        """Mark a suspended flow as due now; return its flow name."""
        with self._lock:
            flow = self._s.get(flow_id)
            if life.is_terminal(flow.status):
                raise FlowNotWaiting(
                    f"flow {flow_id!r} is {flow.status}", flow_id=flow_id, status=str(flow.status)
                )
            if life.resume_wakes(flow.status):
                flow.wake_at, flow.wake_kind = self._now(), WakeKind.RUN
            return flow.name

    def retry_flow(self, flow_id: str) -> str:
        """Make a failed flow due again from its last checkpoint; return its flow name."""
        return self._ops.retry_flow(flow_id)

    def fork_flow(self, source_id: str, new_id: str, at: int, input_json: str | None) -> FlowRow:
        """A new pending flow with the first ``at`` checkpoints of ``source_id``, due now."""
        return self._ops.fork_flow(source_id, new_id, at, input_json)

    def get_flow(self, flow_id: str, *, details: bool = True) -> FlowRow:
        """The flow's row, with steps and signals when ``details``."""
        with self._lock:
            return flow_row(self._s.get(flow_id), details=details)

    def take_task_or_send(
        self, lease: Lease, point: TaskPoint, ttl: float
    ) -> Checkpoint | TaskSend | TaskError | SuspendOutcome:
        """The child task's outcome as a checkpoint, or what to do about it."""
        return self._tasks.take_task_or_send(lease, point, ttl)

    def complete_task(
        self, task_id: str, *, result: str | None, error: str | None
    ) -> tuple[str, str] | None:
        """Record a child's outcome once; the (flow name, flow id) to wake, if any."""
        return self._tasks.complete_task(task_id, result=result, error=error)

    def list_flows(self, where: FlowFilter) -> list[FlowRow]:
        """Flows matching ``where``, newest first, without steps or signals."""
        return self._admin.list_flows(where)

    def page_flows(self, page: FlowPage) -> list[FlowRow]:
        """One page of flows matching ``page``, newest first, without steps or signals."""
        return self._admin.page_flows(page)

    def overview(self) -> RecordOverview:
        """Flow counts by status, the due backlog and the last sweep, in one read."""
        return self._admin.overview()

    def purge_finished(self, before: datetime) -> int:
        """Delete finished flows (all their rows), and refused messages, from before ``before``."""
        return self._admin.purge_finished(before)

    def waiting(self, name: str | None = None) -> list[WaitRow]:
        """Suspended flows (of ``name``) grouped by what they wait on; woken ones excluded."""
        return self._admin.waiting(name)

    def purge_rejected(self, before: datetime) -> int:
        """Delete refused ingress messages received before ``before``; how many."""
        return self._admin.purge_rejected(before)

    def record_rejected(
        self,
        reason: str,
        detail: str,
        raw: str,
        *,
        flow_id: str | None = None,
        name: str | None = None,
        key: str | None = None,
    ) -> int:
        """Keep a refused ingress message with its reason; returns its id."""
        return self._admin.record_rejected(reason, detail, raw, flow_id=flow_id, name=name, key=key)

    def list_rejected(self, limit: int = 100) -> list[RejectedRow]:
        """The most recently refused ingress messages, newest first."""
        return self._admin.list_rejected(limit)

    def metrics_snapshot(self) -> MetricsSnapshot:
        """Counts for the metrics gauges (see ``MetricsSnapshot``)."""
        return self._admin.metrics_snapshot(self._last_sweep)

    def close(self) -> None:
        """Nothing to release."""


def _conforms(store: MemoryStore) -> CruxStore:
    # mypy checks here that MemoryStore is a whole ``CruxStore``.
    return store
