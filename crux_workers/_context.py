"""FlowContext: what a flow handler calls (``f.step``, ``f.suspend``) and the replay.

A checkpoint is identified by its kind, name and occurrence (the n-th call with that
name in this run). Replay walks the recorded sequence: a recorded checkpoint returns
its stored result; the first unrecorded one is executed and committed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Generic, NoReturn, TypeVar

from pydantic import BaseModel

from . import _json
from ._durations import Duration, parse_duration
from ._ids import MAX_ID, valid_id
from ._loop import flow_loop
from ._models import ErrorInfo, Retry
from ._port import ExecutionPort
from ._schema_check import wait_schema
from ._store._clock import utcnow
from ._store._types import Checkpoint, Suspension, TaskError, TaskPoint
from ._values import encode_result, task_call, validator
from .errors import (
    CruxError,
    InvalidInput,
    NonDeterminismError,
    NonRetryableError,
    StepFailed,
    Suspended,
)

InputT = TypeVar("InputT", bound=BaseModel)
CancelHook = Callable[[Callable[[], None]], AbstractContextManager[None]]
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class StepInfo:
    """The step being executed: pass ``idempotency_key`` to external APIs."""

    flow_id: str
    name: str
    occurrence: int
    seq: int
    attempt: int
    _cancel: threading.Event | None = field(default=None, repr=False, compare=False)

    @property
    def cancelled(self) -> bool:
        """True once the flow was cancelled while this step runs: stop early if you can.

        Seen within about a second of the cancel (see docs/async.md). Async steps are
        interrupted at their current ``await`` instead; sync code can only poll this.
        """
        return self._cancel is not None and self._cancel.is_set()

    @property
    def idempotency_key(self) -> str:
        """Stable across re-executions of this step: flow id, step name, occurrence."""
        return f"{self.flow_id}:{self.name}:{self.occurrence}"


_current_step: ContextVar[StepInfo | None] = ContextVar("crux_current_step", default=None)
# Set by parallel/consensus/swarm in each branch ("parallel branch 2"): checkpoints must
# be taken in the handler's order, which concurrent branches cannot give.
_branch: ContextVar[str | None] = ContextVar("crux_compose_branch", default=None)


def current_step() -> StepInfo:
    """The step running in this context; raises ``CruxError`` outside of a step."""
    info = _current_step.get()
    if info is None:
        raise CruxError("current_step() called outside of a flow step")
    return info


def _check_name(name: object, what: str) -> str:
    # The same rules as ids, and printable: names are shown in logs, the CLI and the console.
    if not valid_id(name) or not isinstance(name, str) or not name.isprintable():
        raise InvalidInput(
            f"{what} name must be a printable, non-empty string of at most {MAX_ID} "
            f"characters (got {str(name)[:60]!r})"
        )
    return name


class StepInterrupted(Exception):
    """A step's coroutine was cancelled because the flow was cancelled (internal)."""


def call_maybe_async(fn: Callable[[], Any], on_cancel: CancelHook | None = None) -> Any:
    """Call ``fn``; if it returns an awaitable, run it on the process's flow loop.

    With ``on_cancel``, a cancel request seen while the awaitable runs cancels it at
    its current ``await``; once it has unwound (its ``finally`` blocks ran), this
    raises ``StepInterrupted``. A ``CancelledError`` of the step's own making is a
    failure of the step like any other.
    """
    value = fn()
    if not inspect.isawaitable(value):
        return value
    awaitable = value

    if flow_loop.on_loop_thread():
        # A sync call made from async code on the loop itself: it cannot block the loop
        # it waits for, so it runs on a private loop in a private thread.
        async def _await() -> Any:
            return await awaitable

        return _run_on_private_loop(_await())
    box: dict[str, asyncio.Task[Any]] = {}
    interrupted = threading.Event()

    async def _step() -> Any:
        # A task of its own, so the cancel reaches the step's coroutine and this call
        # still waits for it to unwind.
        task = asyncio.ensure_future(awaitable)
        box["task"] = task
        return await task

    future = flow_loop.submit(_step())
    if on_cancel is None:
        return _result(future)

    def cancel() -> None:
        interrupted.set()
        loop = flow_loop.loop()

        def _cancel() -> None:
            task = box.get("task")
            if task is not None:
                task.cancel()
            else:  # not started yet
                future.cancel()

        loop.call_soon_threadsafe(_cancel)

    with on_cancel(cancel):
        try:
            return _result(future)
        except _OwnCancel:
            if interrupted.is_set():
                raise StepInterrupted() from None
            raise RuntimeError("the step's coroutine was cancelled by its own code") from None


class _OwnCancel(Exception):
    """The step's coroutine ended cancelled (by the flow's cancel, or by its own code)."""


def _result(future: concurrent.futures.Future[Any]) -> Any:
    try:
        return future.result()
    except (concurrent.futures.CancelledError, asyncio.CancelledError):
        raise _OwnCancel() from None


def _run_on_private_loop(coro: Any) -> Any:
    box: dict[str, Any] = {}

    def _runner() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=_runner, name="crux-async-step")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


class FlowContext(Generic[InputT]):
    """The handle a flow handler receives as ``f``."""

    def __init__(self, execution: ExecutionPort, flow_id: str, input: InputT) -> None:
        self._x = execution
        self.flow_id = flow_id
        self.input = input
        self._seq = 0
        self._occurrences: Counter[str] = Counter()

    # -- replay ---------------------------------------------------------------------

    def _next(self, kind: str, name: str) -> tuple[int, int, Checkpoint | None]:
        if (branch := _branch.get()) is not None:
            raise NonRetryableError(
                f"{kind} {name!r} called from {branch}: the flow's checkpoint API is not "
                "available inside parallel, consensus or swarm branches; take the "
                "checkpoints around the composition instead"
            )
        occurrence = self._occurrences[name]
        self._occurrences[name] += 1
        seq = self._seq
        self._seq += 1
        cp = self._x.recorded(seq)
        if cp is not None:
            if (cp.kind, cp.name, cp.occurrence) != (kind, name, occurrence):
                raise NonDeterminismError(
                    f"flow {self.flow_id}: checkpoint {seq} was recorded as "
                    f"{cp.kind} {cp.name!r}#{cp.occurrence}, the replay asked for "
                    f"{kind} {name!r}#{occurrence}",
                    flow_id=self.flow_id,
                    seq=seq,
                    expected=f"{cp.kind} {cp.name!r}#{cp.occurrence}",
                    actual=f"{kind} {name!r}#{occurrence}",
                )
            return seq, occurrence, cp
        return seq, occurrence, None

    @property
    def replaying(self) -> bool:
        """True while recorded checkpoints remain ahead of the handler."""
        return self._seq < self._x.recorded_count()

    # -- step -----------------------------------------------------------------------

    def step(self, name: str, fn: Callable[[], T], *, retry: Retry | None = None) -> Any:
        """Run ``fn()`` once for this flow and return its result as stored JSON.

        The result (JSON-able or a pydantic model) is committed to the record before
        this returns; a replay returns the stored value without calling ``fn``. Both
        return the JSON form (a model comes back as a dict), so a first run and a
        replay see the same value.
        """
        seq, occurrence, cp = self._open_step(name, fn)
        if cp is not None:
            return _json.loads(cp.result)
        started = utcnow()
        attempt, value = self._run_user_code(seq, name, occurrence, fn, retry)
        return self._commit_value("step", seq, name, occurrence, value, started, attempt)

    def _open_step(self, name: str, fn: object) -> tuple[int, int, Checkpoint | None]:
        _check_name(name, "step")
        if not callable(fn):
            raise InvalidInput(f"step {name!r}: fn must be callable, got {type(fn).__name__}")
        return self._next("step", name)

    def _commit_value(
        self,
        kind: str,
        seq: int,
        name: str,
        occurrence: int,
        value: Any,
        started: datetime,
        attempts: int,
    ) -> Any:
        what = f"{'step' if kind == 'step' else 'wait_until'} {name!r}"
        result = encode_result(value, what, name, self._x.max_value_bytes)
        self._x.commit(
            Checkpoint(seq, kind, name, occurrence, result), started_at=started, attempts=attempts
        )
        return _json.loads(result)

    def _run_user_code(
        self, seq: int, name: str, occurrence: int, fn: Callable[[], Any], retry: Retry | None
    ) -> tuple[int, Any]:
        """Run a step's (or a condition's) function in its context; handle its failure."""
        attempt, token = self._enter_step(seq, name, occurrence)
        try:
            with self._x.keep_lease():
                return attempt, call_maybe_async(fn, self._x.on_cancel)
        except StepInterrupted:
            self._x.stop_cancelled(name)
        except Exception as exc:
            self._step_raised(seq, name, attempt, exc, retry)
        finally:
            _current_step.reset(token)

    def _enter_step(self, seq: int, name: str, occurrence: int) -> tuple[int, Any]:
        """Check the lease, then make the step current; returns its attempt and a reset token."""
        self._x.before_step()
        attempt = self._x.attempt_for(seq)
        info = StepInfo(self.flow_id, name, occurrence, seq, attempt, self._x.cancel_seen)
        return attempt, _current_step.set(info)

    def _step_raised(
        self, seq: int, name: str, attempt: int, exc: Exception, retry: Retry | None
    ) -> NoReturn:
        if self._x.cancel_seen.is_set():
            # Cancelled meanwhile: the step's failure is moot (and not worth a retry).
            self._x.stop_cancelled(name)
        failure = StepFailed.from_exception(exc, step=name, attempt=attempt)
        self._x.step_failed(seq, name, attempt, failure, retry)

    # -- time -------------------------------------------------------------------------

    def sleep(self, name: str, duration: Duration) -> None:
        """Durable sleep: the flow suspends and a timer in the record wakes it.

        The wake time is fixed when the sleep is first reached, so replays and restarts
        do not extend it.
        """
        _check_name(name, "sleep")
        seconds = parse_duration(duration, what=f"sleep {name!r}")
        seq, occurrence, cp = self._next("sleep", name)
        if cp is None:
            until = self._x.now() + timedelta(seconds=seconds)
            cp = Checkpoint(seq, "sleep", name, occurrence, _json.dumps({"until": until}))
            self._x.commit(cp, started_at=utcnow(), attempts=1)
        if not self.replaying:
            until = datetime.fromisoformat(_json.loads(cp.result)["until"])
            self._x.sleep_until(name, until)

    def wait_until(
        self,
        name: str,
        condition: Callable[[], Any],
        *,
        every: Duration = "1m",
        timeout: Duration | None = None,
    ) -> Any:
        """Return the first truthy value of ``condition()``, checked every ``every``.

        No worker is held between checks: each check replays the flow to this point
        from its recorded steps. The truthy value is recorded (it must be JSON-able).
        With ``timeout``, the flow ends ``expired`` if the condition stays false.
        """
        point, cp = self._open_wait(name, condition, every, timeout)
        if cp is not None:
            return _json.loads(cp.result)
        started = utcnow()
        _, value = self._run_user_code(point.seq, name, point.occurrence, condition, None)
        return self._settle_wait(point, every, value, started)

    def _open_wait(
        self, name: str, condition: object, every: Duration, timeout: Duration | None
    ) -> tuple[Suspension, Checkpoint | None]:
        _check_name(name, "wait_until")
        if not callable(condition):
            raise InvalidInput(f"wait_until {name!r}: condition must be callable")
        parse_duration(every, what=f"wait_until {name!r} every")
        timeout_s = (
            parse_duration(timeout, what=f"wait_until {name!r} timeout")
            if timeout is not None
            else None
        )
        seq, occurrence, cp = self._next("wait", name)
        return Suspension(seq, name, occurrence, timeout_s), cp

    def _settle_wait(
        self, point: Suspension, every: Duration, value: Any, started: datetime
    ) -> Any:
        if not value:
            self._x.poll_later(point, parse_duration(every))
        return self._commit_value(
            "wait", point.seq, point.name, point.occurrence, value, started, 1
        )

    # -- child tasks --------------------------------------------------------------------

    def run_task(
        self,
        name: str,
        task: Any,
        /,
        *args: Any,
        retry: Retry | None = None,
        resend_after: Duration | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run a Celery task on whatever worker its queue reaches; return its result.

        ``task`` is a Celery task, a signature (``t.s(...).set(queue="gpu")``), or a
        task name registered in another service. The child is sent once (task id
        ``crux:<flow>:<seq>:<attempt>:<secret>``), the flow suspends without holding a worker,
        and the child's result is recorded as this step's result and resumes the flow.
        A failed child follows ``retry`` like a failed step. If no outcome arrives
        within ``resend_after`` (default ``CRUX_TASK_RESEND_AFTER``), the child is sent
        again under the same task id: children run at least once, like steps.
        """
        _check_name(name, "run_task")
        task_name, call, child = task_call(name, task, args, kwargs)
        resend = (
            parse_duration(resend_after, what=f"run_task {name!r} resend_after")
            if resend_after is not None
            else self._x.task_resend_after
        )
        seq, occurrence, cp = self._next("task", name)
        if cp is not None:
            return _json.loads(cp.result)
        self._x.before_step()
        attempt = self._x.attempt_for(seq)
        point = TaskPoint(seq, name, occurrence, attempt, task_name, call, resend)
        got = self._x.take_task(point, child)
        if isinstance(got, TaskError):
            info = ErrorInfo.model_validate_json(got.error)
            failure = StepFailed(
                f"child task {task_name!r} of step {name!r} failed on attempt {attempt}: "
                f"{info.type}: {info.message}",
                step=name,
                attempt=attempt,
                error_type=info.type,
                error_message=info.message,
                traceback=info.traceback or "",
                retryable=bool(info.details.get("retryable", True)),
            )
            self._x.step_failed(seq, name, attempt, failure, retry)
        return _json.loads(got.result)

    # -- suspend ----------------------------------------------------------------------

    def suspend(
        self,
        name: str,
        *,
        schema: type[M] | None = None,
        timeout: Duration | None = None,
    ) -> Any:
        """Return the payload of the next signal called ``name``, validated by ``schema``.

        With no such signal recorded yet, the flow checkpoints and this execution
        ends; the signal's arrival resumes it. With ``timeout`` the flow ends
        ``expired`` if no valid signal comes in time.
        """
        _check_name(name, "signal")
        timeout_s = parse_duration(timeout, what="suspend timeout") if timeout is not None else None
        seq, occurrence, cp = self._next("suspend", name)
        if cp is None:
            wait = wait_schema(schema, self._x.max_value_bytes)
            point = Suspension(seq, name, occurrence, timeout_s, wait)
            cp = self._x.take_signal_or_suspend(point, validator(schema))
        payload = _json.loads(cp.result)
        return schema.model_validate(payload) if schema is not None else payload


__all__ = ["FlowContext", "StepInfo", "Suspended", "current_step"]
