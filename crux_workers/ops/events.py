"""Flow progress as Celery task events, for Flower and ``celery events``.

A flow execution is one Celery task (``crux.flow.<name>``). While it runs, the worker
sends custom events on that task's id:

- ``task-crux-step`` at each checkpoint committed, step attempt failed, and suspend:
  ``crux_status`` is committed, retrying, failed or suspended; ``crux_step`` the
  step or suspend point's name; ``crux_kind`` the checkpoint kind;
- ``task-crux-flow`` when the execution ends: ``crux_status`` is its outcome
  (completed, failed, suspended, cancelled, expired, busy, noop, lost, error).

Both carry ``crux_flow`` and ``crux_flow_id`` (prefixed: Celery's event state merges an
event's fields into its task, and none may replace a task field). Celery's state takes
a custom event's type as the task's state, so a running execution reads CRUX-STEP or
CRUX-FLOW in Flower until task-succeeded, whose result is the execution's summary
(``_tasks.register_flow_task``). ``celery events --dump`` prints every event.

Sent only by workers with task events on (``-E`` or ``worker_send_task_events``),
best effort: an event that cannot be sent is logged, the flow goes on.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from .._observe import Claim

log = logging.getLogger("crux_workers.events")

STEP_EVENT = "task-crux-step"
FLOW_EVENT = "task-crux-flow"


class CeleryEvents:
    """An ``Observer`` sending the events above from the task that runs the flow."""

    def __init__(self, celery: Any, *, enabled: bool = False) -> None:
        self._celery = celery
        self.enabled = enabled
        self._lock = threading.Lock()
        # flow id -> (task id, worker hostname), for the execution under way.
        self._running: dict[str, tuple[str, str | None]] = {}

    def _send(self, event: str, flow: str, flow_id: str, **fields: Any) -> None:
        with self._lock:
            task = self._running.get(flow_id)
        if task is None:
            return
        task_id, hostname = task
        with self._celery.events.default_dispatcher(hostname=hostname) as dispatcher:
            dispatcher.send(
                event, uuid=task_id, retry=False, crux_flow=flow, crux_flow_id=flow_id, **fields
            )

    def execution_claimed(self, claim: Claim) -> None:
        """Remember the task that runs this flow (the events go on its id)."""
        if not self.enabled:
            return
        from celery import current_task

        request = getattr(current_task, "request", None)
        task_id = getattr(request, "id", None)
        if task_id:
            with self._lock:
                self._running[claim.flow_id] = (task_id, getattr(request, "hostname", None))

    def step_committed(
        self, flow: str, flow_id: str, step: str, kind: str, seconds: float | None
    ) -> None:
        """``task-crux-step``, committed."""
        self._send(
            STEP_EVENT, flow, flow_id, crux_step=step, crux_kind=kind, crux_status="committed"
        )

    def step_failed(
        self, flow: str, flow_id: str, step: str, attempt: int, error: str, retrying: bool
    ) -> None:
        """``task-crux-step``, retrying or failed, with the attempt and the error type."""
        self._send(
            STEP_EVENT,
            flow,
            flow_id,
            crux_step=step,
            crux_kind="step",
            crux_status="retrying" if retrying else "failed",
            crux_attempt=attempt,
            crux_error=error,
        )

    def suspended(self, flow: str, flow_id: str, point: str, wake_in: float | None) -> None:
        """``task-crux-step``, suspended at ``point``."""
        self._send(
            STEP_EVENT,
            flow,
            flow_id,
            crux_step=point,
            crux_kind="suspend",
            crux_status="suspended",
            crux_wake_in=wake_in,
        )

    def execution_finished(self, flow: str, flow_id: str, outcome: str, seconds: float) -> None:
        """``task-crux-flow`` with the execution's outcome."""
        try:
            self._send(FLOW_EVENT, flow, flow_id, crux_status=outcome)
        finally:
            with self._lock:
                self._running.pop(flow_id, None)

    def sweep_done(self, lag: float, expired: int, published: int, skipped: bool) -> None:
        """Not an event: the sweep task's own events say it ran."""
