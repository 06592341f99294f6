"""The operator's side of the memory store: listing, purging, refused messages."""

from __future__ import annotations

from datetime import datetime

from .._json import safe_text
from . import _lifecycle as life
from ._memory_state import MemoryFlow, MemoryState, flow_row
from ._metrics import ActiveGroup, reduce
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


class MemoryAdmin:
    """``AdminStore`` in memory."""

    def __init__(self, state: MemoryState) -> None:
        self._s = state

    def list_flows(self, where: FlowFilter) -> list[FlowRow]:
        """Flows matching ``where``, newest first, without steps or signals."""
        with self._s.lock:
            found = [
                f
                for f in self._s.flows.values()
                if (where.status is None or f.status == where.status)
                and (where.name is None or f.name == where.name)
                and (where.waiting_on is None or f.waiting_on == where.waiting_on)
            ]
            found.sort(key=lambda f: (-f.created_at.timestamp(), f.id))
            return [flow_row(f, details=False) for f in found[: where.limit]]

    def page_flows(self, page: FlowPage) -> list[FlowRow]:
        """One page of flows matching ``page``, newest first, without steps or signals."""

        def wanted(f: MemoryFlow) -> bool:
            if page.after is not None:
                at, last_id = page.after
                if f.created_at > at or (f.created_at == at and f.id >= last_id):
                    return False
            return (
                (page.status is None or f.status == page.status)
                and (page.name is None or f.name == page.name)
                and (page.waiting_on is None or f.waiting_on == page.waiting_on)
                and (not page.id_prefix or f.id.startswith(page.id_prefix))
                and (page.created_from is None or f.created_at >= page.created_from)
                and (page.created_to is None or f.created_at < page.created_to)
            )

        with self._s.lock:
            found = [f for f in self._s.flows.values() if wanted(f)]
            found.sort(key=lambda f: (f.created_at, f.id), reverse=True)
            return [flow_row(f, details=False) for f in found[: page.limit]]

    def overview(self) -> RecordOverview:
        """Flow counts by status and the due backlog; the memory store keeps no sweep times."""
        with self._s.lock:
            now = self._s.now()
            counts: dict[str, int] = {}
            due: list[datetime] = []
            for f in self._s.flows.values():
                counts[f.status] = counts.get(f.status, 0) + 1
                if f.status in life.ACTIVE and f.wake_at is not None and f.wake_at <= now:
                    due.append(f.wake_at)
            return RecordOverview(counts, len(due), min(due, default=None), None, now)

    def purge_finished(self, before: datetime) -> int:
        """Delete finished flows (all their rows) that ended before ``before``; how many."""
        with self._s.lock:
            gone = [
                f.id
                for f in self._s.flows.values()
                if life.is_terminal(f.status)
                and f.finished_at is not None
                and f.finished_at < before
            ]
            for flow_id in gone:
                del self._s.flows[flow_id]
            for key in [k for k in self._s.tasks if k[0] in set(gone)]:
                del self._s.tasks[key]
            return len(gone)

    def waiting(self, name: str | None = None) -> list[WaitRow]:
        """Suspended flows (of ``name``) grouped by what they wait on; woken ones excluded."""
        with self._s.lock:
            return merge_waits(
                WaitRow(
                    f.name,
                    life.wait_kind(f.wake_kind),
                    wait_on(f.waiting_on),
                    1,
                    f.updated_at,
                    f.deadline,
                    f.wake_at,
                )
                for f in self._s.flows.values()
                if f.status == life.FlowStatus.SUSPENDED
                and f.wake_kind != life.WakeKind.RUN
                and (name is None or f.name == name)
            )

    def purge_rejected(self, before: datetime) -> int:
        """Delete refused ingress messages received before ``before``; how many."""
        with self._s.lock:
            kept = [r for r in self._s.rejected if r.received_at >= before]
            gone = len(self._s.rejected) - len(kept)
            self._s.rejected[:] = kept
            return gone

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
        with self._s.lock:
            # Bounded and cleaned as the SQL store keeps them.
            self._s.rejected_ids += 1
            row = RejectedRow(
                self._s.rejected_ids,
                safe_text(reason),
                safe_text(detail),
                clip(flow_id),
                clip(name),
                clip(key),
                safe_text(raw),
                self._s.now(),
            )
            self._s.rejected.append(row)
            return row.id

    def list_rejected(self, limit: int = 100) -> list[RejectedRow]:
        """The most recently refused ingress messages, newest first."""
        with self._s.lock:
            return list(reversed(self._s.rejected))[:limit]

    def metrics_snapshot(self, last_sweep: datetime | None) -> MetricsSnapshot:
        """Counts for the metrics gauges, grouped as the SQL store groups them."""
        with self._s.lock:
            now = self._s.now()
            active: dict[tuple[str, str, str | None, str | None, bool], list[datetime]] = {}
            finished: dict[tuple[str, str], int] = {}
            for f in self._s.flows.values():
                status = str(f.status)
                if life.is_terminal(status):
                    finished[(f.name, status)] = finished.get((f.name, status), 0) + 1
                    continue
                due = life.claimable(
                    status, f.wake_kind, f.wake_at, f.lease_owner, f.lease_until, now
                )
                wake = None if f.wake_kind is None else str(f.wake_kind)
                since = f.wake_at or f.lease_until or f.updated_at
                active.setdefault((f.name, status, wake, f.waiting_on, due), []).append(since)
            reasons = [(r.reason, 1) for r in self._s.rejected]
        groups = [
            ActiveGroup(*key, count=len(times), due_since=min(times) if key[4] else None)
            for key, times in active.items()
        ]
        done = [(name, status, n) for (name, status), n in finished.items()]
        return reduce(now, groups, done, reasons, last_sweep)
