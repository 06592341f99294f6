"""The durable record on SQLAlchemy Core: PostgreSQL in production, SQLite embedded.

Every write an executor makes starts with a fenced ``UPDATE crux_flows ... WHERE
epoch = :epoch``. That statement takes the flow's row lock, so it also orders the
write against signals (which lock the same row first) and against a new claim
(which bumps the epoch): a stale executor's write matches no row and is refused.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import (
    Connection,
    Engine,
    and_,
    create_engine,
    event,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from .._json import safe_text
from .._models import TERMINAL
from .._settings import redact
from ..errors import FlowAlreadyFinished, FlowNotFound, FlowNotWaiting, LeaseLost, StoreError
from ._clock import aware as _aware
from ._clock import utcnow
from ._schema import flows, signals, step_errors, steps, sweeps
from ._sql_admin import SqlAdmin
from ._sql_tasks import SqlTasks
from ._types import (
    Checkpoint,
    Claimed,
    FlowRow,
    Lease,
    NotClaimed,
    SignalResult,
    SignalRow,
    StepErrorRow,
    StepRow,
    SuspendOutcome,
    Suspension,
    SweepResult,
    Validator,
)

ACTIVE = ("pending", "running", "suspended")
# What a finished flow no longer has.
_NO_LEASE: dict[str, Any] = {
    "lease_owner": None,
    "lease_until": None,
    "wake_at": None,
    "wake_kind": None,
    "waiting_on": None,
    "deadline": None,
}
_SIGNAL_BATCH = 50

# Postgres: record a signal in one statement (see SqlStore._record_signal_in_one). The
# flow's row lock comes first, so signal ids follow commit order, and a suspend either
# sees the signal or is woken by it. A same-key signal committed while this statement
# waited for the lock is not in its snapshot: the unique key refuses the insert, and
# the caller retries, then finds it.
_RECORD_SIGNAL = text(
    """
    WITH f AS (
        SELECT id, name, status, waiting_on FROM crux_flows WHERE id = :flow_id FOR UPDATE
    ), dup AS (
        SELECT s.id FROM crux_signals s
         WHERE s.flow_id = :flow_id AND s.key = :key AND EXISTS (SELECT 1 FROM f)
    ), ins AS (
        INSERT INTO crux_signals (flow_id, name, payload, key, status, created_at)
        SELECT f.id, :name, :payload, :key, 'pending', :now FROM f
         WHERE f.status IN ('pending', 'running', 'suspended')
           AND NOT EXISTS (SELECT 1 FROM dup)
        RETURNING id
    ), woke AS (
        -- Decided on f, the locked and current row: this statement's snapshot may be
        -- older than a suspend that committed while it waited for the lock.
        UPDATE crux_flows SET wake_at = :now, wake_kind = 'run', updated_at = :now
          FROM f
         WHERE crux_flows.id = f.id AND f.status = 'suspended' AND f.waiting_on = :name
           AND EXISTS (SELECT 1 FROM ins)
        RETURNING crux_flows.id
    )
    SELECT f.name, f.status,
           (SELECT id FROM dup LIMIT 1) AS dup_id,
           (SELECT id FROM ins) AS new_id,
           EXISTS (SELECT 1 FROM woke) AS woke
      FROM f
    """
)

# Postgres: commit a step in one statement (see SqlStore._commit_in_one).
_COMMIT_STEP = text(
    """
    WITH touched AS (
        UPDATE crux_flows
           SET lease_until = :lease_until, updated_at = :now,
               next_seq = :next_seq, retry_attempt = 0
         WHERE id = :flow_id AND epoch = :epoch AND status = 'running'
        RETURNING cancel_reason
    ), inserted AS (
        INSERT INTO crux_steps
               (flow_id, seq, kind, name, occurrence, result, attempts, epoch,
                started_at, completed_at)
        SELECT :flow_id, :seq, :kind, :name, :occurrence, :result, :attempts, :epoch,
               :started_at, :now
          FROM touched
        RETURNING seq
    )
    SELECT (SELECT count(*) FROM inserted) AS touched,
           (SELECT cancel_reason FROM touched) AS cancel_reason
    """
)


def _deadline(
    point: Suspension, waiting_on: str | None, current: datetime | None, now: datetime
) -> datetime | None:
    """Keep the deadline set when this point was first reached; else start one now."""
    if waiting_on == point.name and current is not None:
        return current
    return None if point.timeout is None else now + timedelta(seconds=point.timeout)


def make_engine(url: str) -> Engine:
    """An engine tuned for the record: SQLite serialised with BEGIN IMMEDIATE."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn: Any, _record: Any) -> None:
            # Take transaction control from pysqlite so BEGIN IMMEDIATE below applies:
            # deferred transactions that upgrade to writes deadlock under threads.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_size=10, max_overflow=20, pool_recycle=1800)


class SqlStore(SqlAdmin, SqlTasks):
    """``CruxStore`` on PostgreSQL or SQLite."""

    def __init__(
        self, url: str, *, engine: Engine | None = None, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self.url = url
        self._engine = engine or make_engine(url)
        self._now = clock
        self._sqlite = self._engine.dialect.name == "sqlite"
        self._auto = self._engine.execution_options(isolation_level="AUTOCOMMIT")
        # A forked child (Celery prefork) must not reuse the parent's pooled connections:
        # two processes on one socket interleave the protocol.
        ref = weakref.ref(self)

        def _after_fork() -> None:
            store = ref()
            if store is not None:
                store._engine.dispose(close=False)

        os.register_at_fork(after_in_child=_after_fork)

    # -- plumbing ---------------------------------------------------------------

    @contextmanager
    def _driver_errors(self) -> Iterator[None]:
        """Driver errors leave the seam as ``StoreError``, with the URL but no password."""
        try:
            yield
        except sa_exc.DBAPIError as exc:
            raise StoreError(
                f"database error on {redact(self.url)}: {exc.orig!r}",
                url=redact(self.url),
                connection_invalidated=bool(exc.connection_invalidated),
            ) from exc

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self._driver_errors(), self._engine.begin() as conn:
            yield conn

    @contextmanager
    def _one(self) -> Iterator[Connection]:
        """For one atomic statement: autocommit, so no BEGIN and COMMIT round trips.

        On Postgres a single statement (an UPDATE ... RETURNING, or a CTE that updates
        and inserts) is a transaction by itself. SQLite keeps its serialised BEGIN.
        """
        if self._sqlite:
            with self._tx() as conn:
                yield conn
            return
        with self._driver_errors(), self._auto.connect() as conn:
            yield conn

    def _insert(self, table: Any) -> Any:
        return sqlite_insert(table) if self._sqlite else pg_insert(table)

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine, for migrations and tests."""
        return self._engine

    def close(self) -> None:
        """Release connections."""
        self._engine.dispose()

    # -- flows ------------------------------------------------------------------

    def create_flow(self, flow_id: str, name: str, input_json: str) -> tuple[FlowRow, bool]:
        """Insert a pending flow, or return the existing row; the bool says if created."""
        now = self._now()
        stmt = (
            self._insert(flows)
            .values(
                id=flow_id,
                name=name,
                status="pending",
                input=input_json,
                wake_at=now,
                wake_kind="run",
                epoch=0,
                next_seq=0,
                runs=0,
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_nothing(index_elements=["id"])
            .returning(flows.c.id)
        )
        with self._tx() as conn:
            created = conn.execute(stmt).first() is not None
            row = conn.execute(select(flows).where(flows.c.id == flow_id)).one()
        return self._flow_row(row), created

    def claim(self, flow_id: str, owner: str, ttl: float) -> Claimed | NotClaimed:
        """Take the lease if it is free and the flow has something to do."""
        now = self._now()
        c = flows.c
        due = or_(
            c.status.in_(("pending", "running")),
            and_(c.status == "suspended", or_(c.wake_kind == "run", c.wake_at <= now)),
        )
        stmt = (
            update(flows)
            .where(c.id == flow_id, due, or_(c.lease_owner.is_(None), c.lease_until < now))
            .values(
                status="running",
                lease_owner=owner,
                lease_until=now + timedelta(seconds=ttl),
                epoch=c.epoch + 1,
                runs=c.runs + 1,
                wake_at=None,
                wake_kind=None,
                updated_at=now,
            )
            .returning(c.epoch, c.name, c.input, c.next_seq, c.retry_attempt, c.cancel_reason)
        )
        with self._one() as conn:
            got = conn.execute(stmt).first()
            if got is None:
                row = conn.execute(
                    select(c.status, c.lease_owner, c.lease_until).where(c.id == flow_id)
                ).first()
        if got is not None:
            return Claimed(
                lease=Lease(flow_id, owner, int(got.epoch)),
                name=got.name,
                input=got.input,
                next_seq=int(got.next_seq),
                failed_attempts=int(got.retry_attempt),
                cancel_requested=got.cancel_reason is not None,
            )
        if row is None:
            return NotClaimed("missing")
        if row.status in TERMINAL:
            return NotClaimed("finished")
        until = _aware(row.lease_until)
        if row.lease_owner is not None and until is not None and until >= now:
            return NotClaimed("busy", retry_after=(until - now).total_seconds())
        return NotClaimed("idle")

    def renew(self, lease: Lease, ttl: float) -> bool:
        """Extend the lease; False when it was lost."""
        now = self._now()
        with self._one() as conn:
            got = conn.execute(
                update(flows)
                .where(*self._fence(lease))
                .values(lease_until=now + timedelta(seconds=ttl))
                .returning(flows.c.id)
            ).first()
        return got is not None

    def release(self, lease: Lease) -> None:
        """Give the lease up without changing the flow, so the next claim need not wait."""
        with self._tx() as conn:
            conn.execute(
                update(flows)
                .where(*self._fence(lease))
                .values(lease_owner=None, lease_until=None, wake_at=self._now(), wake_kind="run")
            )

    @staticmethod
    def _fence(lease: Lease) -> tuple[Any, ...]:
        return (
            flows.c.id == lease.flow_id,
            flows.c.epoch == lease.epoch,
            flows.c.status == "running",
        )

    def _touch(self, conn: Connection, lease: Lease, ttl: float, **values: Any) -> Any:
        """The fenced write every executor transaction starts with; it takes the row lock."""
        now = self._now()
        got = conn.execute(
            update(flows)
            .where(*self._fence(lease))
            .values(lease_until=now + timedelta(seconds=ttl), updated_at=now, **values)
            .returning(flows.c.waiting_on, flows.c.deadline, flows.c.cancel_reason)
        ).first()
        if got is None:
            raise LeaseLost(f"flow {lease.flow_id}: epoch {lease.epoch} no longer holds the lease")
        return got

    # -- checkpoints --------------------------------------------------------------

    def load_checkpoints(self, flow_id: str) -> list[Checkpoint]:
        """All committed checkpoints of the flow, in sequence order."""
        c = steps.c
        with self._one() as conn:
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
        if not self._sqlite:
            return self._commit_in_one(lease, cp, started_at=started_at, attempts=attempts, ttl=ttl)
        with self._tx() as conn:
            row = self._touch(conn, lease, ttl, next_seq=cp.seq + 1, retry_attempt=0)
            self._insert_step(conn, lease, cp, started_at=started_at, attempts=attempts)
            if row.cancel_reason is not None:
                self._end(conn, lease.flow_id, "cancelled")
                return True
        return False

    def _commit_in_one(
        self, lease: Lease, cp: Checkpoint, *, started_at: datetime, attempts: int, ttl: float
    ) -> bool:
        # The step's hot path: the fenced touch and the insert in one statement, one
        # round trip. The insert reads the touch's output, so it happens only if the
        # epoch still holds.
        now = self._now()
        with self._one() as conn:
            got = conn.execute(
                _COMMIT_STEP,
                {
                    "flow_id": lease.flow_id,
                    "epoch": lease.epoch,
                    "lease_until": now + timedelta(seconds=ttl),
                    "now": now,
                    "next_seq": cp.seq + 1,
                    "seq": cp.seq,
                    "kind": cp.kind,
                    "name": cp.name,
                    "occurrence": cp.occurrence,
                    "result": cp.result,
                    "attempts": attempts,
                    "started_at": started_at,
                },
            ).one()
        if not got.touched:
            raise LeaseLost(f"flow {lease.flow_id}: epoch {lease.epoch} no longer holds the lease")
        if got.cancel_reason is None:
            return False
        with self._tx() as conn:
            self._touch(conn, lease, ttl)
            self._end(conn, lease.flow_id, "cancelled")
        return True

    def now(self) -> datetime:
        """The record's notion of the current time (UTC)."""
        return self._now()

    def _end(self, conn: Connection, flow_id: str, status: str, **values: Any) -> None:
        """Give the flow a terminal status (the caller holds its row lock)."""
        now = self._now()
        conn.execute(
            update(flows)
            .where(flows.c.id == flow_id)
            .values(status=status, finished_at=now, updated_at=now, **_NO_LEASE, **values)
        )

    def _touch_unless_cancelled(self, conn: Connection, lease: Lease) -> Any | None:
        """The fenced touch; None (and the flow cancelled) if cancellation was asked."""
        row = self._touch(conn, lease, 1.0)
        if row.cancel_reason is not None:
            self._end(conn, lease.flow_id, "cancelled")
            return None
        return row

    def _suspend(self, conn: Connection, flow_id: str, **values: Any) -> None:
        conn.execute(
            update(flows)
            .where(flows.c.id == flow_id)
            .values(status="suspended", lease_owner=None, lease_until=None, **values)
        )

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
        now = self._now()
        with self._tx() as conn:
            row = self._touch_unless_cancelled(conn, lease)
            conn.execute(
                self._insert(step_errors)
                .values(
                    flow_id=lease.flow_id,
                    seq=seq,
                    attempt=attempt,
                    name=name,
                    error=error,
                    created_at=now,
                )
                .on_conflict_do_nothing()
            )
            if row is None:
                return "cancelled"
            if retry_in is None:
                self._end(conn, lease.flow_id, "failed", error=error)
                return "failed"
            self._suspend(
                conn,
                lease.flow_id,
                retry_attempt=attempt,
                waiting_on=None,
                deadline=None,
                wake_at=now + timedelta(seconds=retry_in),
                wake_kind="retry",
            )
        return "suspended"

    def suspend_until(self, lease: Lease, wake_at: datetime, kind: str) -> SuspendOutcome:
        """Suspend without waiting for a signal, until ``wake_at`` (a sleep)."""
        with self._tx() as conn:
            row = self._touch_unless_cancelled(conn, lease)
            if row is None:
                return "cancelled"
            self._suspend(
                conn, lease.flow_id, waiting_on=None, deadline=None, wake_at=wake_at, wake_kind=kind
            )
        return "suspended"

    def poll_later(self, lease: Lease, point: Suspension, every: float) -> SuspendOutcome:
        """A ``wait_until`` check came back false: look again in ``every`` seconds."""
        with self._tx() as conn:
            row = self._touch_unless_cancelled(conn, lease)
            if row is None:
                return "cancelled"
            now = self._now()
            deadline = _deadline(point, row.waiting_on, _aware(row.deadline), now)
            if deadline is not None and deadline <= now:
                self._end(conn, lease.flow_id, "expired")
                return "expired"
            check = now + timedelta(seconds=every)
            self._suspend(
                conn,
                lease.flow_id,
                waiting_on=point.name,
                deadline=deadline,
                wake_at=check if deadline is None else min(check, deadline),
                wake_kind="poll",
            )
        return "suspended"

    def cancel(self, flow_id: str, reason: str) -> str:
        """Cancel at once ("cancelled") or at the running executor's next step ("cancelling")."""
        c = flows.c
        now = self._now()
        with self._tx() as conn:
            row = conn.execute(
                select(c.status, c.lease_owner, c.lease_until)
                .where(c.id == flow_id)
                .with_for_update()
            ).first()
            if row is None:
                raise FlowNotFound(f"no flow {flow_id!r}", flow_id=flow_id)
            if row.status in TERMINAL:
                raise FlowAlreadyFinished(
                    f"flow {flow_id!r} is already {row.status}; nothing to cancel",
                    flow_id=flow_id,
                    status=row.status,
                )
            conn.execute(update(flows).where(c.id == flow_id).values(cancel_reason=reason))
            until = _aware(row.lease_until)
            if row.status == "running" and row.lease_owner and until is not None and until >= now:
                return "cancelling"
            self._end(conn, flow_id, "cancelled")
        return "cancelled"

    def claim_tick(self, tick: int) -> bool:
        """True for the first sweep of a tick; False when another beat's sweep took it."""
        with self._tx() as conn:
            got = conn.execute(
                self._insert(sweeps)
                .values(tick=tick, swept_at=self._now())
                .on_conflict_do_nothing()
                .returning(sweeps.c.tick)
            ).first()
            if got is not None and tick % 100 == 0:
                conn.execute(sweeps.delete().where(sweeps.c.tick < tick - 10_000))
        return got is not None

    def sweep(self, *, limit: int, redrive_after: float) -> SweepResult:
        """Expire overdue suspends; mark due and stalled flows and return them to publish."""
        c = flows.c
        now = self._now()
        stale = now - timedelta(seconds=redrive_after)
        due = and_(
            c.status.in_(ACTIVE),
            or_(
                and_(c.wake_kind == "run", c.wake_at <= stale),
                and_(c.wake_kind != "run", c.wake_at <= now),
            ),
        )
        stalled = and_(c.status == "running", c.lease_until < now, c.wake_at.is_(None))
        result = SweepResult()
        with self._tx() as conn:
            rows: list[Any] = []
            for cond in (due, stalled):
                query = select(c.id, c.name, c.status, c.wake_kind).where(cond).limit(limit)
                if not self._sqlite:
                    query = query.with_for_update(skip_locked=True)
                rows += conn.execute(query).all()
            expire = [r.id for r in rows if r.status == "suspended" and r.wake_kind == "expire"]
            wake = [r for r in rows if r.id not in set(expire)]
            if expire:
                conn.execute(
                    update(flows)
                    .where(c.id.in_(expire), c.status == "suspended", c.wake_kind == "expire")
                    .values(status="expired", finished_at=now, updated_at=now, **_NO_LEASE)
                )
            if wake:
                conn.execute(
                    update(flows)
                    .where(c.id.in_([r.id for r in wake]))
                    .values(wake_kind="run", wake_at=now)
                )
        result.expired.extend(expire)
        result.due.extend((r.name, r.id) for r in wake)
        return result

    def _insert_step(
        self,
        conn: Connection,
        lease: Lease,
        cp: Checkpoint,
        *,
        started_at: datetime | None,
        attempts: int,
    ) -> None:
        conn.execute(
            insert(steps).values(
                flow_id=lease.flow_id,
                seq=cp.seq,
                kind=cp.kind,
                name=cp.name,
                occurrence=cp.occurrence,
                result=cp.result,
                attempts=attempts,
                epoch=lease.epoch,
                started_at=started_at,
                completed_at=self._now(),
            )
        )

    def take_signal_or_suspend(
        self, lease: Lease, point: Suspension, validate: Validator, ttl: float
    ) -> Checkpoint | SuspendOutcome:
        """Consume the oldest valid pending signal of that name as a checkpoint, or suspend."""
        s = signals.c
        with self._tx() as conn:
            waiting = self._touch(conn, lease, ttl)
            if waiting.cancel_reason is not None:
                self._end(conn, lease.flow_id, "cancelled")
                return "cancelled"
            while True:
                pending = conn.execute(
                    select(s.id, s.payload)
                    .where(s.flow_id == lease.flow_id, s.name == point.name, s.status == "pending")
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
                            .where(s.id == sig.id)
                            .values(
                                status="rejected",
                                error=safe_text(str(exc)),
                                consumed_at=self._now(),
                            )
                        )
                        continue
                    cp = Checkpoint(point.seq, "suspend", point.name, point.occurrence, result)
                    conn.execute(
                        update(signals)
                        .where(s.id == sig.id)
                        .values(status="consumed", consumed_seq=point.seq, consumed_at=self._now())
                    )
                    conn.execute(
                        update(flows)
                        .where(flows.c.id == lease.flow_id)
                        .values(next_seq=point.seq + 1, waiting_on=None, deadline=None)
                    )
                    self._insert_step(conn, lease, cp, started_at=None, attempts=1)
                    return cp
            now = self._now()
            deadline = _deadline(point, waiting.waiting_on, _aware(waiting.deadline), now)
            if deadline is not None and deadline <= now:
                self._end(conn, lease.flow_id, "expired")
                return "expired"
            conn.execute(
                update(flows)
                .where(flows.c.id == lease.flow_id)
                .values(
                    status="suspended",
                    waiting_on=point.name,
                    deadline=deadline,
                    wake_at=deadline,
                    wake_kind="expire" if deadline is not None else None,
                    lease_owner=None,
                    lease_until=None,
                )
            )
        return "suspended"

    def finish(
        self, lease: Lease, status: str, *, result: str | None = None, error: str | None = None
    ) -> None:
        """End the flow with a terminal status if ``lease`` still holds."""
        now = self._now()
        with self._one() as conn:
            got = conn.execute(
                update(flows)
                .where(*self._fence(lease))
                .values(
                    status=status,
                    result=result,
                    error=error,
                    finished_at=now,
                    updated_at=now,
                    **_NO_LEASE,
                )
                .returning(flows.c.id)
            ).first()
        if got is None:
            raise LeaseLost(f"flow {lease.flow_id}: epoch {lease.epoch} no longer holds the lease")

    # -- signals ------------------------------------------------------------------

    def record_signal(self, flow_id: str, name: str, payload: str, key: str | None) -> SignalResult:
        """Durably record a signal; raise ``FlowNotFound`` or ``FlowNotWaiting``."""
        c, s = flows.c, signals.c
        now = self._now()
        try:
            if not self._sqlite:
                return self._record_signal_in_one(flow_id, name, payload, key)
            with self._tx() as conn:
                # Lock the flow row first: signals then commit in the order of their ids,
                # and a suspend in progress either sees this signal or is seen by it.
                row = conn.execute(
                    select(c.status, c.name, c.waiting_on).where(c.id == flow_id).with_for_update()
                ).first()
                if row is None:
                    raise FlowNotFound(f"no flow {flow_id!r}", flow_id=flow_id)
                if key is not None:
                    dup = conn.execute(
                        select(s.id).where(s.flow_id == flow_id, s.key == key)
                    ).scalar()
                    if dup is not None:
                        return SignalResult(int(dup), row.name, duplicate=True, wake=False)
                if row.status in TERMINAL:
                    raise FlowNotWaiting(
                        f"flow {flow_id!r} is {row.status}; signal {name!r} refused",
                        flow_id=flow_id,
                        status=row.status,
                        signal=name,
                    )
                signal_id = conn.execute(
                    insert(signals)
                    .values(
                        flow_id=flow_id,
                        name=name,
                        payload=payload,
                        key=key,
                        status="pending",
                        created_at=now,
                    )
                    .returning(s.id)
                ).scalar_one()
                wake = row.status == "suspended" and row.waiting_on == name
                if wake:
                    conn.execute(
                        update(flows)
                        .where(c.id == flow_id)
                        .values(wake_at=now, wake_kind="run", updated_at=now)
                    )
        except StoreError as exc:
            if isinstance(exc.__cause__, sa_exc.IntegrityError) and key is not None:
                # Lost a race on the same key in a backend without row locks.
                return self.record_signal(flow_id, name, payload, key)
            raise
        return SignalResult(int(signal_id), row.name, duplicate=False, wake=wake)

    def _record_signal_in_one(
        self, flow_id: str, name: str, payload: str, key: str | None
    ) -> SignalResult:
        # The same steps as the transaction below, as one statement: one round trip and
        # one commit on the caller's side of every signal.
        with self._one() as conn:
            row = conn.execute(
                _RECORD_SIGNAL,
                {
                    "flow_id": flow_id,
                    "name": name,
                    "payload": payload,
                    "key": key,
                    "now": self._now(),
                },
            ).first()
        if row is None:
            raise FlowNotFound(f"no flow {flow_id!r}", flow_id=flow_id)
        if row.dup_id is not None:
            return SignalResult(int(row.dup_id), row.name, duplicate=True, wake=False)
        if row.new_id is None:
            raise FlowNotWaiting(
                f"flow {flow_id!r} is {row.status}; signal {name!r} refused",
                flow_id=flow_id,
                status=row.status,
                signal=name,
            )
        return SignalResult(int(row.new_id), row.name, duplicate=False, wake=bool(row.woke))

    def request_resume(self, flow_id: str) -> str:
        """Mark a suspended flow as due now; return its flow name."""
        c = flows.c
        with self._tx() as conn:
            row = conn.execute(
                select(c.status, c.name).where(c.id == flow_id).with_for_update()
            ).first()
            if row is None:
                raise FlowNotFound(f"no flow {flow_id!r}", flow_id=flow_id)
            if row.status in TERMINAL:
                raise FlowNotWaiting(
                    f"flow {flow_id!r} is {row.status}", flow_id=flow_id, status=row.status
                )
            if row.status == "suspended":
                conn.execute(
                    update(flows)
                    .where(c.id == flow_id)
                    .values(wake_at=self._now(), wake_kind="run")
                )
        return str(row.name)

    # -- reads ----------------------------------------------------------------------

    def get_flow(self, flow_id: str, *, details: bool = True) -> FlowRow:
        """The flow's row, with steps and signals when ``details``; ``FlowNotFound`` if none."""
        with self._tx() as conn:
            row = conn.execute(select(flows).where(flows.c.id == flow_id)).first()
            if row is None:
                raise FlowNotFound(f"no flow {flow_id!r}", flow_id=flow_id)
            if not details:
                return self._flow_row(row)
            step_rows = conn.execute(
                select(steps).where(steps.c.flow_id == flow_id).order_by(steps.c.seq)
            ).all()
            signal_rows = conn.execute(
                select(signals).where(signals.c.flow_id == flow_id).order_by(signals.c.id)
            ).all()
            error_rows = conn.execute(
                select(step_errors)
                .where(step_errors.c.flow_id == flow_id)
                .order_by(step_errors.c.seq, step_errors.c.attempt)
            ).all()
        return self._flow_row(
            row,
            steps=[
                StepRow(
                    r.seq,
                    r.kind,
                    r.name,
                    r.occurrence,
                    r.result,
                    r.attempts,
                    _aware(r.started_at),
                    _aware(r.completed_at) or self._now(),
                )
                for r in step_rows
            ],
            signals=[
                SignalRow(
                    int(r.id),
                    r.name,
                    r.payload,
                    r.key,
                    r.status,
                    r.error,
                    r.consumed_seq,
                    _aware(r.created_at) or self._now(),
                    _aware(r.consumed_at),
                )
                for r in signal_rows
            ],
            step_errors=[
                StepErrorRow(r.seq, r.attempt, r.name, r.error, _aware(r.created_at) or self._now())
                for r in error_rows
            ],
        )

    def _flow_row(self, r: Any, **extra: Any) -> FlowRow:
        return FlowRow(
            id=r.id,
            name=r.name,
            status=r.status,
            input=r.input,
            result=r.result,
            error=r.error,
            cancel_reason=r.cancel_reason,
            waiting_on=r.waiting_on,
            deadline=_aware(r.deadline),
            wake_at=_aware(r.wake_at),
            wake_kind=r.wake_kind,
            epoch=int(r.epoch),
            created_at=_aware(r.created_at) or self._now(),
            updated_at=_aware(r.updated_at) or self._now(),
            finished_at=_aware(r.finished_at),
            **extra,
        )
