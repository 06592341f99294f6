"""The metrics snapshot, reduced the same way from every backend's grouped rows.

A backend groups its active flows by (name, status, wake kind, waiting on, due) in
one pass and hands the groups here, with the finished flows' counts, the refused
messages by reason and the last sweep. What a wait is (signal, sleep, poll, task,
retry) is decided once, in ``wait_of``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from ._lifecycle import FlowStatus, WakeKind
from ._types import MetricsSnapshot

TASK_PREFIX = "task:"  # how a run_task wait is recorded in waiting_on


@dataclass(frozen=True, slots=True)
class ActiveGroup:
    """Active flows with the same name, status, wake, wait and due-ness."""

    name: str
    status: str
    wake_kind: str | None
    waiting_on: str | None
    due: bool
    count: int
    due_since: datetime | None


def wait_of(wake_kind: str | None, waiting_on: str | None) -> tuple[str, str]:
    """(kind, on) of a suspended flow that is not due: what it waits for."""
    if wake_kind == WakeKind.SLEEP:
        return "sleep", ""
    if wake_kind == WakeKind.RETRY:
        return "retry", ""
    if wake_kind == WakeKind.TASK or (waiting_on or "").startswith(TASK_PREFIX):
        return "task", (waiting_on or "").removeprefix(TASK_PREFIX)
    if wake_kind == WakeKind.POLL:
        return "poll", waiting_on or ""
    return "signal", waiting_on or ""


def reduce(
    taken_at: datetime,
    active: Iterable[ActiveGroup],
    finished: Iterable[tuple[str, str, int]],
    refused: Iterable[tuple[str, int]],
    last_sweep_at: datetime | None,
) -> MetricsSnapshot:
    """The snapshot from grouped rows (any backend)."""
    flows: dict[tuple[str, str], int] = {}
    waits: dict[tuple[str, str], int] = {}
    due: dict[str, int] = {}
    oldest: datetime | None = None
    for g in active:
        key = (g.name, g.status)
        flows[key] = flows.get(key, 0) + g.count
        if g.due:
            due[g.name] = due.get(g.name, 0) + g.count
            if g.due_since is not None and (oldest is None or g.due_since < oldest):
                oldest = g.due_since
        elif g.status == FlowStatus.SUSPENDED:
            wait = wait_of(g.wake_kind, g.waiting_on)
            waits[wait] = waits.get(wait, 0) + g.count
    for name, status, count in finished:
        flows[(name, status)] = flows.get((name, status), 0) + count
    by_reason: dict[str, int] = {}
    for reason, count in refused:
        by_reason[reason] = by_reason.get(reason, 0) + count
    return MetricsSnapshot(
        taken_at=taken_at,
        flows=flows,
        waits=waits,
        due=due,
        oldest_due_at=oldest,
        refused=by_reason,
        last_sweep_at=last_sweep_at,
    )
