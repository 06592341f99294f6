"""``run_task`` on the SQL record: the child task's row is the flow's inbox for its outcome.

Lock order is the same as for signals: the flow's row first, then the task's, so a
completion racing a suspend either is seen by it or finds the flow suspended and
wakes it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, insert, select, update

from ..errors import NonDeterminismError
from ._clock import aware
from ._schema import flows, tasks
from ._types import Checkpoint, Lease, SuspendOutcome, TaskError, TaskPoint, TaskSend


def task_id_for(flow_id: str, seq: int, attempt: int) -> str:
    """The child's Celery task id: stable per attempt, so a resend is recognisable."""
    return f"crux:{flow_id}:{seq}:{attempt}"


class SqlTasks:
    """Mixin of ``SqlStore``: child tasks."""

    _now: Callable[[], datetime]

    def _tx(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def _touch(self, conn: Connection, lease: Lease, ttl: float, **values: Any) -> Any:
        raise NotImplementedError

    def _end(self, conn: Connection, flow_id: str, status: str, **values: Any) -> None:
        raise NotImplementedError

    def _insert_step(
        self,
        conn: Connection,
        lease: Lease,
        cp: Checkpoint,
        *,
        started_at: datetime | None,
        attempts: int,
    ) -> None:
        raise NotImplementedError

    def take_task_or_send(
        self, lease: Lease, point: TaskPoint, ttl: float
    ) -> Checkpoint | TaskSend | TaskError | SuspendOutcome:
        """The child task's outcome as a checkpoint, or what to do about it."""
        t = tasks.c
        with self._tx() as conn:
            waiting = self._touch(conn, lease, ttl)
            if waiting.cancel_reason is not None:
                self._end(conn, lease.flow_id, "cancelled")
                return "cancelled"
            row = conn.execute(
                select(tasks).where(t.flow_id == lease.flow_id, t.seq == point.seq)
            ).first()
            now = self._now()
            if row is not None and row.name != point.name:
                raise NonDeterminismError(
                    f"flow {lease.flow_id}: checkpoint {point.seq} started child task "
                    f"{row.name!r}, the replay asked for {point.name!r}",
                    flow_id=lease.flow_id,
                    seq=point.seq,
                    expected=f"task {row.name!r}",
                    actual=f"task {point.name!r}",
                )
            if row is None or (row.status == "failed" and row.attempt < point.attempt):
                send = TaskSend(task_id_for(lease.flow_id, point.seq, point.attempt), point.call)
                values = dict(
                    name=point.name,
                    task=point.task,
                    task_id=send.task_id,
                    attempt=point.attempt,
                    call=point.call,
                    status="pending",
                    result=None,
                    error=None,
                    sends=1,
                    sent_at=now,
                    completed_at=None,
                )
                if row is None:
                    conn.execute(
                        insert(tasks).values(
                            flow_id=lease.flow_id, seq=point.seq, created_at=now, **values
                        )
                    )
                else:
                    conn.execute(
                        update(tasks)
                        .where(t.flow_id == lease.flow_id, t.seq == point.seq)
                        .values(**values)
                    )
                self._wait_for_child(conn, lease, point, now + _secs(point.resend_after))
                return send
            if row.status == "succeeded":
                cp = Checkpoint(point.seq, "task", point.name, point.occurrence, row.result)
                conn.execute(
                    update(flows)
                    .where(flows.c.id == lease.flow_id)
                    .values(next_seq=point.seq + 1, retry_attempt=0, waiting_on=None)
                )
                self._insert_step(
                    conn, lease, cp, started_at=aware(row.created_at), attempts=row.attempt
                )
                return cp
            if row.status == "failed":
                return TaskError(row.error)
            # Still running. Re-send only once the last send is older than resend_after:
            # a replay or a stray resume must never dispatch the child again.
            sent_at = aware(row.sent_at) or now
            if sent_at + _secs(point.resend_after) <= now:
                conn.execute(
                    update(tasks)
                    .where(t.flow_id == lease.flow_id, t.seq == point.seq)
                    .values(sends=t.sends + 1, sent_at=now)
                )
                self._wait_for_child(conn, lease, point, now + _secs(point.resend_after))
                return TaskSend(row.task_id, row.call)
            self._wait_for_child(conn, lease, point, sent_at + _secs(point.resend_after))
            return "suspended"

    def _wait_for_child(
        self, conn: Connection, lease: Lease, point: TaskPoint, resend_at: datetime
    ) -> None:
        conn.execute(
            update(flows)
            .where(flows.c.id == lease.flow_id)
            .values(
                status="suspended",
                waiting_on=f"task:{point.name}",
                deadline=None,
                wake_at=resend_at,
                wake_kind="task",
                lease_owner=None,
                lease_until=None,
            )
        )

    def complete_task(
        self, task_id: str, *, result: str | None, error: str | None
    ) -> tuple[str, str] | None:
        """Record a child's outcome once; the (flow name, flow id) to wake, if any."""
        t, c = tasks.c, flows.c
        with self._tx() as conn:
            found = conn.execute(select(t.flow_id).where(t.task_id == task_id)).first()
            if found is None:
                return None
            flow = conn.execute(
                select(c.name, c.status, c.wake_kind).where(c.id == found.flow_id).with_for_update()
            ).first()
            done = conn.execute(
                update(tasks)
                .where(t.task_id == task_id, t.status == "pending")
                .values(
                    status="failed" if error is not None else "succeeded",
                    result=result,
                    error=error,
                    completed_at=self._now(),
                )
                .returning(t.seq)
            ).first()
            if done is None or flow is None:
                return None  # a duplicate outcome (a resend ran twice): the first one stands
            if flow.status == "suspended" and flow.wake_kind == "task":
                conn.execute(
                    update(flows)
                    .where(c.id == found.flow_id)
                    .values(wake_at=self._now(), wake_kind="run")
                )
                return str(flow.name), str(found.flow_id)
        return None


def _secs(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)
