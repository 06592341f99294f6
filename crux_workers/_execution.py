"""One attempt to advance one flow: its lease, its checkpoints, its suspend or end.

``Execution`` is the ``ExecutionPort`` the flow context talks to while the engine
(``_engine.py``) runs the handler: it holds the lease and the pending checkpoint, and
writes them through the store's executor role. It knows no SQL, Redis or Celery.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, NoReturn, Protocol, TypeVar

from ._failure import error_json
from ._keeper import keeper
from ._models import Retry
from ._observe import Observer
from ._store._lifecycle import loggable_task_id
from ._store._roles import CruxStore
from ._store._types import (
    Checkpoint,
    Claimed,
    Lease,
    StepCommit,
    Suspension,
    TaskError,
    TaskPoint,
    TaskSend,
    Validator,
)
from .errors import CruxError, FlowStopped, LeaseLost, StepFailed, Suspended

log = logging.getLogger("crux_workers.flow")

T = TypeVar("T")


class Host(Protocol):
    """What an execution uses of the engine that runs it (``_engine.Engine``)."""

    store: CruxStore
    observer: Observer
    lease_ttl: float
    cancel_check_every: float
    task_resend_after: float
    max_value_bytes: int
    send_child: Callable[[str, str, Any], None]


class Execution:
    """The state of one attempt to advance one flow; owns its lease."""

    def __init__(
        self,
        engine: Host,
        claimed: Claimed,
        history: list[Checkpoint],
        claimed_at: float | None = None,
    ) -> None:
        claimed_at = time.monotonic() if claimed_at is None else claimed_at
        self.engine = engine
        self.lease: Lease = claimed.lease
        self.history = history
        self.claimed = claimed
        self.lost = False
        self.steps_run = 0
        # Set once a cancel request is seen while a step runs (the step may poll it).
        self.cancel_seen = threading.Event()
        self._cancel_lock = threading.Lock()
        self._cancel_callbacks: list[Callable[[], None]] = []
        self.trusted_until = 0.0
        self._trust_lease(claimed_at)
        # Checkpoints committed by this execution, cached in one round trip when it
        # suspends; a flow that finishes in one go never touches the cache.
        self.uncached: list[Checkpoint] = []
        if claimed.consumed is not None:  # the claim recorded the waking signal
            self.uncached.append(claimed.consumed)
        # The last step's checkpoint, written with the execution's next write: the next
        # step's commit flushes it before its function runs (``before_step``), a suspend
        # or the finish carries it in their own transaction (one WAL flush, not two).
        self.pending: StepCommit | None = None
        self._pending_ran: float | None = None  # how long its step's function ran

    # The ExecutionPort FlowContext talks to -------------------------------------------

    @property
    def task_resend_after(self) -> float:
        """The default ``resend_after`` of ``run_task`` children, in seconds."""
        return self.engine.task_resend_after

    @property
    def max_value_bytes(self) -> int:
        """The largest step result the record takes, as JSON bytes."""
        return self.engine.max_value_bytes

    def recorded(self, seq: int) -> Checkpoint | None:
        """The checkpoint recorded at ``seq``, or None past the recorded ones."""
        return self.history[seq] if seq < len(self.history) else None

    def recorded_count(self) -> int:
        """How many checkpoints are recorded so far (replayed and committed)."""
        return len(self.history)

    def before_step(self) -> None:
        """Stop here if the lease is lost, or may have lapsed, before running user code.

        The lease keeper only runs while a step runs. A process paused between steps
        (SIGSTOP, a long GC, a VM freeze) may have lost the lease meanwhile: renew it
        first, so it does not run a step its successor already committed.
        """
        self.flush()
        if not self.lost and time.monotonic() > self.trusted_until:
            self.renew()
        if self.lost:
            raise LeaseLost(f"flow {self.lease.flow_id}: lease lost")

    @contextmanager
    def keep_lease(self) -> Iterator[None]:
        """While a step's function runs: renew the lease, and watch for a cancel request."""
        with keeper.watch(self, self.engine.lease_ttl / 3, self.engine.cancel_check_every):
            yield

    @contextmanager
    def on_cancel(self, callback: Callable[[], None]) -> Iterator[None]:
        """Call ``callback`` (from the keeper's thread) if a cancel request is seen meanwhile."""
        with self._cancel_lock:
            self._cancel_callbacks.append(callback)
            seen = self.cancel_seen.is_set()
        if seen:
            callback()
        try:
            yield
        finally:
            with self._cancel_lock:
                self._cancel_callbacks.remove(callback)

    def check_cancel(self) -> None:
        """Look in the record for a cancel request; tell the running step if there is one."""
        if self.cancel_seen.is_set():
            return
        try:
            row = self.engine.store.get_flow(self.lease.flow_id, details=False)
        except CruxError as exc:
            log.warning("cancel check of flow %s failed: %s", self.lease.flow_id, exc)
            return
        if row.cancel_reason is None:
            return
        log.info("flow %s: cancel requested while a step runs", self.lease.flow_id)
        self.cancel_seen.set()
        with self._cancel_lock:
            callbacks = list(self._cancel_callbacks)
        for callback in callbacks:
            callback()

    def stop_cancelled(self, point: str) -> NoReturn:
        """A running step was interrupted by a cancel: end the flow ``cancelled``."""
        self.joined(lambda step: self.engine.store.finish(self.lease, "cancelled", step=step))
        log.info("flow %s: cancelled during %r", self.lease.flow_id, point)
        raise FlowStopped("cancelled")

    def _trust_lease(self, since: float) -> None:
        # Half the TTL: renewals start well before the record's lease_until passes.
        self.trusted_until = since + self.engine.lease_ttl / 2

    def renew(self) -> None:
        """Extend the lease; remember if it was lost (the next write is refused anyway)."""
        started = time.monotonic()
        try:
            if not self.engine.store.renew(self.lease, self.engine.lease_ttl):
                self.lost = True
            else:
                self._trust_lease(started)
        except CruxError as exc:
            log.warning("lease renewal of flow %s failed: %s", self.lease.flow_id, exc)

    def attempt_for(self, seq: int) -> int:
        """The attempt number of the step at ``seq`` (only the frontier step has failed ones)."""
        return self.claimed.failed_attempts + 1 if seq == self.claimed.next_seq else 1

    def now(self) -> datetime:
        """The record's clock."""
        return self.engine.store.now()

    def commit(self, cp: Checkpoint, *, started_at: datetime, attempts: int) -> None:
        """Take a checkpoint: written (fenced) with the execution's next write.

        Until then only handler code runs, which must be deterministic and free of
        side effects: the next step's ``before_step`` writes it before that step's
        function runs, and a suspend or the finish writes it in their own transaction.
        A cancel request is seen at that write, as it was at the step's own commit.
        """
        self.flush()  # an earlier one first (a sleep's checkpoint right after a step)
        self.pending = StepCommit(cp, started_at, attempts)
        self._pending_ran = (datetime.now(UTC) - started_at).total_seconds()
        self._committed(cp)

    def flush(self) -> None:
        """Write the pending checkpoint now, on its own; stop here if cancellation was asked."""
        step, self.pending = self.pending, None
        if step is None:
            return
        started = time.monotonic()
        assert step.started_at is not None
        cancelled = self.engine.store.commit_checkpoint(
            self.lease,
            step.cp,
            started_at=step.started_at,
            attempts=step.attempts,
            ttl=self.engine.lease_ttl,
        )
        self._trust_lease(started)
        self._observe(step.cp, self._pending_ran)
        if cancelled:
            log.info("flow %s: cancelled after %r", self.lease.flow_id, step.cp.name)
            raise FlowStopped("cancelled")

    def joined(self, write: Callable[[StepCommit | None], T]) -> T:
        """Run the execution's next write with the pending checkpoint in it."""
        step, self.pending = self.pending, None
        # If the record refuses the write (a data error), the checkpoint is not in and is
        # not carried again: the flow fails with the refusal (``_fail``), as it would have
        # at the step's own commit; a retry runs the step again.
        got = write(step)
        if step is not None:
            self._observe(step.cp, self._pending_ran)
        return got

    def _outcome(self, got: str, point: str, wake_in: float | None = None) -> NoReturn:
        if got == "suspended":
            raise Suspended(point, wake_in)
        log.info("flow %s: %s at %r", self.lease.flow_id, got, point)
        raise FlowStopped(got)

    def step_failed(
        self, seq: int, name: str, attempt: int, exc: StepFailed, retry: Retry | None
    ) -> NoReturn:
        """Record the failed attempt; back off for a retry, or fail the flow."""
        delay: float | None = None
        if retry is not None and exc.retryable and attempt < retry.attempts:
            delay = retry.delay(attempt)
            if retry.jitter:
                delay *= 0.5 + random.random() / 2
        self.flush()
        got = self.engine.store.fail_step(
            self.lease, seq, name, attempt, error_json(exc), retry_in=delay
        )
        # -- observe (crux_workers._observe) --
        self.engine.observer.step_failed(
            self.claimed.name, self.lease.flow_id, name, attempt, exc.error_type, got == "suspended"
        )
        # --
        if got == "suspended":
            log.info(
                "flow %s: step %r attempt %d failed (%s); retry in %.2fs",
                self.lease.flow_id,
                name,
                attempt,
                exc.error_type,
                delay,
            )
        self._outcome(got, name, delay)

    def sleep_until(self, name: str, until: datetime) -> None:
        """Suspend until ``until`` unless it has passed."""
        wait = (until - self.now()).total_seconds()
        if wait <= 0:
            return
        self.flush()
        got = self.engine.store.suspend_until(self.lease, until, "sleep")
        log.info("flow %s: sleeping %r for %.2fs", self.lease.flow_id, name, wait)
        self._outcome(got, name, wait)

    def poll_later(self, point: Suspension, every: float) -> NoReturn:
        """The condition was false: check again in ``every`` seconds, or expire."""
        self.flush()
        got = self.engine.store.poll_later(self.lease, point, every)
        self._outcome(got, point.name, every)

    def take_task(self, point: TaskPoint, child: Any) -> Checkpoint | TaskError:
        """The child task's result as the checkpoint; else (re)send it and suspend."""
        self.flush()
        got = self.engine.store.take_task_or_send(self.lease, point, self.engine.lease_ttl)
        if isinstance(got, TaskSend):
            # After the commit: a send that is lost is repaired by the resend timer,
            # a send that happens twice is one task id, recorded once.
            self.engine.send_child(got.task_id, got.call, child)
            log.info(
                "flow %s: child task %r sent (%s)",
                self.lease.flow_id,
                point.name,
                loggable_task_id(got.task_id),
            )
            raise Suspended(point.name)
        if isinstance(got, TaskError):
            return got
        if not isinstance(got, Checkpoint):
            self._outcome(got, point.name)
        self._committed(got)
        self._observe(got, None)
        return got

    def take_signal_or_suspend(self, point: Suspension, validate: Validator) -> Checkpoint:
        """Consume a waiting signal as the checkpoint, or suspend and end the execution."""
        store, ttl = self.engine.store, self.engine.lease_ttl
        got = self.joined(
            lambda step: store.take_signal_or_suspend(self.lease, point, validate, ttl, step=step)
        )
        if got == "suspended":
            log.info("flow %s: suspended, waiting for %r", self.lease.flow_id, point.name)
        if not isinstance(got, Checkpoint):
            self._outcome(got, point.name)
        self._committed(got)
        self._observe(got, None)
        return got

    def _committed(self, cp: Checkpoint) -> None:
        """A checkpoint this execution took: part of the history, cached at suspend."""
        self.uncached.append(cp)
        self.history.append(cp)
        self.steps_run += 1

    def _observe(self, cp: Checkpoint, seconds: float | None) -> None:
        """A checkpoint is durable: log it and tell the observer."""
        log.info("flow %s: %s %r committed (#%d)", self.lease.flow_id, cp.kind, cp.name, cp.seq)
        # -- observe (crux_workers._observe): seconds is how long a step's function ran --
        self.engine.observer.step_committed(
            self.claimed.name, self.lease.flow_id, cp.name, cp.kind, seconds
        )
