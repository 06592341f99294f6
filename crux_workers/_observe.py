"""What an execution reports as it goes, for metrics, traces and Celery events.

The engine and the runtime call an ``Observer`` at a few points (a claim, a step
committed or failed, a suspend, an execution's end, a sweep). The default observes
nothing; ``crux_workers.ops`` installs observers that count (Prometheus), trace
(OpenTelemetry) and tell Celery's monitors (task events). An observer never changes
what a flow does: ``Observers`` swallows and logs whatever one of them raises.

Nothing here imports a third-party package.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger("crux_workers.observe")


@dataclass(frozen=True, slots=True)
class Claim:
    """An execution took a flow's lease.

    ``woke_by`` is the wake it consumed ("run" for a new flow, a signal, a child's
    outcome, a resume or a redrive; "retry", "sleep", "poll", "task", "expire" for
    timers), and ``latency`` the seconds since that wake was due (None without one,
    e.g. a stalled flow taken over).
    """

    flow: str
    flow_id: str
    resumed: bool
    woke_by: str | None
    latency: float | None


class Observer(Protocol):
    """Hooks of one process's executions. Every method must return quickly."""

    def execution_claimed(self, claim: Claim) -> None:
        """An execution took the flow's lease and is about to replay it."""
        ...

    def step_committed(
        self, flow: str, flow_id: str, step: str, kind: str, seconds: float | None
    ) -> None:
        """A checkpoint was committed; ``seconds``: how long the step's function ran."""
        ...

    def step_failed(
        self, flow: str, flow_id: str, step: str, attempt: int, error: str, retrying: bool
    ) -> None:
        """An attempt of a step raised; ``retrying``: another attempt is scheduled."""
        ...

    def suspended(self, flow: str, flow_id: str, point: str, wake_in: float | None) -> None:
        """The execution ended at a suspend point (a signal, timer, poll, child or retry)."""
        ...

    def execution_finished(self, flow: str, flow_id: str, outcome: str, seconds: float) -> None:
        """One execution ended: completed, failed, suspended, busy, noop, lost, error..."""
        ...

    def sweep_done(self, lag: float, expired: int, published: int, skipped: bool) -> None:
        """A sweep ended; ``lag``: seconds between its scheduled tick and its start."""
        ...


class NoObserver:
    """Observes nothing (the default)."""

    def execution_claimed(self, claim: Claim) -> None:
        """Nothing."""

    def step_committed(
        self, flow: str, flow_id: str, step: str, kind: str, seconds: float | None
    ) -> None:
        """Nothing."""

    def step_failed(
        self, flow: str, flow_id: str, step: str, attempt: int, error: str, retrying: bool
    ) -> None:
        """Nothing."""

    def suspended(self, flow: str, flow_id: str, point: str, wake_in: float | None) -> None:
        """Nothing."""

    def execution_finished(self, flow: str, flow_id: str, outcome: str, seconds: float) -> None:
        """Nothing."""

    def sweep_done(self, lag: float, expired: int, published: int, skipped: bool) -> None:
        """Nothing."""


class Observers:
    """The observers of one app, called in turn; one that raises is logged and skipped."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._all: tuple[Observer, ...] = ()

    def add(self, observer: Observer) -> None:
        """Add an observer (once; adding the same one again does nothing)."""
        with self._lock:
            if observer not in self._all:
                self._all = (*self._all, observer)

    def remove(self, observer: Observer) -> None:
        """Remove an observer if present."""
        with self._lock:
            self._all = tuple(o for o in self._all if o is not observer)

    def __iter__(self) -> Iterator[Observer]:
        return iter(self._all)

    def _each(self, method: str, *args: object) -> None:
        for observer in self._all:
            try:
                getattr(observer, method)(*args)
            except Exception:
                log.exception("observer %r failed in %s", observer, method)

    def execution_claimed(self, claim: Claim) -> None:
        """Tell every observer."""
        self._each("execution_claimed", claim)

    def step_committed(
        self, flow: str, flow_id: str, step: str, kind: str, seconds: float | None
    ) -> None:
        """Tell every observer."""
        self._each("step_committed", flow, flow_id, step, kind, seconds)

    def step_failed(
        self, flow: str, flow_id: str, step: str, attempt: int, error: str, retrying: bool
    ) -> None:
        """Tell every observer."""
        self._each("step_failed", flow, flow_id, step, attempt, error, retrying)

    def suspended(self, flow: str, flow_id: str, point: str, wake_in: float | None) -> None:
        """Tell every observer."""
        self._each("suspended", flow, flow_id, point, wake_in)

    def execution_finished(self, flow: str, flow_id: str, outcome: str, seconds: float) -> None:
        """Tell every observer."""
        self._each("execution_finished", flow, flow_id, outcome, seconds)

    def sweep_done(self, lag: float, expired: int, published: int, skipped: bool) -> None:
        """Tell every observer."""
        self._each("sweep_done", lag, expired, published, skipped)


def _conforms(o: NoObserver, all_: Observers) -> tuple[Observer, Observer]:
    # mypy checks here that both are whole ``Observer``s.
    return o, all_
