"""``run_task`` on the SQL record: the child task's row is the flow's inbox for its outcome.

Lock order is the same as for signals: the flow's row first, then the task's, so a
completion racing a suspend either is seen by it or finds the flow suspended and
wakes it.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Connection, insert, select, update

from ..errors import NonDeterminismError
from . import _lifecycle as life
from ._clock import aware
from ._lifecycle import CheckpointKind, FlowStatus, TaskStatus, WakeKind, task_id_for
from ._schema import flows, tasks
from ._sql_db import SqlDb
from ._types import Checkpoint, Lease, SuspendOutcome, TaskError, TaskPoint, TaskSend

__all__ = ["SqlTasks", "task_id_for"]


class SqlTasks:
    """Child tasks on SQL: the executor's ``take_task_or_send``, the client's ``complete_task``."""

    def __init__(self, db: SqlDb) -> None:
        self._db = db

    def take_task_or_send(
        self, lease: Lease, point: TaskPoint, ttl: float
    ) -> Checkpoint | TaskSend | TaskError | SuspendOutcome:
        """The child task's outcome as a checkpoint, or what to do about it."""
        db, t = self._db, tasks.c
        with db.tx() as conn:
            if db.touch_unless_cancelled(conn, lease, ttl) is None:
                return "cancelled"
            row = conn.execute(
                select(tasks).where(t.flow_id == lease.flow_id, t.seq == point.seq)
            ).first()
            now = db.now()
            if row is not None and row.name != point.name:
                raise NonDeterminismError(
                    f"flow {lease.flow_id}: checkpoint {point.seq} started child task "
                    f"{row.name!r}, the replay asked for {point.name!r}",
                    flow_id=lease.flow_id,
                    seq=point.seq,
                    expected=f"task {row.name!r}",
                    actual=f"task {point.name!r}",
                )
            if row is None or life.sends_new_attempt(row.status, row.attempt, point.attempt):
                send = TaskSend(task_id_for(lease.flow_id, point.seq, point.attempt), point.call)
                values = dict(
                    name=point.name,
                    task=point.task,
                    task_id=send.task_id,
                    attempt=point.attempt,
                    call=point.call,
                    status=TaskStatus.PENDING,
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
                _wait_for_child(conn, lease, point, now + _secs(point.resend_after))
                return send
            if row.status == TaskStatus.SUCCEEDED:
                cp = Checkpoint(
                    point.seq, CheckpointKind.TASK.value, point.name, point.occurrence, row.result
                )
                db.insert_step(
                    conn,
                    lease,
                    cp,
                    started_at=aware(row.created_at),
                    attempts=row.attempt,
                    next_seq=point.seq + 1,
                    retry_attempt=0,
                    waiting_on=None,
                )
                return cp
            if row.status == TaskStatus.FAILED:
                return TaskError(row.error)
            # Still running. Re-send only once the last send is older than resend_after:
            # a replay or a stray resume must never dispatch the child again.
            sent_at = aware(row.sent_at) or now
            if life.task_send_stale(sent_at, point.resend_after, now):
                conn.execute(
                    update(tasks)
                    .where(t.flow_id == lease.flow_id, t.seq == point.seq)
                    .values(sends=t.sends + 1, sent_at=now)
                )
                _wait_for_child(conn, lease, point, now + _secs(point.resend_after))
                return TaskSend(row.task_id, row.call)
            _wait_for_child(conn, lease, point, sent_at + _secs(point.resend_after))
            return "suspended"

    def complete_task(
        self, task_id: str, *, result: str | None, error: str | None
    ) -> tuple[str, str] | None:
        """Record a child's outcome once; the (flow name, flow id) to wake, if any."""
        db, t, c = self._db, tasks.c, flows.c
        with db.tx() as conn:
            # The exact id, secret part included, of a child this flow sent: nothing else.
            found = conn.execute(select(t.flow_id).where(t.task_id == task_id)).first()
            if found is None:
                life.refuse_outcome(task_id)
                return None
            flow = conn.execute(
                select(c.name, c.status, c.wake_kind).where(c.id == found.flow_id).with_for_update()
            ).first()
            done = conn.execute(
                update(tasks)
                .where(t.task_id == task_id, t.status == TaskStatus.PENDING)
                .values(
                    status=life.task_outcome(error),
                    result=result,
                    error=error,
                    completed_at=db.now(),
                )
                .returning(t.seq)
            ).first()
            if done is None or flow is None:
                return None  # a duplicate outcome (a resend ran twice): the first one stands
            if life.child_outcome_wakes(flow.status, flow.wake_kind):
                conn.execute(
                    update(flows)
                    .where(c.id == found.flow_id)
                    .values(wake_at=db.now(), wake_kind=WakeKind.RUN)
                )
                return str(flow.name), str(found.flow_id)
        return None


def _wait_for_child(conn: Connection, lease: Lease, point: TaskPoint, resend_at: datetime) -> None:
    conn.execute(
        update(flows)
        .where(flows.c.id == lease.flow_id)
        .values(
            status=FlowStatus.SUSPENDED,
            waiting_on=f"task:{point.name}",
            deadline=None,
            wake_at=resend_at,
            wake_kind=WakeKind.TASK,
            lease_owner=None,
            lease_until=None,
            lapses=0,
        )
    )


def _secs(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)
