"""Operating flows: module-level forms on the default app, and retention from beat.

``retry_flow``, ``retry_flows``, ``fork_flow``, ``waiting`` and ``purge_finished`` are
the calls behind ``crux-workers flows retry|fork|waiting|purge`` and the console; each
is also a method of ``Crux``. See docs/operations.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from ._app import default_app
from ._models import WaitGroup

if TYPE_CHECKING:
    from ._client import Services
    from ._flow import FlowRun

log = logging.getLogger("crux_workers")

# A tick number space of its own for retention runs in crux_sweeps: far below the
# sweep's ticks (which count intervals since 1970), so the two never collide.
_RETENTION_TICKS = -(2**40)


def retry_flow(flow_id: str) -> str:
    """Resume a failed flow from its last checkpoint after its cause is fixed.

    The failed step runs again with a fresh attempt count; earlier steps replay from
    the record. Returns the flow's new status, "pending". Raises ``FlowNotFound``, or
    ``FlowNotRetryable`` for a flow that has not failed.
    """
    return default_app().retry_flow(flow_id)


def retry_flows(*, status: str = "failed", name: str | None = None, limit: int = 1000) -> list[str]:
    """Retry every flow with ``status`` (and ``name``), at most ``limit``; returns their ids."""
    return default_app().retry_flows(status=status, name=name, limit=limit)


def fork_flow(
    source_id: str, /, at: int, input: Any = None, *, flow_id: str | None = None
) -> FlowRun:
    """A new flow from a copy of the first ``at`` checkpoints of ``source_id``.

    With ``input``, the fork runs with it instead of the source's (validated by the
    flow's input model). ``flow_id`` names the fork (default: a new uuid).
    """
    return default_app().fork_flow(source_id, at, input, flow_id=flow_id)


def waiting(*, name: str | None = None) -> list[WaitGroup]:
    """Suspended flows grouped by what they wait on: who waits on what, since when."""
    return default_app().waiting(name=name)


def purge_finished(before: datetime) -> int:
    """Delete flows that finished before ``before`` (all their rows) and older refusals."""
    return default_app().purge_finished(before)


@dataclass(frozen=True, slots=True)
class RetentionReport:
    """What one retention run did (``skipped``: another beat's run took this tick)."""

    tick: int
    skipped: bool = False
    purged: int = 0


def retention_tick(services: Services) -> RetentionReport | None:
    """One retention run from beat: purge what finished more than ``CRUX_RETENTION`` ago.

    Once per ``retention_interval``, whichever beat gets there first (the tick is taken
    in ``crux_sweeps`` like the sweeper's); None when retention is off.
    """
    s = services.settings
    if s.retention is None:
        return None
    store = services.store
    now = store.now()
    tick = _RETENTION_TICKS + int(now.timestamp() // s.retention_interval)
    if not store.claim_tick(tick):
        return RetentionReport(tick=tick, skipped=True)
    cutoff = now - timedelta(seconds=s.retention)
    purged = store.purge_finished(cutoff)
    store.purge_rejected(cutoff)
    if purged:
        log.info("retention: purged %d flow(s) finished over %ss ago", purged, s.retention)
    return RetentionReport(tick=tick, purged=purged)
