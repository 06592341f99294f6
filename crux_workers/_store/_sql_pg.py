"""Where Postgres differs from SQLite: one place, as subclasses of the SQLite paths.

Postgres has row locks and ``SKIP LOCKED``, runs one statement as a transaction of
its own (autocommit saves the BEGIN and COMMIT round trips), and takes the step
commit and the signal as single statements (``_sql_rules.COMMIT_STEP`` and
``_sql_rules.RECORD_SIGNAL``) on the two hottest paths.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, Select
from sqlalchemy.dialects.postgresql import insert as pg_insert

from ..errors import FlowNotFound
from . import _lifecycle as life
from . import _sql_rules as rules
from ._lifecycle import CheckpointKind, FlowStatus
from ._sql_client import SqlClient, not_waiting
from ._sql_db import SqlDb, lease_lost
from ._sql_exec import SqlExecutor
from ._types import Checkpoint, Lease, SchemaCheck, SignalResult, StepCommit


class PgDb(SqlDb):
    """The plumbing on Postgres."""

    def __init__(self, url: str, engine: Engine, clock: Callable[[], datetime]) -> None:
        super().__init__(url, engine, clock)
        self._auto = engine.execution_options(isolation_level="AUTOCOMMIT")

    @contextmanager
    def one(self) -> Iterator[Connection]:
        """For one atomic statement: autocommit, so no BEGIN and COMMIT round trips.

        A single statement (an UPDATE ... RETURNING, or a CTE that updates and
        inserts) is a transaction by itself.
        """
        with self.driver_errors(), self._auto.connect() as conn:
            yield conn

    def insert(self, table: Any) -> Any:
        """An INSERT that knows ``ON CONFLICT DO NOTHING``."""
        return pg_insert(table)

    def next_digest(self, conn: Connection, flow_id: str, cp: Checkpoint) -> Any:
        """The chained digest as an SQL expression: no extra round trip to read it first."""
        cp_hex = life.cp_digest(cp.seq, cp.kind, cp.name, cp.occurrence, cp.result)
        return rules.next_digest(cp.seq, cp_hex)

    def lock_for_sweep(self, query: Select[Any]) -> Select[Any]:
        """Two sweepers share the due rows instead of waiting on each other's locks."""
        return query.with_for_update(skip_locked=True)


def _step_params(lease: Lease, step: StepCommit, now: datetime) -> dict[str, Any]:
    """The parameters of a step's row, fenced by ``lease`` (``COMMIT_STEP``, ``FINISH_STEP``)."""
    cp = step.cp
    return {
        "flow_id": lease.flow_id,
        "epoch": lease.epoch,
        "owner": lease.owner,
        "now": now,
        "next_seq": cp.seq + 1,
        "seq": cp.seq,
        "kind": cp.kind,
        "name": cp.name,
        "occurrence": cp.occurrence,
        "cp_digest": life.cp_digest(cp.seq, cp.kind, cp.name, cp.occurrence, cp.result),
        "attempts": step.attempts,
        "started_at": step.started_at,
    }


class PgExecutor(SqlExecutor):
    """The executor's writes on Postgres: the claim, a step and the finish in one statement."""

    def _claim_and_wake(
        self, conn: Connection, flow_id: str, owner: str, lease_until: datetime, now: datetime
    ) -> tuple[Any, Any, Any, Checkpoint | None]:
        """The claim in one statement (``_sql_rules.CLAIM``), committed without a flush.

        It returns the row as it was before (the wake it cleared) and, for a flow woken
        in a wait with no schema, the signal it consumed as the wait's checkpoint.
        """
        params = {"flow_id": flow_id, "owner": owner, "lease_until": lease_until, "now": now}
        got = conn.execute(rules.CLAIM, params).first()
        if got is None:
            # The row moved between the statement's snapshot and its lock (another
            # execution ended meanwhile): once more, on a fresh snapshot.
            got = conn.execute(rules.CLAIM, params).first()
        if got is None:
            return None, None, None, None
        consumed = None
        if got.sig_id is not None:
            consumed = Checkpoint(
                int(got.cp_seq),
                CheckpointKind.SUSPEND.value,
                got.cp_name,
                int(got.cp_occurrence),
                got.cp_result,
            )
        return got, got.woke_at, got.woke_by, consumed

    def _open(self, conn: Connection, lease: Lease, ttl: float, step: StepCommit | None) -> Any:
        """With a step: its commit statement is the fenced touch (one round trip, not three)."""
        if step is None:
            return super()._open(conn, lease, ttl, step)
        got = self._commit_step(conn, lease, step, ttl)
        if got.cancel_reason is not None:
            self._db.end(conn, lease.flow_id, FlowStatus.CANCELLED)
            return None
        return got

    def _commit_step(self, conn: Connection, lease: Lease, step: StepCommit, ttl: float) -> Any:
        now = self._db.now()
        params = _step_params(lease, step, now)
        params["lease_until"] = now + timedelta(seconds=ttl)
        params["result"] = step.cp.result
        got = conn.execute(rules.COMMIT_STEP, params).one()
        if not got.touched:
            raise lease_lost(lease)
        return got

    def commit_checkpoint(
        self, lease: Lease, cp: Checkpoint, *, started_at: datetime, attempts: int, ttl: float
    ) -> bool:
        """Commit a checkpoint if ``lease`` still holds; True if the flow is now cancelled."""
        # The step's hot path: the fenced touch and the insert in one statement, one
        # round trip. The insert reads the touch's output, so it happens only if the
        # epoch still holds.
        db = self._db
        with db.one() as conn:
            got = self._commit_step(conn, lease, StepCommit(cp, started_at, attempts), ttl)
        if got.cancel_reason is None:
            return False
        with db.tx() as conn:
            db.touch(conn, lease, ttl)
            db.end(conn, lease.flow_id, FlowStatus.CANCELLED)
        return True

    def finish(
        self,
        lease: Lease,
        status: str,
        *,
        result: str | None = None,
        error: str | None = None,
        step: StepCommit | None = None,
    ) -> str:
        """End the flow; with ``step``, its row and the end in one statement (``FINISH_STEP``)."""
        if step is None:
            return super().finish(lease, status, result=result, error=error)
        params = _step_params(lease, step, self._db.now())
        params.update(status=status, result=result, error=error, step_result=step.cp.result)
        with self._db.one() as conn:
            got = conn.execute(rules.FINISH_STEP, params).one()
        if got.status is None:
            raise lease_lost(lease)
        return str(got.status)


class PgClient(SqlClient):
    """The client's writes on Postgres: a signal in one statement."""

    def _record_signal(
        self, flow_id: str, name: str, payload: str, key: str | None, check: SchemaCheck | None
    ) -> SignalResult:
        # The same steps as SqlClient's transaction, as one statement: one round trip and
        # one commit on the caller's side of every signal. With ``check``, a flow waiting
        # on this name with a schema refuses the insert and returns the schema; once the
        # payload passed it, a second statement inserts, if the flow still waits with it.
        checked: str | None = None
        while True:
            with self._db.one() as conn:
                row = conn.execute(
                    rules.RECORD_SIGNAL,
                    {
                        "flow_id": flow_id,
                        "name": name,
                        "payload": payload,
                        "key": key,
                        "now": self._db.now(),
                        "gate": check is not None,
                        "checked": checked,
                    },
                ).first()
            if row is None:
                raise FlowNotFound(f"no flow {flow_id!r}", flow_id=flow_id)
            if row.dup_id is not None:
                return SignalResult(int(row.dup_id), row.name, duplicate=True, wake=False)
            if row.new_id is not None:
                return SignalResult(int(row.new_id), row.name, duplicate=False, wake=bool(row.woke))
            if row.gated is None:
                raise not_waiting(flow_id, row.status, name)
            assert check is not None
            check(row.gated)
            checked = row.gated
