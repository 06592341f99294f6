"""Operator queries on the SQL record: listing and purging flows, refused messages.

Kept apart from ``_sql.py`` (the executor's fenced writes): nothing here takes a
lease, and nothing an executor does depends on it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, insert, select

from .._json import safe_text
from .._models import TERMINAL
from ._clock import aware
from ._schema import flows, rejected_signals
from ._types import FlowFilter, FlowRow, RejectedRow

_PURGE_BATCH = 1000


class SqlAdmin:
    """Mixin of ``SqlStore``: the operator's side of the record."""

    _now: Callable[[], datetime]

    def _tx(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def _flow_row(self, r: Any, **extra: Any) -> FlowRow:
        raise NotImplementedError

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
        with self._tx() as conn:
            return [self._flow_row(r) for r in conn.execute(query).all()]

    def purge_finished(self, before: datetime) -> int:
        """Delete finished flows (with their steps and signals) that ended before ``before``."""
        c = flows.c
        purged = 0
        while True:
            # Batches keep each transaction (and its locks) short on a large record.
            with self._tx() as conn:
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
                    from ._schema import signals, step_errors, steps, tasks

                    for table in (steps, signals, step_errors, tasks):
                        conn.execute(delete(table).where(table.c.flow_id.in_(ids)))
                    conn.execute(delete(flows).where(c.id.in_(ids)))
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
        with self._tx() as conn:
            new_id = conn.execute(
                insert(rejected_signals)
                .values(
                    reason=safe_text(reason),
                    detail=safe_text(detail),
                    raw=safe_text(raw),
                    flow_id=_clip(flow_id),
                    name=_clip(name),
                    key=_clip(key),
                    received_at=self._now(),
                )
                .returning(rejected_signals.c.id)
            ).scalar_one()
        return int(new_id)

    def list_rejected(self, limit: int = 100) -> list[RejectedRow]:
        """The most recently refused ingress messages, newest first."""
        r = rejected_signals.c
        with self._tx() as conn:
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
                aware(x.received_at) or self._now(),
            )
            for x in rows
        ]


def _clip(value: str | None) -> str | None:
    # The columns are bounded; a refused message may carry anything in these fields.
    return safe_text(value)[:200] if isinstance(value, str) else None
