"""The operator's side of the memory store: listing, purging, refused messages."""

from __future__ import annotations

from datetime import datetime

from .._json import safe_text
from . import _lifecycle as life
from ._memory_state import MemoryState, flow_row
from ._text import clip
from ._types import FlowFilter, FlowRow, RejectedRow


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

    def purge_finished(self, before: datetime) -> int:
        """Delete finished flows that ended before ``before``."""
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
            row = RejectedRow(
                len(self._s.rejected) + 1,
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
