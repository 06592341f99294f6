"""What an executor writes on the SQL record, every write fenced by its lease epoch.

These are the transaction paths (all of SQLite, and Postgres where no one-statement
path exists); ``PgExecutor`` in ``_sql_pg.py`` replaces the step commit on Postgres.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Connection, func, select, update

from .._json import safe_text
from . import _lifecycle as life
from . import _sql_rules as rules
from ._clock import aware
from ._lifecycle import CheckpointKind, FlowStatus, SignalStatus, WakeKind
from ._schema import flows, signals, step_errors, steps
from ._sql_db import NO_LEASE, SqlDb, lease_lost
from ._types import (
    Checkpoint,
    Claimed,
    Lease,
    NotClaimed,
    StepCommit,
    SuspendOutcome,
    Suspension,
    Validator,
)

_SIGNAL_BATCH = 50


class SqlExecutor:
    """``ExecutorStore`` on SQL: claim, the fenced writes, and the end of a flow."""

    def __init__(self, db: SqlDb) -> None:
        self._db = db

    def now(self) -> datetime:
        """The record's notion of the current time (UTC)."""
        return self._db.now()

    def claim(
        self, flow_id: str, owner: str, ttl: float, *, max_lapses: int | None = None
    ) -> Claimed | NotClaimed:
        """Take the lease if it is free and the flow has something to do.

        Taking over a lapsed lease counts a lapse (``rules.lapses_after_claim``); the
        claim that takes the ``max_lapses``-th in a row parks the flow ``failed``.
        """
        now = self._db.now()
        c = flows.c
        got, woke_at, woke_by, consumed = self._claim_and_wake(
            flow_id, owner, now + timedelta(seconds=ttl), now
        )
        with self._db.one() as conn:
            if got is None:
                row = conn.execute(
                    select(c.status, c.lease_owner, c.lease_until).where(c.id == flow_id)
                ).first()
            elif life.parks(int(got.lapses), max_lapses):
                # This claim holds the new epoch: end the flow under it, in its own write.
                conn.execute(
                    update(flows)
                    .where(c.id == flow_id, c.epoch == got.epoch)
                    .values(
                        status=FlowStatus.FAILED,
                        error=life.crash_loop_error(int(got.lapses)),
                        finished_at=now,
                        updated_at=now,
                        **NO_LEASE,
                    )
                )
                return NotClaimed("parked")
        if got is not None:
            return Claimed(
                lease=Lease(flow_id, owner, int(got.epoch)),
                name=got.name,
                input=got.input,
                next_seq=int(got.next_seq),
                failed_attempts=int(got.retry_attempt),
                cancel_requested=got.cancel_reason is not None,
                woke_at=aware(woke_at),
                woke_by=woke_by,
                runs=int(got.runs),
                history_digest=got.history_digest,
                consumed=consumed,
            )
        if row is None:
            return NotClaimed("missing")
        if life.is_terminal(row.status):
            return NotClaimed("finished")
        until = aware(row.lease_until)
        if life.lease_busy(row.lease_owner, until, now):
            assert until is not None
            return NotClaimed("busy", retry_after=(until - now).total_seconds())
        return NotClaimed("idle")

    def _claim_and_wake(
        self, flow_id: str, owner: str, lease_until: datetime, now: datetime
    ) -> tuple[Any, Any, Any, Checkpoint | None]:
        """Run the claim; with the wake it cleared (the metrics' resume latency).

        SQLite: read first, in the same serialised transaction. The signal that woke
        the flow is consumed later, at its suspend point (``take_signal_or_suspend``).
        """
        c = flows.c
        claim = (
            update(flows)
            .where(c.id == flow_id, rules.has_work(now), rules.lease_free(now))
            .values(
                status=FlowStatus.RUNNING,
                lease_owner=owner,
                lease_until=lease_until,
                epoch=c.epoch + 1,
                runs=c.runs + 1,
                lapses=rules.lapses_after_claim(),
                wake_at=None,
                wake_kind=None,
                updated_at=now,
            )
            .returning(
                c.epoch,
                c.name,
                c.input,
                c.next_seq,
                c.retry_attempt,
                c.cancel_reason,
                c.runs,
                c.lapses,
                c.history_digest,
            )
        )
        with self._db.one() as conn:
            before = conn.execute(select(c.wake_at, c.wake_kind).where(c.id == flow_id)).first()
            got = conn.execute(claim).first()
        woke_at, woke_by = (before.wake_at, before.wake_kind) if before else (None, None)
        return got, woke_at, woke_by, None

    def renew(self, lease: Lease, ttl: float) -> bool:
        """Extend the lease; False when it was lost."""
        now = self._db.now()
        with self._db.one() as conn:
            got = conn.execute(
                update(flows)
                .where(*self._db.fence(lease))
                .values(lease_until=now + timedelta(seconds=ttl))
                .returning(flows.c.id)
            ).first()
        return got is not None

    def release(self, lease: Lease) -> None:
        """Give the lease up without changing the flow, so the next claim need not wait."""
        with self._db.tx() as conn:
            conn.execute(
                update(flows)
                .where(*self._db.fence(lease))
                .values(
                    lease_owner=None,
                    lease_until=None,
                    wake_at=self._db.now(),
                    wake_kind=WakeKind.RUN,
                )
            )

    def load_checkpoints(self, flow_id: str) -> list[Checkpoint]:
        """All committed checkpoints of the flow, in sequence order."""
        c = steps.c
        with self._db.one() as conn:
            rows = conn.execute(
                select(c.seq, c.kind, c.name, c.occurrence, c.result)
                .where(c.flow_id == flow_id)
                .order_by(c.seq)
            ).all()
        return [Checkpoint(r.seq, r.kind, r.name, r.occurrence, r.result) for r in rows]

    def commit_checkpoint(
        self, lease: Lease, cp: Checkpoint, *, started_at: datetime, attempts: int, ttl: float
    ) -> bool:
        """Commit a checkpoint if ``lease`` still holds; True if the flow is now cancelled."""
        with self._db.tx() as conn:
            return self._open(conn, lease, ttl, StepCommit(cp, started_at, attempts)) is None

    def _open(self, conn: Connection, lease: Lease, ttl: float, step: StepCommit | None) -> Any:
        """The fenced touch an executor's transaction starts with, after writing ``step``.

        Returns the touched row (``waiting_on``, ``deadline``, ``cancel_reason``), or
        None when cancellation was asked: the flow is then ``cancelled`` (``step``, if
        any, written first, as its own commit would have been).
        """
        db = self._db
        if step is None:
            row = db.touch(conn, lease, ttl)
        else:
            row = db.touch(conn, lease, ttl, next_seq=step.cp.seq + 1, retry_attempt=0)
            db.insert_step(conn, lease, step.cp, started_at=step.started_at, attempts=step.attempts)
        if row.cancel_reason is not None:
            db.end(conn, lease.flow_id, FlowStatus.CANCELLED)
            return None
        return row

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
        db = self._db
        now = db.now()
        with db.tx() as conn:
            row = db.touch_unless_cancelled(conn, lease)
            # After retry_flow the attempts restart at 1: the history keeps counting.
            recorded = conn.execute(
                select(func.max(step_errors.c.attempt)).where(
                    step_errors.c.flow_id == lease.flow_id, step_errors.c.seq == seq
                )
            ).scalar()
            conn.execute(
                db.insert(step_errors)
                .values(
                    flow_id=lease.flow_id,
                    seq=seq,
                    attempt=life.error_number(attempt, recorded),
                    name=name,
                    error=error,
                    created_at=now,
                )
                .on_conflict_do_nothing()
            )
            if row is None:
                return "cancelled"
            if retry_in is None:
                db.end(conn, lease.flow_id, FlowStatus.FAILED, error=error)
                return "failed"
            db.suspend(
                conn,
                lease.flow_id,
                retry_attempt=attempt,
                waiting_on=None,
                deadline=None,
                wake_at=now + timedelta(seconds=retry_in),
                wake_kind=WakeKind.RETRY,
            )
        return "suspended"

    def suspend_until(self, lease: Lease, wake_at: datetime, kind: str) -> SuspendOutcome:
        """Suspend without waiting for a signal, until ``wake_at`` (a sleep)."""
        db = self._db
        with db.tx() as conn:
            if db.touch_unless_cancelled(conn, lease) is None:
                return "cancelled"
            db.suspend(
                conn, lease.flow_id, waiting_on=None, deadline=None, wake_at=wake_at, wake_kind=kind
            )
        return "suspended"

    def poll_later(self, lease: Lease, point: Suspension, every: float) -> SuspendOutcome:
        """A ``wait_until`` check came back false: look again in ``every`` seconds."""
        db = self._db
        with db.tx() as conn:
            row = db.touch_unless_cancelled(conn, lease)
            if row is None:
                return "cancelled"
            now = db.now()
            deadline = life.deadline(
                point.name, point.timeout, row.waiting_on, aware(row.deadline), now
            )
            if life.expired(deadline, now):
                db.end(conn, lease.flow_id, FlowStatus.EXPIRED)
                return "expired"
            db.suspend(
                conn,
                lease.flow_id,
                waiting_on=point.name,
                deadline=deadline,
                wake_at=life.poll_wake(now + timedelta(seconds=every), deadline),
                wake_kind=WakeKind.POLL,
            )
        return "suspended"

    def take_signal_or_suspend(
        self,
        lease: Lease,
        point: Suspension,
        validate: Validator,
        ttl: float,
        *,
        step: StepCommit | None = None,
    ) -> Checkpoint | SuspendOutcome:
        """Consume the oldest valid pending signal of that name as a checkpoint, or suspend.

        ``step`` (the last step's checkpoint) is written first, in the same transaction.
        """
        db, s = self._db, signals.c
        with db.tx() as conn:
            waiting = self._open(conn, lease, ttl, step)
            if waiting is None:
                return "cancelled"
            while True:
                pending = conn.execute(
                    select(s.id, s.payload)
                    .where(
                        s.flow_id == lease.flow_id,
                        s.name == point.name,
                        s.status == SignalStatus.PENDING,
                    )
                    .order_by(s.id)
                    .limit(_SIGNAL_BATCH)
                ).all()
                if not pending:
                    break
                for sig in pending:
                    try:
                        result = validate(sig.payload)
                    except ValueError as exc:
                        conn.execute(
                            update(signals)
                            .where(s.flow_id == lease.flow_id, s.id == sig.id)  # one flow: routable
                            .values(
                                status=SignalStatus.REJECTED,
                                error=safe_text(str(exc)),
                                consumed_at=db.now(),
                            )
                        )
                        continue
                    cp = Checkpoint(
                        point.seq,
                        CheckpointKind.SUSPEND.value,
                        point.name,
                        point.occurrence,
                        result,
                    )
                    conn.execute(
                        update(signals)
                        .where(s.flow_id == lease.flow_id, s.id == sig.id)  # one flow: routable
                        .values(
                            status=SignalStatus.CONSUMED,
                            consumed_seq=point.seq,
                            consumed_at=db.now(),
                        )
                    )
                    db.insert_step(
                        conn,
                        lease,
                        cp,
                        started_at=None,
                        attempts=1,
                        next_seq=point.seq + 1,
                        waiting_on=None,
                        deadline=None,
                        waiting_schema=None,
                    )
                    return cp
            now = db.now()
            deadline = life.deadline(
                point.name, point.timeout, waiting.waiting_on, aware(waiting.deadline), now
            )
            if life.expired(deadline, now):
                db.end(conn, lease.flow_id, FlowStatus.EXPIRED)
                return "expired"
            wake_at, wake_kind = life.signal_wait(deadline)
            db.suspend(
                conn,
                lease.flow_id,
                waiting_on=point.name,
                deadline=deadline,
                wake_at=wake_at,
                wake_kind=wake_kind,
                waiting_schema=point.schema,
            )
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
        """End the flow with a terminal status if ``lease`` still holds; returns the status.

        ``step`` is written first, in the same transaction; a cancel request seen there
        ends the flow ``cancelled`` instead.
        """
        now = self._db.now()
        with self._db.tx() if step is not None else self._db.one() as conn:
            if step is not None and self._open(conn, lease, 1.0, step) is None:
                return FlowStatus.CANCELLED.value
            got = conn.execute(
                update(flows)
                .where(*self._db.fence(lease))
                .values(
                    status=status,
                    result=result,
                    error=error,
                    finished_at=now,
                    updated_at=now,
                    **NO_LEASE,
                )
                .returning(flows.c.id)
            ).first()
        if got is None:
            raise lease_lost(lease)
        return status
