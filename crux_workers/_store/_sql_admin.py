"""Operator queries on the SQL record: listing and purging flows, refused messages.

Kept apart from ``_sql.py`` (the executor's fenced writes): nothing here takes a
lease, and nothing an executor does depends on it.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    and_,
    case,
    delete,
    func,
    insert,
    literal_column,
    null,
    or_,
    select,
    union_all,
)

from .._json import safe_text
from . import _sql_rules as rules
from ._clock import aware
from ._lifecycle import ACTIVE, TERMINAL, FlowStatus, WakeKind, wait_kind
from ._metrics import ActiveGroup, reduce
from ._schema import flows, rejected_signals, signals, step_errors, steps, sweeps, tasks
from ._sql_db import SqlDb
from ._text import clip
from ._types import (
    FlowFilter,
    FlowPage,
    FlowRow,
    MetricsSnapshot,
    RecordOverview,
    RejectedRow,
    WaitRow,
    merge_waits,
    wait_on,
)

_PURGE_BATCH = 1000


class SqlAdmin:
    """``AdminStore`` on SQL: the operator's side of the record."""

    def __init__(self, db: SqlDb) -> None:
        self._db = db

    def list_flows(self, where: FlowFilter) -> list[FlowRow]:
        """Flows matching ``where``, newest first, without steps or signals."""
        c = flows.c
        query = select(flows).order_by(c.created_at.desc(), c.id).limit(where.limit)
        if where.status is not None:
            query = query.where(c.status == where.status)
        if where.name is not None:
            query = query.where(c.name == where.name)
        if where.waiting_on is not None:
            query = query.where(c.waiting_on == where.waiting_on)
        with self._db.tx() as conn:
            return [self._db.flow_row(r) for r in conn.execute(query).all()]

    def page_flows(self, page: FlowPage) -> list[FlowRow]:
        """One page of flows matching ``page``, newest first, without steps or signals."""
        c = flows.c
        # Both keys descending, so the (created_at, id) indexes serve the page as they are.
        query = select(flows).order_by(c.created_at.desc(), c.id.desc()).limit(page.limit)
        for column, value in (
            (c.status, page.status),
            (c.name, page.name),
            (c.waiting_on, page.waiting_on),
        ):
            if value is not None:
                query = query.where(column == value)
        if page.id_prefix:
            query = query.where(c.id.startswith(page.id_prefix, autoescape=True))
        if page.created_from is not None:
            query = query.where(c.created_at >= page.created_from)
        if page.created_to is not None:
            query = query.where(c.created_at < page.created_to)
        if page.after is not None:
            at, last_id = page.after
            query = query.where(or_(c.created_at < at, and_(c.created_at == at, c.id < last_id)))
        with self._db.tx() as conn:
            return [self._db.flow_row(r) for r in conn.execute(query).all()]

    def overview(self) -> RecordOverview:
        """Flow counts by status, the due backlog and the last sweep, in one read."""
        c = flows.c
        now = self._db.now()
        with self._db.tx() as conn:
            counts = {
                str(status): int(n)
                for status, n in conn.execute(select(c.status, func.count()).group_by(c.status))
            }
            due, oldest = conn.execute(
                select(func.count(), func.min(c.wake_at)).where(
                    c.status.in_(ACTIVE), c.wake_at <= now
                )
            ).one()
            last = conn.execute(select(func.max(sweeps.c.swept_at))).scalar()
        return RecordOverview(counts, int(due), aware(oldest), aware(last), now)

    def purge_finished(self, before: datetime) -> int:
        """Delete finished flows (all their rows) that ended before ``before``; how many."""
        c = flows.c
        purged = 0
        while True:
            # Batches keep each transaction (and its locks) short on a large record.
            with self._db.tx() as conn:
                ids = (
                    conn.execute(
                        select(c.id)
                        .where(c.status.in_(TERMINAL), c.finished_at < before)
                        .limit(_PURGE_BATCH)
                    )
                    .scalars()
                    .all()
                )
                if ids:
                    # Children go first: SQLite enforces no ON DELETE CASCADE by default.
                    for table in (steps, signals, step_errors, tasks):
                        conn.execute(delete(table).where(table.c.flow_id.in_(ids)))
                    conn.execute(delete(flows).where(c.id.in_(ids)))
            purged += len(ids)
            if len(ids) < _PURGE_BATCH:
                return purged

    def waiting(self, name: str | None = None) -> list[WaitRow]:
        """Suspended flows (of ``name``) grouped by what they wait on; woken ones excluded."""
        c = flows.c
        query = (
            select(
                c.name,
                c.wake_kind,
                c.waiting_on,
                func.count().label("n"),
                func.min(c.updated_at).label("since"),
                func.min(c.deadline).label("deadline"),
                func.min(c.wake_at).label("wake"),
            )
            .where(
                c.status == FlowStatus.SUSPENDED,
                or_(c.wake_kind.is_(None), c.wake_kind != WakeKind.RUN),
            )
            .group_by(c.name, c.wake_kind, c.waiting_on)
        )
        if name is not None:
            query = query.where(c.name == name)
        with self._db.tx() as conn:
            rows = conn.execute(query).all()
        return merge_waits(
            WaitRow(
                r.name,
                wait_kind(r.wake_kind),
                wait_on(r.waiting_on),
                int(r.n),
                aware(r.since) or self._db.now(),
                aware(r.deadline),
                aware(r.wake),
            )
            for r in rows
        )

    def purge_rejected(self, before: datetime) -> int:
        """Delete refused ingress messages received before ``before``; how many."""
        r = rejected_signals.c
        purged = 0
        while True:
            # Batches, as for flows: short transactions on a large table.
            with self._db.tx() as conn:
                ids = (
                    conn.execute(select(r.id).where(r.received_at < before).limit(_PURGE_BATCH))
                    .scalars()
                    .all()
                )
                if ids:
                    conn.execute(delete(rejected_signals).where(r.id.in_(ids)))
            purged += len(ids)
            if len(ids) < _PURGE_BATCH:
                return purged

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
        with self._db.tx() as conn:
            new_id = conn.execute(
                insert(rejected_signals)
                .values(
                    reason=safe_text(reason),
                    detail=safe_text(detail),
                    raw=safe_text(raw),
                    flow_id=clip(flow_id),
                    name=clip(name),
                    key=clip(key),
                    received_at=self._db.now(),
                )
                .returning(rejected_signals.c.id)
            ).scalar_one()
        return int(new_id)

    def list_rejected(self, limit: int = 100) -> list[RejectedRow]:
        """The most recently refused ingress messages, newest first."""
        r = rejected_signals.c
        with self._db.tx() as conn:
            rows = conn.execute(select(rejected_signals).order_by(r.id.desc()).limit(limit)).all()
        return [
            RejectedRow(
                int(x.id),
                x.reason,
                x.detail,
                x.flow_id,
                x.name,
                x.key,
                x.raw,
                aware(x.received_at) or self._db.now(),
            )
            for x in rows
        ]

    def metrics_snapshot(self) -> MetricsSnapshot:
        """Counts for the metrics gauges, read in one query (see ``MetricsSnapshot``).

        One statement, four parts: active flows grouped by what the gauges need (the
        status index narrows them to the few that are not finished), finished flows
        counted by (name, status) (an index-only scan of ix_crux_flows_name_status),
        refused messages by reason, and the last sweep tick.
        """
        now = self._db.now()
        c = flows.c
        row = (
            select(
                c.name,
                c.status,
                c.wake_kind,
                c.waiting_on,
                # ``_lifecycle.claimable``: runnable now, nobody holds a live lease.
                case((and_(rules.has_work(now), rules.lease_free(now)), 1), else_=0).label("due"),
                func.coalesce(c.wake_at, c.lease_until, c.updated_at).label("since"),
            )
            .where(c.status.in_(ACTIVE))
            .subquery()
        )
        part = literal_column
        active = select(
            part("'active'").label("part"),
            row.c.name,
            row.c.status,
            row.c.wake_kind,
            row.c.waiting_on,
            row.c.due,
            func.count().label("n"),
            func.min(case((row.c.due == 1, row.c.since), else_=null())).label("since"),
        ).group_by(row.c.name, row.c.status, row.c.wake_kind, row.c.waiting_on, row.c.due)
        nothing = null()
        finished = (
            select(part("'finished'"), c.name, c.status, nothing, nothing, part("0"))
            .add_columns(func.count(), nothing)
            .where(c.status.in_(TERMINAL))
            .group_by(c.name, c.status)
        )
        r = rejected_signals.c
        refused = (
            select(part("'refused'"), r.reason, nothing, nothing, nothing, part("0"))
            .add_columns(func.count(), nothing)
            .group_by(r.reason)
        )
        # The newest tick by its primary key, not a scan of the kept ticks.
        last = select(sweeps.c.swept_at).order_by(sweeps.c.tick.desc()).limit(1)
        swept = select(part("'swept'"), nothing, nothing, nothing, nothing, part("0")).add_columns(
            part("0"), last.scalar_subquery()
        )
        with self._db.tx() as conn:
            rows = conn.execute(union_all(active, finished, refused, swept)).all()
        groups: list[ActiveGroup] = []
        done: list[tuple[str, str, int]] = []
        reasons: list[tuple[str, int]] = []
        last_sweep = None
        for x in rows:
            since = aware(x.since)
            if x.part == "active":
                groups.append(
                    ActiveGroup(
                        x.name, x.status, x.wake_kind, x.waiting_on, bool(x.due), int(x.n), since
                    )
                )
            elif x.part == "finished":
                done.append((x.name, x.status, int(x.n)))
            elif x.part == "refused":
                reasons.append((x.name, int(x.n)))
            else:
                last_sweep = since
        return reduce(now, groups, done, reasons, last_sweep)
