"""What a client does on the SQL record: create, signal, resume, cancel, read a flow.

These are the transaction paths; ``PgClient`` in ``_sql_pg.py`` records a signal in
one statement on Postgres.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import insert, select, update

from ..errors import (
    FlowAlreadyFinished,
    FlowIdConflict,
    FlowNotFound,
    FlowNotRetryable,
    FlowNotWaiting,
    InvalidInput,
    StoreError,
)
from . import _lifecycle as life
from ._batch import NewFlow, check_distinct, refuse_taken
from ._clock import aware
from ._lifecycle import FlowStatus, SignalStatus, TaskStatus, WakeKind
from ._schema import flows, signals, step_errors, steps, tasks
from ._sql_db import NO_LEASE, SqlDb
from ._types import FlowRow, SchemaCheck, SignalResult, SignalRow, StepErrorRow, StepRow

# What ``SqlDb.flow_row`` reads: an INSERT returns these, so a new flow needs no SELECT.
ROW_COLUMNS = (
    flows.c.id,
    flows.c.name,
    flows.c.status,
    flows.c.input,
    flows.c.result,
    flows.c.error,
    flows.c.cancel_reason,
    flows.c.waiting_on,
    flows.c.deadline,
    flows.c.wake_at,
    flows.c.wake_kind,
    flows.c.epoch,
    flows.c.created_at,
    flows.c.updated_at,
    flows.c.finished_at,
    flows.c.waiting_schema,
    flows.c.forked_from,
    flows.c.forked_at,
    flows.c.retries,
)

# How often a batch is tried again when a row it conflicted with was purged meanwhile.
_RACES = 3


def new_flow_values(now: Any) -> dict[str, Any]:
    """The columns a new flow sets besides its id, name and input: pending, due now."""
    return {
        "status": FlowStatus.PENDING.value,
        "wake_at": now,
        "wake_kind": WakeKind.RUN.value,
        "epoch": 0,
        "next_seq": 0,
        "runs": 0,
        "retries": 0,
        "created_at": now,
        "updated_at": now,
    }


def new_flow(db: SqlDb, flow_id: str, name: str, input_json: str) -> Any:
    """``INSERT`` one pending flow, due now; ``ON CONFLICT DO NOTHING RETURNING`` its row.

    A taken id returns no row. The single-row form, so its compiled SQL is cached.
    """
    return (
        db.insert(flows)
        .values(id=flow_id, name=name, input=input_json, **new_flow_values(db.now()))
        .on_conflict_do_nothing(index_elements=["id"])
        .returning(*ROW_COLUMNS)
    )


def new_flows(db: SqlDb, items: Sequence[NewFlow]) -> Any:
    """``INSERT`` pending flows in one multi-row statement; returns the rows of those created.

    (Not cached: a multi-row VALUES is compiled per call. Postgres overrides it.)
    """
    base = new_flow_values(db.now())
    rows = [{"id": i, "name": n, "input": j, **base} for i, n, j in items]
    return (
        db.insert(flows)
        .values(rows)
        .on_conflict_do_nothing(index_elements=["id"])
        .returning(*ROW_COLUMNS)
    )


class _Vanished(Exception):
    """A row the batch conflicted with was gone when read (purged): try again."""


def not_waiting(flow_id: str, status: str, name: str) -> FlowNotWaiting:
    """The refusal of a signal to a finished flow."""
    return FlowNotWaiting(
        f"flow {flow_id!r} is {status}; signal {name!r} refused",
        flow_id=flow_id,
        status=status,
        signal=name,
    )


def not_retryable(flow_id: str, status: str) -> FlowNotRetryable:
    """The refusal of a retry of a flow that has not failed."""
    return FlowNotRetryable(
        f"flow {flow_id!r} is {status}; only a failed flow can be retried",
        flow_id=flow_id,
        status=status,
    )


def bad_fork_point(flow_id: str, at: int, recorded: int) -> InvalidInput:
    """The refusal of a fork past the source's checkpoints."""
    return InvalidInput(
        f"flow {flow_id!r} has {recorded} checkpoint(s); fork at 0..{recorded}, not {at}",
        flow_id=flow_id,
        at=at,
    )


# What a retried flow no longer has: it is pending again, due now, at its last checkpoint.
_RETRIED = {
    "status": FlowStatus.PENDING,
    "result": None,
    "error": None,
    "cancel_reason": None,
    "finished_at": None,
    "retry_attempt": 0,
    "wake_kind": WakeKind.RUN,
    **{k: v for k, v in NO_LEASE.items() if k not in ("wake_at", "wake_kind")},
}


def fork_conflict(flow_id: str) -> FlowIdConflict:
    """The refusal of a fork onto an id that is taken."""
    return FlowIdConflict(f"flow id {flow_id!r} is taken; a fork needs a new id", flow_id=flow_id)


class SqlClient:
    """``ClientStore`` on SQL."""

    def __init__(self, db: SqlDb) -> None:
        self._db = db

    def create_flow(self, flow_id: str, name: str, input_json: str) -> tuple[FlowRow, bool]:
        """Insert a pending flow, or return the existing row; the bool says if created."""
        db = self._db
        with db.tx() as conn:
            created = conn.execute(new_flow(db, flow_id, name, input_json)).first()
            if created is not None:
                return db.flow_row(created), True
            row = conn.execute(select(flows).where(flows.c.id == flow_id)).one()
        return db.flow_row(row), False

    def create_flows(self, items: Sequence[NewFlow]) -> list[tuple[FlowRow, bool]]:
        """Insert many pending flows in one transaction; each one's row and if created.

        One multi-row INSERT; only the ids that existed already are read back. An id
        taken by another flow name refuses the whole batch (``FlowIdConflict``) and
        nothing is recorded; so do ids repeated within ``items`` (``InvalidInput``).
        """
        if not items:
            return []
        check_distinct(items)
        db = self._db
        for _ in range(_RACES):
            try:
                with db.tx() as conn:
                    got = {r.id: r for r in conn.execute(self._insert_new(items)).all()}
                    taken = [flow_id for flow_id, _, _ in items if flow_id not in got]
                    existing = {}
                    if taken:
                        rows = conn.execute(select(flows).where(flows.c.id.in_(taken))).all()
                        existing = {r.id: r for r in rows}
                        if len(existing) < len(taken):
                            raise _Vanished
                        refuse_taken(items, {i: r.name for i, r in existing.items()})
            except _Vanished:
                continue
            return [
                (db.flow_row(got[flow_id]), True)
                if flow_id in got
                else (db.flow_row(existing[flow_id]), False)
                for flow_id, _, _ in items
            ]
        raise StoreError("create_flows: existing flows kept disappearing (purged meanwhile?)")

    def _insert_new(self, items: Sequence[NewFlow]) -> Any:
        """The batch's INSERT: a multi-row VALUES here."""
        return new_flows(self._db, items)

    def cancel(self, flow_id: str, reason: str) -> str:
        """Cancel at once ("cancelled") or at the running executor's next step ("cancelling")."""
        db, c = self._db, flows.c
        now = db.now()
        with db.tx() as conn:
            row = conn.execute(
                select(c.status, c.lease_owner, c.lease_until)
                .where(c.id == flow_id)
                .with_for_update()
            ).first()
            if row is None:
                raise FlowNotFound(f"no flow {flow_id!r}", flow_id=flow_id)
            if life.is_terminal(row.status):
                raise FlowAlreadyFinished(
                    f"flow {flow_id!r} is already {row.status}; nothing to cancel",
                    flow_id=flow_id,
                    status=row.status,
                )
            conn.execute(update(flows).where(c.id == flow_id).values(cancel_reason=reason))
            if life.cancels_at_next_step(row.status, row.lease_owner, aware(row.lease_until), now):
                return "cancelling"
            db.end(conn, flow_id, FlowStatus.CANCELLED)
        return "cancelled"

    def record_signal(
        self,
        flow_id: str,
        name: str,
        payload: str,
        key: str | None,
        *,
        check: SchemaCheck | None = None,
    ) -> SignalResult:
        """Durably record a signal; raise ``FlowNotFound`` or ``FlowNotWaiting``.

        With ``check``, a payload for a flow waiting on ``name`` with a schema is
        checked first, under the flow's lock; if ``check`` raises, nothing is recorded.
        """
        try:
            return self._record_signal(flow_id, name, payload, key, check)
        except StoreError as exc:
            if isinstance(exc.__cause__, sa_exc.IntegrityError) and key is not None:
                # Lost a race on the same key (a backend without row locks, or a same-key
                # signal that committed while this one waited for the flow's lock).
                return self.record_signal(flow_id, name, payload, key, check=check)
            raise

    def _record_signal(
        self, flow_id: str, name: str, payload: str, key: str | None, check: SchemaCheck | None
    ) -> SignalResult:
        db, c, s = self._db, flows.c, signals.c
        now = db.now()
        with db.tx() as conn:
            # Lock the flow row first: signals then commit in the order of their ids,
            # and a suspend in progress either sees this signal or is seen by it.
            row = conn.execute(
                select(c.status, c.name, c.waiting_on, c.waiting_schema)
                .where(c.id == flow_id)
                .with_for_update()
            ).first()
            if row is None:
                raise FlowNotFound(f"no flow {flow_id!r}", flow_id=flow_id)
            if key is not None:
                dup = conn.execute(select(s.id).where(s.flow_id == flow_id, s.key == key)).scalar()
                if dup is not None:
                    return SignalResult(int(dup), row.name, duplicate=True, wake=False)
            if not life.accepts_signal(row.status):
                raise not_waiting(flow_id, row.status, name)
            if check is not None and life.checks_at_send(
                row.status, row.waiting_on, row.waiting_schema, name
            ):
                check(row.waiting_schema)
            signal_id = conn.execute(
                insert(signals)
                .values(
                    flow_id=flow_id,
                    name=name,
                    payload=payload,
                    key=key,
                    status=SignalStatus.PENDING,
                    created_at=now,
                )
                .returning(s.id)
            ).scalar_one()
            wake = life.signal_wakes(row.status, row.waiting_on, name)
            if wake:
                conn.execute(
                    update(flows)
                    .where(c.id == flow_id)
                    .values(wake_at=now, wake_kind=WakeKind.RUN, updated_at=now)
                )
        return SignalResult(int(signal_id), row.name, duplicate=False, wake=wake)

    def request_resume(self, flow_id: str) -> str:
        """Mark a suspended flow as due now; return its flow name."""
        db, c = self._db, flows.c
        with db.tx() as conn:
            row = conn.execute(
                select(c.status, c.name).where(c.id == flow_id).with_for_update()
            ).first()
            if row is None:
                raise FlowNotFound(f"no flow {flow_id!r}", flow_id=flow_id)
            if life.is_terminal(row.status):
                raise FlowNotWaiting(
                    f"flow {flow_id!r} is {row.status}", flow_id=flow_id, status=row.status
                )
            if life.resume_wakes(row.status):
                conn.execute(
                    update(flows)
                    .where(c.id == flow_id)
                    .values(wake_at=db.now(), wake_kind=WakeKind.RUN)
                )
        return str(row.name)

    def retry_flow(self, flow_id: str) -> str:
        """Make a failed flow due again from its last checkpoint; return its flow name."""
        db, c, t = self._db, flows.c, tasks.c
        now = db.now()
        with db.tx() as conn:
            row = conn.execute(
                select(c.status, c.name, c.next_seq).where(c.id == flow_id).with_for_update()
            ).first()
            if row is None:
                raise FlowNotFound(f"no flow {flow_id!r}", flow_id=flow_id)
            if not life.retryable(row.status):
                raise not_retryable(flow_id, row.status)
            conn.execute(
                update(flows)
                .where(c.id == flow_id)
                .values(**_RETRIED, retries=c.retries + 1, wake_at=now, updated_at=now)
            )
            # A child that failed at the failed step: the fresh attempt 1 sends a new one.
            conn.execute(
                update(tasks)
                .where(t.flow_id == flow_id, t.seq == row.next_seq, t.status == TaskStatus.FAILED)
                .values(attempt=0)
            )
        return str(row.name)

    def fork_flow(self, source_id: str, new_id: str, at: int, input_json: str | None) -> FlowRow:
        """A new pending flow with the first ``at`` checkpoints of ``source_id``, due now."""
        db, c, st = self._db, flows.c, steps.c
        now = db.now()
        with db.tx() as conn:
            src = conn.execute(
                select(c.name, c.input, c.next_seq).where(c.id == source_id).with_for_update()
            ).first()
            if src is None:
                raise FlowNotFound(f"no flow {source_id!r}", flow_id=source_id)
            copied = conn.execute(
                select(steps).where(st.flow_id == source_id, st.seq < at).order_by(st.seq)
            ).all()
            if not life.fork_point_ok(at, int(src.next_seq)):
                raise bad_fork_point(source_id, at, int(src.next_seq))
            if conn.execute(select(c.id).where(c.id == new_id)).first() is not None:
                raise fork_conflict(new_id)
            conn.execute(
                insert(flows).values(
                    id=new_id,
                    name=src.name,
                    status=FlowStatus.PENDING,
                    input=src.input if input_json is None else input_json,
                    wake_at=now,
                    wake_kind=WakeKind.RUN,
                    epoch=0,
                    next_seq=at,
                    runs=0,
                    retries=0,
                    forked_from=source_id,
                    forked_at=at,
                    created_at=now,
                    updated_at=now,
                )
            )
            if copied:
                conn.execute(
                    insert(steps),
                    [{**r._asdict(), "flow_id": new_id, "epoch": 0} for r in copied],
                )
            row = conn.execute(select(flows).where(c.id == new_id)).one()
        return db.flow_row(row)

    def get_flow(self, flow_id: str, *, details: bool = True) -> FlowRow:
        """The flow's row, with steps and signals when ``details``; ``FlowNotFound`` if none."""
        db = self._db
        with db.tx() as conn:
            row = conn.execute(select(flows).where(flows.c.id == flow_id)).first()
            if row is None:
                raise FlowNotFound(f"no flow {flow_id!r}", flow_id=flow_id)
            if not details:
                return db.flow_row(row)
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
        now = db.now()
        return db.flow_row(
            row,
            steps=[
                StepRow(
                    r.seq,
                    r.kind,
                    r.name,
                    r.occurrence,
                    r.result,
                    r.attempts,
                    aware(r.started_at),
                    aware(r.completed_at) or now,
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
                    aware(r.created_at) or now,
                    aware(r.consumed_at),
                )
                for r in signal_rows
            ],
            step_errors=[
                StepErrorRow(r.seq, r.attempt, r.name, r.error, aware(r.created_at) or now)
                for r in error_rows
            ],
        )
