"""The worker side of an app: execute a flow, sweep timers, complete a child task.

A transport calls these (a Celery task body, or an embedded thread); they turn a
message into one conditional step of the record and ask for the next one.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

from . import _json
from ._client import Client, Services, enqueue_quietly
from ._engine import Advance, Engine
from ._failure import error_json
from ._ids import valid_id
from ._models import ErrorInfo
from ._observe import Observers
from ._registry import FlowRegistry
from ._store._lifecycle import loggable_task_id
from .errors import NonRetryableError, StoreError, TaskFailed, UnknownFlow, ValueTooLarge

log = logging.getLogger("crux_workers")

_SWEEP_LIMIT = 500
_SWEEP_BATCHES = 20


@dataclass(frozen=True, slots=True)
class SweepReport:
    """What one sweep did."""

    tick: int
    skipped: bool = False
    expired: int = 0
    published: int = 0


class Runtime:
    """Executes flows, sweeps, and records child outcomes for one app."""

    def __init__(self, services: Services, registry: FlowRegistry, client: Client) -> None:
        self._s = services
        self._registry = registry
        self._client = client
        self._engine: Engine | None = None
        self._lock = threading.Lock()
        # Metrics, traces and Celery events subscribe here (crux_workers.ops).
        self.observers = Observers()

    @property
    def services(self) -> Services:
        """The app's settings, record, cache and transport (for beat's retention task)."""
        return self._s

    @property
    def engine(self) -> Engine:
        """The execution engine (built on first use, over the app's record and cache)."""
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    s = self._s.settings
                    self._engine = Engine(
                        self._s.store,
                        self._s.cache,
                        self._registry.lookup,
                        lease_ttl=s.lease_ttl,
                        # Late-bound: the child is sent by whatever transport is in place.
                        send_child=lambda task_id, call, child: self.send_child(
                            task_id, call, child
                        ),
                        task_resend_after=s.task_resend_after,
                        max_value_bytes=s.max_value_bytes,
                        observer=self.observers,
                        max_lapses=s.max_lapses,
                    )
        return self._engine

    # -- executing ------------------------------------------------------------------

    def execute(self, flow_name: str, flow_id: Any) -> Advance | None:
        """The body of a start/resume request: advance the flow, re-ask if it must wait."""
        if not valid_id(flow_id):
            # Nothing can be recorded about it; retrying would loop forever.
            log.error("dropping a malformed flow message: flow_id=%.300r", flow_id)
            return None
        # -- observe (crux_workers._observe): every execution's outcome and duration --
        started = time.monotonic()
        outcome: Advance | None = None
        try:
            outcome = self._execute(flow_name, flow_id)
            return outcome
        finally:
            kind = "error" if outcome is None else outcome.kind
            self.observers.execution_finished(flow_name, flow_id, kind, time.monotonic() - started)

    def _execute(self, flow_name: str, flow_id: str) -> Advance | None:
        try:
            outcome = self.engine.advance(flow_id)
        except StoreError as exc:
            delay = 1.0 + random.random() * 2
            log.warning("flow %s: record unavailable (%s); retrying in %.1fs", flow_id, exc, delay)
            enqueue_quietly(self._s, flow_name, flow_id, delay)
            return None
        except UnknownFlow:
            return None
        if outcome.kind == "busy" and outcome.retry_after is not None:
            # Another executor holds the lease: look again once it would have expired.
            enqueue_quietly(self._s, flow_name, flow_id, outcome.retry_after + 0.1)
        elif outcome.wake_in is not None and outcome.wake_in <= self._countdown_limit():
            # A latency shortcut only: the timer is in the record and the sweeper fires
            # it if this message is lost or redelivered (see docs/time.md).
            enqueue_quietly(self._s, flow_name, flow_id, outcome.wake_in + 0.05)
        return outcome

    def _countdown_limit(self) -> float:
        s = self._s.settings
        return min(s.countdown_limit, s.visibility_timeout / 4)

    def sweep(self, scheduled_at: float | None = None) -> SweepReport:
        """One sweep: expire overdue flows, re-publish due and stalled ones.

        ``scheduled_at`` (epoch seconds): when beat sent this sweep, for the sweep's lag
        (without it, the start of the current tick).

        Runs from beat every ``sweep_interval``; a second beat's sweep of the same tick
        is skipped, and every action is conditional in the record, so overlapping
        sweeps cannot expire or wake a flow twice.
        """
        s = self._s.settings
        store = self._s.store
        tick = int(store.now().timestamp() // s.sweep_interval)
        # -- observe (crux_workers._observe): how late this tick's sweep started --
        since = tick * s.sweep_interval if scheduled_at is None else scheduled_at
        lag = max(0.0, store.now().timestamp() - since)
        if not store.claim_tick(tick):
            self.observers.sweep_done(lag, 0, 0, True)
            return SweepReport(tick=tick, skipped=True)
        expired: list[str] = []
        published = 0
        for _ in range(_SWEEP_BATCHES):
            got = store.sweep(limit=_SWEEP_LIMIT, redrive_after=s.redrive_after)
            expired += got.expired
            for flow_id in got.expired:
                self._s.cache.drop(flow_id)
            for name, flow_id in got.due:
                enqueue_quietly(self._s, name, flow_id, None)
            published += len(got.due)
            if len(got.expired) + len(got.due) < _SWEEP_LIMIT:
                break
        if expired or published:
            log.info("sweep %d: expired %d, published %d", tick, len(expired), published)
        self.observers.sweep_done(lag, len(expired), published, False)
        return SweepReport(tick=tick, expired=len(expired), published=published)

    # -- child tasks (run_task) ---------------------------------------------------------

    def send_child(self, task_id: str, call_json: str, child: Any) -> None:
        """Send a ``run_task`` child after its commit; a failed send waits for the resend."""
        try:
            self._s.transport.send_child(task_id, _json.loads(call_json), child)
        except Exception as exc:
            log.warning(
                "child task %s could not be sent (%r); it is sent again after %ss",
                loggable_task_id(task_id),
                exc,
                self._s.settings.task_resend_after,
            )

    def complete_task(
        self,
        task_id: str,
        *,
        result: Any = None,
        error: BaseException | None = None,
        remote_failure: bool = False,
    ) -> bool:
        """Record a child task's outcome (the first one counts) and wake its flow.

        Returns True when this outcome woke the flow; False for a duplicate, a stale
        attempt, an unknown task id, or a flow that is not waiting for it.
        """
        if not isinstance(task_id, str) or not task_id.startswith("crux:"):
            log.error("dropping a child outcome with a malformed task id %r", task_id)
            return False
        if remote_failure:
            error = TaskFailed(
                f"child task {task_id} failed on a worker that does not report its error "
                "across services; see that worker's log",
                task_id=task_id,
            )
        result_json: str | None = None
        if error is None:
            limit = self._s.settings.max_value_bytes
            try:
                result_json = _json.check_size(
                    _json.dumps(result), limit, f"the result of child task {task_id}"
                )
            except ValueTooLarge as exc:
                result_json, error = None, exc
            except (TypeError, ValueError) as exc:
                error = TaskFailed(f"child task {task_id} returned a value that is not JSON: {exc}")
        error_text = None
        if error is not None:
            info = ErrorInfo.model_validate_json(error_json(error))
            # The same child would return the same oversized value again.
            retryable = not isinstance(error, NonRetryableError | ValueTooLarge)
            error_text = info.model_copy(
                update={"details": {**info.details, "retryable": retryable}}
            ).model_dump_json()
        woke = self._s.store.complete_task(task_id, result=result_json, error=error_text)
        if woke is not None:
            enqueue_quietly(self._s, woke[0], woke[1], None)
        return woke is not None

    # -- signals published where there is no ingress ----------------------------------------

    def deliver_signal(self, flow_id: str, name: str, payload: Any, key: str) -> object:
        """Record a published signal as the ingress would (the embedded default)."""
        return self._client.signal_flow(flow_id, name, payload, key=key)
