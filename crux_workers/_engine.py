"""One execution of a flow: claim the lease, replay, checkpoint, suspend or finish.

The engine knows the ``CruxStore`` and ``StepCache`` protocols and nothing of
SQLAlchemy, Redis or Celery, so the embedded default, the Celery fleet and the
unit tests run the same code.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from . import _json
from ._context import FlowContext
from ._context_async import AsyncFlowContext
from ._execution import Execution
from ._failure import error_json
from ._loop import flow_loop
from ._observe import Claim, NoObserver, Observer
from ._registry import FlowDef
from ._store._lifecycle import history_digest
from ._store._roles import CruxStore, StepCache
from ._store._types import Checkpoint, Claimed
from .errors import (
    CruxError,
    FlowStopped,
    LeaseLost,
    RecordRefused,
    StoreError,
    Suspended,
    UnknownFlow,
)

log = logging.getLogger("crux_workers.flow")


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
