"""``AsyncFlowContext``: what an ``async def`` flow handler receives as ``f``.

The same checkpoints, record and rules as ``FlowContext`` (it drives one), awaited:
an async flow suspended under a sync handler resumes under its async rewrite, and
the reverse. Step functions run as tasks on the process's flow loop, so a cancel
request reaches them at their current ``await``.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from . import _json
from ._context import FlowContext, InputT, _current_step
from ._durations import Duration
from ._models import Retry
from ._store._clock import utcnow

M = TypeVar("M", bound=BaseModel)


class AsyncFlowContext(Generic[InputT]):
    """The handle an ``async def`` flow handler receives as ``f``: await each call."""

    def __init__(self, core: FlowContext[InputT]) -> None:
        self._core = core
        self.flow_id = core.flow_id
        self.input: InputT = core.input

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
        return self._core.suspend(name, schema=schema, timeout=timeout)

    async def sleep(self, name: str, duration: Duration) -> None:
        """Durable sleep: the flow suspends and a timer in the record wakes it."""
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
                except asyncio.CancelledError:
                    if task.cancelled() and x.cancel_seen.is_set():
                        x.stop_cancelled(name)
                    raise
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
