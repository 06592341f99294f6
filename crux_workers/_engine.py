"""One execution of a flow: claim the lease, replay, checkpoint, suspend or finish.

The engine knows the ``CruxStore`` and ``StepCache`` protocols and nothing of
SQLAlchemy, Redis or Celery, so the embedded default, the Celery fleet and the
unit tests run the same code.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, NoReturn, TypeVar

from pydantic import ValidationError

from . import _json
from ._context import FlowContext
from ._context_async import AsyncFlowContext
from ._failure import error_json
from ._keeper import keeper
from ._loop import flow_loop
from ._models import Retry
from ._observe import Claim, NoObserver, Observer
from ._registry import FlowDef
from ._store._lifecycle import history_digest, loggable_task_id
from ._store._roles import CruxStore, StepCache
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
from .errors import (
    CruxError,
    FlowStopped,
    LeaseLost,
    RecordRefused,
    StepFailed,
    StoreError,
    Suspended,
    UnknownFlow,
)

log = logging.getLogger("crux_workers.flow")

T = TypeVar("T")

AdvanceKind = Literal[
    "completed", "failed", "suspended", "expired", "cancelled", "busy", "noop", "lost"
]


_STOPPED: dict[str, AdvanceKind] = {k: k for k in ("expired", "cancelled", "failed")}


@dataclass(frozen=True, slots=True)
class Advance:
    """What one execution did; ``retry_after`` asks the caller to try again later."""

    kind: AdvanceKind
    retry_after: float | None = None
    steps_run: int = 0
    wake_in: float | None = None


class Execution:
    """The state of one attempt to advance one flow; owns its lease."""

    def __init__(
        self,
        engine: Engine,
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


def _chain(history: list[Checkpoint]) -> str | None:
    return history_digest(history) if history else None


def _no_children(task_id: str, call: str, child: Any) -> None:
    raise CruxError("this engine was built without a way to send child tasks")


class Engine:
    """Advances flows: the one entry point the task layer (Celery or threads) calls."""

    def __init__(
        self,
        store: CruxStore,
        cache: StepCache,
        lookup: Callable[[str], FlowDef],
        *,
        lease_ttl: float = 30.0,
        send_child: Callable[[str, str, Any], None] | None = None,
        task_resend_after: float = 300.0,
        max_value_bytes: int = 1024 * 1024,
        cancel_check_every: float = 1.0,
        observer: Observer | None = None,
        max_lapses: int | None = None,
    ) -> None:
        self.observer: Observer = observer or NoObserver()
        self.store = store
        self.max_lapses = max_lapses
        self.cancel_check_every = cancel_check_every
        self.max_value_bytes = max_value_bytes
        self.cache = cache
        self.lookup = lookup
        self.lease_ttl = lease_ttl
        self.send_child = send_child or _no_children
        self.task_resend_after = task_resend_after

    def _owner(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"

    def load_history(
        self,
        flow_id: str,
        count: int,
        digest: str | None = None,
        last: Checkpoint | None = None,
    ) -> list[Checkpoint]:
        """The first ``count`` checkpoints: one cache round trip, the record on a miss.

        The cache decides nothing: its checkpoints are used only when their chained
        digest equals ``digest``, the record's; anything else (a lost key, a tampered
        or stale value, a row recorded before digests, ``digest`` None) is a miss.
        ``last``, when given, is the ``count``-th, recorded by the claim and not cached yet.
        """
        if count == 0:
            return []
        if count == 1 and last is not None:
            if _chain([last]) == digest:
                return [last]
        elif digest is not None:
            cached = self.cache.load(flow_id)
            known = count - (last is not None)
            if len(cached) >= known and all(i in cached for i in range(known)):
                history = [cached[i] for i in range(known)]
                if last is not None:
                    history.append(last)
                if _chain(history) == digest:
                    return history
                log.warning(
                    "flow %s: the cached checkpoints do not match the record's digest; "
                    "reading the record and refilling the cache",
                    flow_id,
                )
        cps = self.store.load_checkpoints(flow_id)
        self.cache.fill(flow_id, cps)
        return cps

    def advance(self, flow_id: str) -> Advance:
        """Claim the flow and run its handler until it suspends or finishes."""
        claimed_at = time.monotonic()
        claimed = self.store.claim(
            flow_id, self._owner(), self.lease_ttl, max_lapses=self.max_lapses
        )
        if not isinstance(claimed, Claimed):
            if claimed.reason == "busy":
                return Advance("busy", retry_after=claimed.retry_after)
            if claimed.reason == "parked":
                log.error(
                    "flow %s: parked failed after %s executions died without progress",
                    flow_id,
                    self.max_lapses,
                )
                self.cache.drop(flow_id)
                return Advance("failed")
            if claimed.reason == "missing":
                log.warning("flow %s: no such flow; message dropped", flow_id)
            return Advance("noop")
        lease = claimed.lease
        # -- observe (crux_workers._observe) --
        woke = claimed.woke_at
        self.observer.execution_claimed(
            Claim(
                claimed.name,
                flow_id,
                claimed.runs > 1,
                claimed.woke_by,
                None if woke is None else max(0.0, (self.store.now() - woke).total_seconds()),
            )
        )
        # --
        try:
            defn = self.lookup(claimed.name)
        except UnknownFlow:
            log.error(
                "flow %s: flow %r is not registered in this worker (missing --import?); "
                "lease released for another worker",
                flow_id,
                claimed.name,
            )
            self.store.release(lease)
            raise
        if claimed.cancel_requested:
            self.store.finish(lease, "cancelled")
            self.cache.drop(flow_id)
            return Advance("cancelled")
        history = self.load_history(
            flow_id, claimed.next_seq, claimed.history_digest, claimed.consumed
        )
        execution = Execution(self, claimed, history, claimed_at)
        try:
            try:
                flow_input = defn.input_model.model_validate_json(claimed.input)
            except ValidationError as exc:
                raise CruxError(
                    f"stored input no longer fits {defn.input_model.__name__}: {exc}"
                ) from None
            ctx: FlowContext[Any] = FlowContext(execution, flow_id, flow_input)
            if claimed.next_seq == 0:
                log.info("flow %s (%s): started", flow_id, defn.name)
            else:
                log.info("flow %s (%s): resumed at checkpoint %d", flow_id, defn.name, len(history))
            value = self._run_handler(defn, ctx)
            try:
                result = _json.dumps(value)
            except (TypeError, ValueError) as exc:
                raise CruxError(
                    f"the flow's return value cannot be stored as JSON: {exc}"
                ) from None
            ended = execution.joined(
                lambda step: self.store.finish(lease, "completed", result=result, step=step)
            )
            if claimed.next_seq > 0:  # only earlier executions can have filled the cache
                self.cache.drop(flow_id)
            if ended == "cancelled":  # asked while the last step ran: seen at its write
                log.info("flow %s: cancelled after its last step", flow_id)
                return Advance("cancelled", steps_run=execution.steps_run)
            log.info("flow %s: completed", flow_id)
            return Advance("completed", steps_run=execution.steps_run)
        except Suspended as suspended:
            self.observer.suspended(  # -- observe (crux_workers._observe) --
                claimed.name, flow_id, suspended.point, suspended.wake_in
            )
            if execution.uncached:
                self.cache.fill(flow_id, execution.uncached)
            return Advance("suspended", steps_run=execution.steps_run, wake_in=suspended.wake_in)
        except FlowStopped as stop:
            self.cache.drop(flow_id)
            return Advance(_STOPPED.get(stop.status, "noop"), steps_run=execution.steps_run)
        except LeaseLost as exc:
            log.warning("flow %s: %s; this execution stops without writing", flow_id, exc)
            return Advance("lost", steps_run=execution.steps_run)
        except RecordRefused as exc:
            # The record refused a write for what it holds: retrying cannot help. Fail the
            # flow with the error; if even that is refused, this raises, and the flow is
            # left to the crash-loop rule (CRUX_MAX_LAPSES).
            return self._fail(execution, exc)
        except StoreError:
            raise  # the record is unreachable: abandon this execution, do not fail the flow
        except Exception as exc:
            return self._fail(execution, exc)

    @staticmethod
    def _run_handler(defn: FlowDef, ctx: FlowContext[Any]) -> Any:
        if defn.is_async:
            # On the process's flow loop; this thread waits, as it would for a sync handler.
            return flow_loop.run(defn.fn(AsyncFlowContext(ctx)))
        return defn.fn(ctx)

    def _fail(self, execution: Execution, exc: BaseException) -> Advance:
        log.warning("flow %s: failed: %s", execution.lease.flow_id, exc)
        lease, error = execution.lease, error_json(exc)
        try:
            ended = execution.joined(
                lambda step: self.store.finish(lease, "failed", error=error, step=step)
            )
        except LeaseLost:
            return Advance("lost", steps_run=execution.steps_run)
        self.cache.drop(execution.lease.flow_id)
        return Advance(
            "cancelled" if ended == "cancelled" else "failed", steps_run=execution.steps_run
        )
