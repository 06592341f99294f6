"""Where Postgres differs from SQLite: one place, as subclasses of the SQLite paths.

Postgres has row locks and ``SKIP LOCKED``, runs one statement as a transaction of
its own (autocommit saves the BEGIN and COMMIT round trips), and takes the hot path as
single statements of ``_sql_rules``: the claim (``CLAIM``, which also takes the waking
signal), a step (``COMMIT_STEP``), the last step with the finish (``FINISH_STEP``) and
a signal (``RECORD_SIGNAL``); and a start as ``CREATE_FLOW`` below. Those run on the
driver's connection (``PgDb.first``): prepared once per connection, without
SQLAlchemy's per-call work, which costs more CPU than the statement itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import namedtuple_row
from sqlalchemy import (
    Connection,
    Engine,
    Select,
    Text,
    TextClause,
    bindparam,
    func,
    literal,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert

from .._settings import redact
from ..errors import FlowNotFound, RecordRefused, StoreError
from . import _lifecycle as life
from . import _sql_rules as rules
from ._batch import NewFlow
from ._lifecycle import CheckpointKind, FlowStatus
from ._schema import flows
from ._sql_client import ROW_COLUMNS, SqlClient, new_flow_values, not_waiting
from ._sql_db import SqlDb, lease_lost
from ._sql_exec import SqlExecutor
from ._types import Checkpoint, FlowRow, Lease, SchemaCheck, SignalResult, StepCommit


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

    def first(self, stmt: TextClause, params: dict[str, Any]) -> Any:
        """Run one hot-path statement in autocommit on a pooled connection's driver.

        The statement is prepared on the connection (psycopg, once) and SQLAlchemy's
        per-call work (compiling the cache key, binding, the result's metadata) is
        skipped: 60-70 us of CPU instead of 160-190 us a statement on this machine.
        Returns the first row (columns as attributes), or None. Errors leave as
        ``StoreError`` (try later) or ``RecordRefused`` (a data error), as elsewhere.
        """
        sql = _driver_sql(stmt)
        # A checkout that has to connect raises the driver's own error: the pool does
        # not translate it as a Connection would.
        with self.driver_errors():
            try:
                fairy = self.engine.raw_connection()
            except psycopg.Error as exc:
                raise self._refusal(exc) from exc
        try:
            conn = fairy.driver_connection
            assert isinstance(conn, psycopg.Connection)
            conn.autocommit = True
            try:
                cur = conn.cursor(row_factory=namedtuple_row)
                cur.execute(sql, params, prepare=True)
                return cur.fetchone()
            finally:
                if not conn.closed:
                    conn.autocommit = False
        except psycopg.Error as exc:
            if _connection_level(exc):
                fairy.invalidate()
            raise self._refusal(exc) from exc
        finally:
            fairy.close()

    def _refusal(self, exc: psycopg.Error) -> StoreError:
        """The driver's error as the seam's: ``StoreError`` (try later) or ``RecordRefused``."""
        retry_later = _connection_level(exc)
        kind = StoreError if retry_later else RecordRefused
        return kind(
            f"database error on {redact(self.url)}: {exc!r}",
            url=redact(self.url),
            connection_invalidated=retry_later,
        )

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


_PARAM = re.compile(r"(?<![:\w]):(\w+)")
_DRIVER_SQL: dict[int, str] = {}


def _driver_sql(stmt: TextClause) -> str:
    """``stmt``'s SQL with psycopg's placeholders (``:name`` becomes ``%(name)s``)."""
    sql = _DRIVER_SQL.get(id(stmt))
    if sql is None:
        sql = _DRIVER_SQL[id(stmt)] = _PARAM.sub(r"%(\1)s", stmt.text.replace("%", "%%"))
    return sql


def _connection_level(exc: psycopg.Error) -> bool:
    """As ``_sql_db.connection_level``, for the driver's own errors."""
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return True
    code = exc.sqlstate or ""
    return code.startswith(("40", "08"))


class PgExecutor(SqlExecutor):
    """The executor's writes on Postgres: the claim, a step and the finish in one statement."""

    _db: PgDb

    def _claim_and_wake(
        self, flow_id: str, owner: str, lease_until: datetime, now: datetime
    ) -> tuple[Any, Any, Any, Checkpoint | None]:
        """The claim in one statement (``_sql_rules.CLAIM``), committed without a flush.

        It returns the row as it was before (the wake it cleared) and, for a flow woken
        in a wait with no schema, the signal it consumed as the wait's checkpoint.
        """
        params = {"flow_id": flow_id, "owner": owner, "lease_until": lease_until, "now": now}
        got = self._db.first(rules.CLAIM, params)
        if got is None:
            # The row moved between the statement's snapshot and its lock (another
            # execution ended meanwhile): once more, on a fresh snapshot.
            got = self._db.first(rules.CLAIM, params)
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

    def _commit_step(
        self, conn: Connection | None, lease: Lease, step: StepCommit, ttl: float
    ) -> Any:
        """``COMMIT_STEP`` in the caller's transaction, or on its own (``conn`` None)."""
        now = self._db.now()
        params = _step_params(lease, step, now)
        params["lease_until"] = now + timedelta(seconds=ttl)
        params["result"] = step.cp.result
        if conn is None:
            got = self._db.first(rules.COMMIT_STEP, params)
        else:
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
        got = self._commit_step(None, lease, StepCommit(cp, started_at, attempts), ttl)
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
        got = self._db.first(rules.FINISH_STEP, params)
        if got.status is None:
            raise lease_lost(lease)
        return str(got.status)


# A new flow (``new_flow_values``: pending, due now), prebuilt for the driver
# (``PgDb.first``): a start is the hot path of a producer, and SQLAlchemy's building and
# compiling of the INSERT cost more CPU than the statement. A taken id returns no row.
_NEW_COLUMNS = ("id", "name", "input", *new_flow_values(None))
CREATE_FLOW = text(
    f"INSERT INTO crux_flows ({', '.join(_NEW_COLUMNS)})"
    f" VALUES ({', '.join(':' + c for c in _NEW_COLUMNS)})"
    " ON CONFLICT (id) DO NOTHING"
    f" RETURNING {', '.join(c.name for c in ROW_COLUMNS)}"
)


class PgClient(SqlClient):
    """The client's writes on Postgres: a new flow and a signal in one statement each."""

    _db: PgDb

    def create_flow(self, flow_id: str, name: str, input_json: str) -> tuple[FlowRow, bool]:
        """Insert a pending flow, or return the existing row; the bool says if created."""
        # A new flow (the common case) is one autocommit INSERT that returns its row
        # (``CREATE_FLOW``): no BEGIN, no SELECT, no COMMIT round trip. Only a taken id
        # reads the row it found.
        db = self._db
        for _ in range(3):
            params = {"id": flow_id, "name": name, "input": input_json}
            created = db.first(CREATE_FLOW, {**params, **new_flow_values(db.now())})
            if created is not None:
                return db.flow_row(created), True
            with db.one() as conn:
                row = conn.execute(select(flows).where(flows.c.id == flow_id)).first()
            if row is not None:
                return db.flow_row(row), False
            # The row that took the id was purged in between: the INSERT can succeed now.
        raise StoreError(f"flow {flow_id!r}: its row kept disappearing while it was created")

    def _insert_new(self, items: Sequence[NewFlow]) -> Any:
        """The batch's INSERT as ``INSERT ... SELECT FROM unnest(ids, names, inputs)``.

        Three array parameters instead of a VALUES row each: one compiled (and cached)
        statement for every batch size, and a few bind parameters for 1000 flows.
        """
        new = (
            func.unnest(
                bindparam("ids", [i for i, _, _ in items], ARRAY(Text)),
                bindparam("names", [n for _, n, _ in items], ARRAY(Text)),
                bindparam("inputs", [j for _, _, j in items], ARRAY(Text)),
            )
            .table_valued("id", "name", "input")
            .render_derived()
        )
        fixed = {
            flows.c[k]: literal(v, flows.c[k].type)
            for k, v in new_flow_values(self._db.now()).items()
        }
        rows = select(new.c.id, new.c.name, new.c.input, *fixed.values())
        return (
            pg_insert(flows)
            .from_select(["id", "name", "input", *(c.name for c in fixed)], rows)
            .on_conflict_do_nothing(index_elements=["id"])
            .returning(*ROW_COLUMNS)
        )

    def _record_signal(
        self, flow_id: str, name: str, payload: str, key: str | None, check: SchemaCheck | None
    ) -> SignalResult:
        # The same steps as SqlClient's transaction, as one statement: one round trip and
        # one commit on the caller's side of every signal. With ``check``, a flow waiting
        # on this name with a schema refuses the insert and returns the schema; once the
        # payload passed it, a second statement inserts, if the flow still waits with it.
        checked: str | None = None
        while True:
            row = self._db.first(
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
            )
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
