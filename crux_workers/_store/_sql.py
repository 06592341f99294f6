"""The durable record on SQLAlchemy Core: PostgreSQL in production, SQLite embedded.

``SqlStore`` is a composition root: it picks the dialect once (``SqlDb`` or
``PgDb``, ``SqlExecutor`` or ``PgExecutor``, ``SqlClient`` or ``PgClient``) and
hands every call to the piece that owns its role:

- ``_sql_exec.py``: what an executor writes, fenced by its lease epoch;
- ``_sql_client.py``: create, signal, resume, cancel and read a flow;
- ``_sql_tasks.py``: child tasks (``run_task``);
- ``_sql_sweep.py``: the sweeper's tick and sweep;
- ``_sql_admin.py``: the operator's listing, purging and refused messages;
- ``_sql_pg.py``: where Postgres differs; ``_sql_rules.py``: the rules as SQL.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Literal

from sqlalchemy import Engine

from ._clock import utcnow
from ._lifecycle import ACTIVE
from ._roles import CruxStore
from ._sql_admin import SqlAdmin
from ._sql_client import SqlClient
from ._sql_db import SqlDb, make_engine
from ._sql_exec import SqlExecutor
from ._sql_pg import PgClient, PgDb, PgExecutor
from ._sql_sweep import SqlSweeper
from ._sql_tasks import SqlTasks
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
    StepCommit,
    SuspendOutcome,
    Suspension,
    SweepResult,
    TaskError,
    TaskPoint,
    TaskSend,
    Validator,
    WaitRow,
)

__all__ = ["ACTIVE", "SqlStore", "make_engine"]


class SqlStore:
    """``CruxStore`` on PostgreSQL or SQLite."""

    def __init__(
        self, url: str, *, engine: Engine | None = None, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self.url = url
        engine = engine or make_engine(url)
        if engine.dialect.name == "sqlite":
            db = SqlDb(url, engine, clock)
            self._exec, self._client = SqlExecutor(db), SqlClient(db)
        else:
            db = PgDb(url, engine, clock)
            self._exec, self._client = PgExecutor(db), PgClient(db)
        self._db = db
        self._tasks = SqlTasks(db)
        self._sweeper = SqlSweeper(db)
        self._admin = SqlAdmin(db)

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine, for migrations and tests."""
        return self._db.engine

    def close(self) -> None:
        """Release connections."""
        self._db.close()

    # -- ExecutorStore ------------------------------------------------------------------

    def claim(
        self, flow_id: str, owner: str, ttl: float, *, max_lapses: int | None = None
    ) -> Claimed | NotClaimed:
        """Take the lease if it is free; park a flow that took ``max_lapses`` lapses."""
        return self._exec.claim(flow_id, owner, ttl, max_lapses=max_lapses)

    def renew(self, lease: Lease, ttl: float) -> bool:
        """Extend the lease; False when it was lost."""
        return self._exec.renew(lease, ttl)

    def release(self, lease: Lease) -> None:
        """Give the lease up without changing the flow, so the next claim need not wait."""
        self._exec.release(lease)

    def load_checkpoints(self, flow_id: str) -> list[Checkpoint]:
        """All committed checkpoints of the flow, in sequence order."""
        return self._exec.load_checkpoints(flow_id)

    def now(self) -> datetime:
        """The record's notion of the current time (UTC)."""
        return self._exec.now()

    def commit_checkpoint(
        self, lease: Lease, cp: Checkpoint, *, started_at: datetime, attempts: int, ttl: float
    ) -> bool:
        """Commit a checkpoint if ``lease`` still holds; True if the flow is now cancelled."""
        return self._exec.commit_checkpoint(
            lease, cp, started_at=started_at, attempts=attempts, ttl=ttl
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
        return self._exec.fail_step(lease, seq, name, attempt, error, retry_in)

    def suspend_until(self, lease: Lease, wake_at: datetime, kind: str) -> SuspendOutcome:
        """Suspend without waiting for a signal, until ``wake_at`` (a sleep)."""
        return self._exec.suspend_until(lease, wake_at, kind)

    def poll_later(self, lease: Lease, point: Suspension, every: float) -> SuspendOutcome:
        """A ``wait_until`` check came back false: look again in ``every`` seconds."""
        return self._exec.poll_later(lease, point, every)

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
        return self._exec.take_signal_or_suspend(lease, point, validate, ttl, step=step)

    def take_task_or_send(
        self, lease: Lease, point: TaskPoint, ttl: float
    ) -> Checkpoint | TaskSend | TaskError | SuspendOutcome:
        """The child task's outcome as a checkpoint, or what to do about it."""
        return self._tasks.take_task_or_send(lease, point, ttl)

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
        return self._exec.finish(lease, status, result=result, error=error, step=step)

    # -- ClientStore ----------------------------------------------------------------------

    def create_flow(self, flow_id: str, name: str, input_json: str) -> tuple[FlowRow, bool]:
        """Insert a pending flow, or return the existing row; the bool says if created."""
        return self._client.create_flow(flow_id, name, input_json)

    def create_flows(self, items: Sequence[tuple[str, str, str]]) -> list[tuple[FlowRow, bool]]:
        """Insert many pending flows in one transaction; all or nothing."""
        return self._client.create_flows(items)

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
        return self._client.record_signal(flow_id, name, payload, key, check=check)

    def retry_flow(self, flow_id: str) -> str:
        """Make a failed flow due again from its last checkpoint; return its flow name."""
        return self._client.retry_flow(flow_id)

    def fork_flow(self, source_id: str, new_id: str, at: int, input_json: str | None) -> FlowRow:
        """A new pending flow with the first ``at`` checkpoints of ``source_id``, due now."""
        return self._client.fork_flow(source_id, new_id, at, input_json)

    def request_resume(self, flow_id: str) -> str:
        """Mark a suspended flow as due now; return its flow name."""
        return self._client.request_resume(flow_id)

    def cancel(self, flow_id: str, reason: str) -> str:
        """Cancel at once ("cancelled") or at the running executor's next step ("cancelling")."""
        return self._client.cancel(flow_id, reason)

    def get_flow(self, flow_id: str, *, details: bool = True) -> FlowRow:
        """The flow's row, with steps and signals when ``details``; ``FlowNotFound`` if none."""
        return self._client.get_flow(flow_id, details=details)

    def complete_task(
        self, task_id: str, *, result: str | None, error: str | None
    ) -> tuple[str, str] | None:
        """Record a child's outcome once; the (flow name, flow id) to wake, if any."""
        return self._tasks.complete_task(task_id, result=result, error=error)

    # -- SweeperStore ---------------------------------------------------------------------

    def claim_tick(self, tick: int) -> bool:
        """True for the first sweep of a tick; False when another beat's sweep took it."""
        return self._sweeper.claim_tick(tick)

    def sweep(self, *, limit: int, redrive_after: float) -> SweepResult:
        """Expire overdue suspends; mark due and stalled flows and return them to publish."""
        return self._sweeper.sweep(limit=limit, redrive_after=redrive_after)

    # -- AdminStore -----------------------------------------------------------------------

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
        """Counts for the metrics gauges, read in one query."""
        return self._admin.metrics_snapshot()


def _conforms(store: SqlStore) -> CruxStore:
    # mypy checks here that SqlStore is a whole ``CruxStore``.
    return store
