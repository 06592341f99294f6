"""Where Postgres differs from SQLite: one place, as subclasses of the SQLite paths.

Postgres has row locks and ``SKIP LOCKED``, runs one statement as a transaction of
its own (autocommit saves the BEGIN and COMMIT round trips), and takes the step
commit and the signal as single statements (``_sql_rules.COMMIT_STEP`` and
``_sql_rules.RECORD_SIGNAL``) on the two hottest paths.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, Select, Text, Update, bindparam, func, literal, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert

from ..errors import FlowNotFound, StoreError
from . import _lifecycle as life
from . import _sql_rules as rules
from ._batch import NewFlow
from ._lifecycle import FlowStatus, WakeKind
from ._schema import flows
from ._sql_client import ROW_COLUMNS, SqlClient, new_flow, not_waiting
from ._sql_db import SqlDb, lease_lost
from ._sql_exec import SqlExecutor
from ._types import Checkpoint, FlowRow, Lease, SchemaCheck, SignalResult

# The row as it was before the claim (a self-join): built once, its columns proxied once.
_WAS = flows.alias("was")


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


class PgExecutor(SqlExecutor):
    """The executor's writes on Postgres: the step commit in one statement."""

    def _claim_and_wake(
        self, conn: Connection, claim: Update, flow_id: str
    ) -> tuple[Any, Any, Any]:
        """The claim in one statement; a self-join returns the row as it was before it."""
        was = _WAS
        got = conn.execute(
            claim.where(was.c.id == flows.c.id).returning(
                was.c.wake_at.label("woke_at"), was.c.wake_kind.label("woke_by")
            )
        ).first()
        return got, got.woke_at if got else None, got.woke_by if got else None

    def commit_checkpoint(
        self, lease: Lease, cp: Checkpoint, *, started_at: datetime, attempts: int, ttl: float
    ) -> bool:
        """Commit a checkpoint if ``lease`` still holds; True if the flow is now cancelled."""
        # The step's hot path: the fenced touch and the insert in one statement, one
        # round trip. The insert reads the touch's output, so it happens only if the
        # epoch still holds.
        db = self._db
        now = db.now()
        with db.one() as conn:
            got = conn.execute(
                rules.COMMIT_STEP,
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
                    "cp_digest": life.cp_digest(cp.seq, cp.kind, cp.name, cp.occurrence, cp.result),
                    "attempts": attempts,
                    "started_at": started_at,
                },
            ).one()
        if not got.touched:
            raise lease_lost(lease)
        if got.cancel_reason is None:
            return False
        with db.tx() as conn:
            db.touch(conn, lease, ttl)
            db.end(conn, lease.flow_id, FlowStatus.CANCELLED)
        return True


class PgClient(SqlClient):
    """The client's writes on Postgres: a new flow and a signal in one statement each."""

    def create_flow(self, flow_id: str, name: str, input_json: str) -> tuple[FlowRow, bool]:
        """Insert a pending flow, or return the existing row; the bool says if created."""
        # A new flow (the common case) is one autocommit INSERT that returns its row: no
        # BEGIN, no SELECT, no COMMIT round trip. Only a taken id reads the row it found.
        db = self._db
        for _ in range(3):
            with db.one() as conn:
                created = conn.execute(new_flow(db, flow_id, name, input_json)).first()
                if created is not None:
                    return db.flow_row(created), True
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
        now = literal(self._db.now(), flows.c.created_at.type)
        fixed = {
            flows.c.status: literal(FlowStatus.PENDING.value, flows.c.status.type),
            flows.c.wake_at: now,
            flows.c.wake_kind: literal(WakeKind.RUN.value, flows.c.wake_kind.type),
            flows.c.epoch: literal(0),
            flows.c.next_seq: literal(0),
            flows.c.runs: literal(0),
            flows.c.retries: literal(0),
            flows.c.created_at: now,
            flows.c.updated_at: now,
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
