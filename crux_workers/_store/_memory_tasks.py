"""``run_task`` in memory: the child's row is the flow's inbox for its outcome."""

from __future__ import annotations

from datetime import datetime, timedelta

from ..errors import NonDeterminismError
from . import _lifecycle as life
from ._lifecycle import CheckpointKind, TaskStatus, WakeKind, task_id_for
from ._memory_state import MemoryFlow, MemoryState, MemoryTask
from ._types import Checkpoint, Lease, SuspendOutcome, TaskError, TaskPoint, TaskSend


class MemoryTasks:
    """Child tasks in memory: ``take_task_or_send`` and ``complete_task``."""

    def __init__(self, state: MemoryState) -> None:
        self._s = state

    def take_task_or_send(
        self, lease: Lease, point: TaskPoint, ttl: float
    ) -> Checkpoint | TaskSend | TaskError | SuspendOutcome:
        """The child task's outcome as a checkpoint, or what to do about it."""
        with self._s.lock:
            flow = self._s.touch(lease, ttl)
            if self._s.cancel_requested(flow):
                return "cancelled"
            now = self._s.now()
            row = self._s.tasks.get((flow.id, point.seq))
            if row is not None and row.name != point.name:
                raise NonDeterminismError(
                    f"flow {flow.id}: checkpoint {point.seq} started child task {row.name!r}, "
                    f"the replay asked for {point.name!r}",
                    flow_id=flow.id,
                    seq=point.seq,
                    expected=f"task {row.name!r}",
                    actual=f"task {point.name!r}",
                )
            if row is None or life.sends_new_attempt(row.status, row.attempt, point.attempt):
                row = MemoryTask(
                    flow.id,
                    point.name,
                    task_id_for(flow.id, point.seq, point.attempt),
                    point.attempt,
                    point.call,
                    # As the SQL row: a new attempt keeps the first attempt's creation.
                    created_at=now if row is None else row.created_at,
                    sent_at=now,
                )
                self._s.tasks[(flow.id, point.seq)] = row
                self._wait_for_child(flow, point, now)
                return TaskSend(row.task_id, row.call)
            if row.status == TaskStatus.SUCCEEDED:
                assert row.result is not None
                cp = Checkpoint(
                    point.seq, CheckpointKind.TASK.value, point.name, point.occurrence, row.result
                )
                self._s.insert_step(flow, cp, row.created_at, row.attempt)
                flow.retry_attempt = 0
                flow.waiting_on = None
                return cp
            if row.status == TaskStatus.FAILED:
                assert row.error is not None
                return TaskError(row.error)
            if life.task_send_stale(row.sent_at, point.resend_after, now):
                row.sends += 1
                row.sent_at = now
                self._wait_for_child(flow, point, now)
                return TaskSend(row.task_id, row.call)
            self._wait_for_child(flow, point, row.sent_at)
            return "suspended"

    def _wait_for_child(self, flow: MemoryFlow, point: TaskPoint, sent_at: datetime) -> None:
        self._s.suspend(flow, sent_at + timedelta(seconds=point.resend_after), WakeKind.TASK)
        flow.waiting_on, flow.deadline = f"task:{point.name}", None

    def forget_failed(self, flow_id: str, seq: int) -> None:
        """A retried flow: the failed child at ``seq`` is superseded by a new attempt 1."""
        row = self._s.tasks.get((flow_id, seq))
        if row is not None and row.status == TaskStatus.FAILED:
            row.attempt = 0

    def complete_task(
        self, task_id: str, *, result: str | None, error: str | None
    ) -> tuple[str, str] | None:
        """Record a child's outcome once; the (flow name, flow id) to wake, if any."""
        with self._s.lock:
            row = next((t for t in self._s.tasks.values() if t.task_id == task_id), None)
            if row is None:
                life.refuse_outcome(task_id)
                return None
            if row.status != TaskStatus.PENDING:
                return None
            row.status = life.task_outcome(error)
            row.result, row.error = result, error
            flow = self._s.flows.get(row.flow_id)
            if flow is not None and life.child_outcome_wakes(flow.status, flow.wake_kind):
                flow.wake_at, flow.wake_kind = self._s.now(), WakeKind.RUN
                return flow.name, flow.id
            return None
