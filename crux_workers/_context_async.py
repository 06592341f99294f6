"""``AsyncFlowContext``: what an ``async def`` flow handler receives as ``f``.

The same checkpoints, record and rules as ``FlowContext`` (it drives one), awaited:
an async flow suspended under a sync handler resumes under its async rewrite, and
the reverse. Step functions run as tasks on the process's flow loop, so a cancel
request reaches them at their current ``await``.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from . import _json
from ._context import FlowContext, InputT, _branch, _current_step
from ._durations import Duration
from ._models import Retry
from ._store._clock import utcnow
from .errors import NonRetryableError, StepFailed

M = TypeVar("M", bound=BaseModel)


class AsyncFlowContext(Generic[InputT]):
    """The handle an ``async def`` flow handler receives as ``f``: await each call."""

    def __init__(self, core: FlowContext[InputT]) -> None:
        self._core = core
        self.flow_id = core.flow_id
        self.input: InputT = core.input
        # The checkpoint call in progress: checkpoints are taken in the handler's order,
        # which concurrent calls (asyncio.gather of f.step) cannot give.
        self._active: str | None = None

    @contextmanager
    def _one_at_a_time(self, what: str) -> Iterator[None]:
        # Branches of parallel/consensus/swarm get the core's own message instead.
        if self._active is not None and _branch.get() is None:
            raise NonRetryableError(
                f"{what} called while {self._active} is still running: an async flow "
                "awaits its checkpoints one at a time (await each in turn, and put "
                "concurrent work inside one step)"
            )
        self._active = what
        try:
            yield
        finally:
            self._active = None

    @property
    def replaying(self) -> bool:
        """True while recorded checkpoints remain ahead of the handler."""
        return self._core.replaying

    async def step(self, name: str, fn: Callable[[], Any], *, retry: Retry | None = None) -> Any:
        """Run ``fn()`` once for this flow; return its result as stored JSON.

        ``fn`` may be ``async def``, return an awaitable (``lambda: fetch(x)``), or be
        a plain function; it runs on the flow loop, so plain code must not block (use
        ``asyncio.to_thread``). Concurrency inside the step is yours (``asyncio.gather``,
        task groups). The result is committed before this returns; a replay returns it
        without calling ``fn``.
        """
        core = self._core
        with self._one_at_a_time(f"step {name!r}"):
            seq, occurrence, cp = core._open_step(name, fn)
            if cp is not None:
                return _json.loads(cp.result)
            started = utcnow()
            attempt, value = await self._run_user_code(seq, name, occurrence, fn, retry)
            return core._commit_value("step", seq, name, occurrence, value, started, attempt)

    async def suspend(
        self, name: str, *, schema: type[M] | None = None, timeout: Duration | None = None
    ) -> Any:
        """The payload of the next signal called ``name`` (see ``FlowContext.suspend``)."""
        with self._one_at_a_time(f"suspend {name!r}"):
            return self._core.suspend(name, schema=schema, timeout=timeout)

    async def sleep(self, name: str, duration: Duration) -> None:
        """Durable sleep: the flow suspends and a timer in the record wakes it."""
        with self._one_at_a_time(f"sleep {name!r}"):
            self._core.sleep(name, duration)

    async def wait_until(
        self,
        name: str,
        condition: Callable[[], Any],
        *,
        every: Duration = "1m",
        timeout: Duration | None = None,
    ) -> Any:
        """The first truthy value of ``condition()`` (sync or async), checked every ``every``."""
        core = self._core
        with self._one_at_a_time(f"wait_until {name!r}"):
            point, cp = core._open_wait(name, condition, every, timeout)
            if cp is not None:
                return _json.loads(cp.result)
            started = utcnow()
            _, value = await self._run_user_code(point.seq, name, point.occurrence, condition, None)
            return core._settle_wait(point, every, value, started)

    async def run_task(
        self,
        name: str,
        task: Any,
        /,
        *args: Any,
        retry: Retry | None = None,
        resend_after: Duration | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run a Celery task durably and return its result (see ``FlowContext.run_task``)."""
        with self._one_at_a_time(f"run_task {name!r}"):
            return self._core.run_task(
                name, task, *args, retry=retry, resend_after=resend_after, **kwargs
            )

    async def _run_user_code(
        self, seq: int, name: str, occurrence: int, fn: Callable[[], Any], retry: Retry | None
    ) -> tuple[int, Any]:
        core, x = self._core, self._core._x
        attempt, token = core._enter_step(seq, name, occurrence)
        try:
            # A task of its own (in this context, so current_step() is visible): a cancel
            # request cancels exactly the step, at its current await.
            task = asyncio.ensure_future(_call(fn))
            loop = asyncio.get_running_loop()

            def cancel() -> None:
                loop.call_soon_threadsafe(task.cancel)

            with x.keep_lease(), x.on_cancel(cancel):
                try:
                    return attempt, await task
                except asyncio.CancelledError as exc:
                    if x.cancel_seen.is_set():
                        x.stop_cancelled(name)
                    current = asyncio.current_task()
                    if current is not None and current.cancelling():
                        raise
                    # No cancel of the flow: the step's own code was cancelled (a task
                    # it awaited, a library's scope). A failure like any other.
                    failure = StepFailed.from_exception(exc, step=name, attempt=attempt)
                    x.step_failed(seq, name, attempt, failure, retry)
        except Exception as exc:
            core._step_raised(seq, name, attempt, exc, retry)
        finally:
            _current_step.reset(token)


async def _call(fn: Callable[[], Any]) -> Any:
    # Called on the loop: `lambda: fetch(x)` hands back the coroutine to await. Plain
    # code runs here too, so it must not block (wrap it in asyncio.to_thread if it does).
    value = fn()
    if inspect.isawaitable(value):
        value = await value
    return value
