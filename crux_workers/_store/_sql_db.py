"""The SQL plumbing every piece of ``SqlStore`` shares: engine, transactions, the fence.

``SqlDb`` is SQLite's (serialised ``BEGIN IMMEDIATE`` transactions, no row locks to
skip); ``PgDb`` (in ``_sql_pg.py``) differs only where Postgres does: autocommit for
one-statement writes and ``SKIP LOCKED`` for the sweep.

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
from typing import Any

from sqlalchemy import Connection, Engine, Select, create_engine, event, insert, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from .._settings import redact
from ..errors import LeaseLost, RecordRefused, StoreError
from . import _lifecycle as life
from ._clock import aware
from ._lifecycle import FlowStatus
from ._schema import flows, steps
from ._types import Checkpoint, FlowRow, Lease

# What a finished flow no longer has.
NO_LEASE: dict[str, Any] = {
    "lease_owner": None,
    "lease_until": None,
    "wake_at": None,
    "wake_kind": None,
    "waiting_on": None,
    "deadline": None,
    "waiting_schema": None,
    "lapses": 0,
}


def connection_level(exc: sa_exc.DBAPIError) -> bool:
    """The database could not be reached or could not decide now: try again later.

    Connection errors, invalidated connections, serialization failures and deadlocks
    (SQLSTATE class 40, which drivers report as operational errors, checked by code too).
    Anything else (a value, a check or a key the record refuses) cannot succeed later.
    """
    if exc.connection_invalidated:
        return True
    if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError):
        return True
    code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    return isinstance(code, str) and (code.startswith("40") or code.startswith("08"))


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


def lease_lost(lease: Lease) -> LeaseLost:
    """The error every refused fenced write raises."""
    return LeaseLost(f"flow {lease.flow_id}: epoch {lease.epoch} no longer holds the lease")


class SqlDb:
    """Engine, clock and the helpers every SQL piece uses (SQLite's flavour)."""

    def __init__(self, url: str, engine: Engine, clock: Callable[[], datetime]) -> None:
        self.url = url
        self.engine = engine
        self.now = clock
        # A forked child (Celery prefork) must not reuse the parent's pooled connections:
        # two processes on one socket interleave the protocol.
        ref = weakref.ref(self)

        def _after_fork() -> None:
            db = ref()
            if db is not None:
                db.engine.dispose(close=False)

        os.register_at_fork(after_in_child=_after_fork)

    # -- connections --------------------------------------------------------------

    @contextmanager
    def driver_errors(self) -> Iterator[None]:
        """Driver errors leave the seam as ``StoreError``, with the URL but no password.

        Connection-level errors are a plain ``StoreError`` (retry later); the others
        (data errors) are ``RecordRefused``: the write can never succeed as it is.
        """
        try:
            yield
        except sa_exc.DBAPIError as exc:
            kind = StoreError if connection_level(exc) else RecordRefused
            raise kind(
                f"database error on {redact(self.url)}: {exc.orig!r}",
                url=redact(self.url),
                connection_invalidated=bool(exc.connection_invalidated),
            ) from exc

    @contextmanager
    def tx(self) -> Iterator[Connection]:
        """One transaction."""
        with self.driver_errors(), self.engine.begin() as conn:
            yield conn

    @contextmanager
    def one(self) -> Iterator[Connection]:
        """For one atomic statement; SQLite keeps its serialised BEGIN."""
        with self.tx() as conn:
            yield conn

    def insert(self, table: Any) -> Any:
        """An INSERT that knows ``ON CONFLICT DO NOTHING`` in this dialect."""
        return sqlite_insert(table)

    def lock_for_sweep(self, query: Select[Any]) -> Select[Any]:
        """SQLite serialises writers: nothing to lock or skip."""
        return query

    def close(self) -> None:
        """Release connections."""
        self.engine.dispose()

    # -- the fence and the writes under it ---------------------------------------------

    @staticmethod
    def fence(lease: Lease) -> tuple[Any, ...]:
        """``_lifecycle.holds_lease``: the rows ``lease`` may still write."""
        return (
            flows.c.id == lease.flow_id,
            flows.c.epoch == lease.epoch,
            flows.c.lease_owner == lease.owner,
            flows.c.status == FlowStatus.RUNNING,
        )

    def touch(self, conn: Connection, lease: Lease, ttl: float, **values: Any) -> Any:
        """The fenced write every executor transaction starts with; it takes the row lock."""
        now = self.now()
        got = conn.execute(
            update(flows)
            .where(*self.fence(lease))
            .values(lease_until=now + timedelta(seconds=ttl), updated_at=now, **values)
            .returning(flows.c.waiting_on, flows.c.deadline, flows.c.cancel_reason)
        ).first()
        if got is None:
            raise lease_lost(lease)
        return got

    def touch_unless_cancelled(self, conn: Connection, lease: Lease, ttl: float = 1.0) -> Any:
        """The fenced touch; None (and the flow cancelled) if cancellation was asked."""
        row = self.touch(conn, lease, ttl)
        if row.cancel_reason is not None:
            self.end(conn, lease.flow_id, FlowStatus.CANCELLED)
            return None
        return row

    def end(self, conn: Connection, flow_id: str, status: str, **values: Any) -> None:
        """Give the flow a terminal status (the caller holds its row lock)."""
        now = self.now()
        conn.execute(
            update(flows)
            .where(flows.c.id == flow_id)
            .values(status=status, finished_at=now, updated_at=now, **NO_LEASE, **values)
        )

    def suspend(self, conn: Connection, flow_id: str, **values: Any) -> None:
        """Suspend the flow and free its lease (the caller holds its row lock).

        A suspend is progress: the crash-loop count starts again.
        """
        conn.execute(
            update(flows)
            .where(flows.c.id == flow_id)
            .values(
                status=FlowStatus.SUSPENDED, lease_owner=None, lease_until=None, lapses=0, **values
            )
        )

    def insert_step(
        self,
        conn: Connection,
        lease: Lease,
        cp: Checkpoint,
        *,
        started_at: datetime | None,
        attempts: int,
        **flow_values: Any,
    ) -> None:
        """Insert a checkpoint row (the caller's fenced touch came first).

        In the same transaction, one UPDATE of the flow's row sets ``flow_values``,
        chains the checkpoint into its digest, and starts the crash-loop count again (a
        checkpoint is progress).
        """
        conn.execute(
            update(flows)
            .where(flows.c.id == lease.flow_id)
            .values(
                history_digest=self.next_digest(conn, lease.flow_id, cp), lapses=0, **flow_values
            )
        )
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
                completed_at=self.now(),
            )
        )

    def next_digest(self, conn: Connection, flow_id: str, cp: Checkpoint) -> Any:
        """The flow's chained digest with ``cp`` in (``_lifecycle.next_digest``), in Python."""
        previous = conn.execute(
            select(flows.c.history_digest).where(flows.c.id == flow_id)
        ).scalar()
        return life.next_digest(previous, cp.seq, cp.kind, cp.name, cp.occurrence, cp.result)

    def flow_row(self, r: Any, **extra: Any) -> FlowRow:
        """A ``crux_flows`` row as plain data."""
        return FlowRow(
            id=r.id,
            name=r.name,
            status=r.status,
            input=r.input,
            result=r.result,
            error=r.error,
            cancel_reason=r.cancel_reason,
            waiting_on=r.waiting_on,
            deadline=aware(r.deadline),
            wake_at=aware(r.wake_at),
            wake_kind=r.wake_kind,
            epoch=int(r.epoch),
            created_at=aware(r.created_at) or self.now(),
            updated_at=aware(r.updated_at) or self.now(),
            finished_at=aware(r.finished_at),
            waiting_schema=r.waiting_schema,
            forked_from=r.forked_from,
            forked_at=r.forked_at,
            retries=int(r.retries or 0),
            **extra,
        )
