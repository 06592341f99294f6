"""What the sweeper does on the SQL record: claim a tick, expire and redrive flows."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update

from . import _sql_rules as rules
from ._lifecycle import FlowStatus, WakeKind
from ._schema import flows, sweeps
from ._sql_db import NO_LEASE, SqlDb
from ._types import SweepResult


class SqlSweeper:
    """``SweeperStore`` on SQL."""

    def __init__(self, db: SqlDb) -> None:
        self._db = db

    def claim_tick(self, tick: int) -> bool:
        """True for the first sweep of a tick; False when another beat's sweep took it."""
        db = self._db
        with db.tx() as conn:
            got = conn.execute(
                db.insert(sweeps)
                .values(tick=tick, swept_at=db.now())
                .on_conflict_do_nothing()
                .returning(sweeps.c.tick)
            ).first()
            if got is not None and tick % 100 == 0:
                old = sweeps.c.tick < tick - 10_000
                if tick >= 0:
                    # Negative ticks are retention runs' (crux_workers._ops): not the sweep's.
                    old = old & (sweeps.c.tick >= 0)
                conn.execute(sweeps.delete().where(old))
        return got is not None

    def sweep(self, *, limit: int, redrive_after: float) -> SweepResult:
        """Expire overdue suspends; mark due and stalled flows and return them to publish.

        The rule is ``_lifecycle.sweep_action``; its conditions are in ``_sql_rules``.
        """
        db, c = self._db, flows.c
        now = db.now()
        result = SweepResult()
        with db.tx() as conn:
            rows: list[Any] = []
            for cond in (rules.sweep_due(now, redrive_after), rules.sweep_stalled(now)):
                query = select(c.id, c.name, c.status, c.wake_kind).where(cond).limit(limit)
                rows += conn.execute(db.lock_for_sweep(query)).all()
            expire = [
                r.id
                for r in rows
                if r.status == FlowStatus.SUSPENDED and r.wake_kind == WakeKind.EXPIRE
            ]
            wake = [r for r in rows if r.id not in set(expire)]
            if expire:
                conn.execute(
                    update(flows)
                    .where(c.id.in_(expire), rules.sweep_expires())
                    .values(status=FlowStatus.EXPIRED, finished_at=now, updated_at=now, **NO_LEASE)
                )
            if wake:
                conn.execute(
                    update(flows)
                    .where(c.id.in_([r.id for r in wake]))
                    .values(wake_kind=WakeKind.RUN, wake_at=now)
                )
        result.expired.extend(expire)
        result.due.extend((r.name, r.id) for r in wake)
        return result
