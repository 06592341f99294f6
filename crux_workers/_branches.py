"""How the branches of ``parallel``, ``consensus`` and ``swarm`` run (see ``_compose``).

Async branches are tasks (on the caller's loop, or the process's flow loop for the
blocking forms); plain ones run in a thread pool private to the call; each branch in a
copy of the caller's context, marked as a branch so the flow's checkpoint API refuses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import threading
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

from ._context import _branch, call_maybe_async
from ._loop import flow_loop
from .errors import InvalidInput

T = TypeVar("T")

#: Upper bound on threads per call when ``max_workers`` is not given. Plain branches are
#: expected to wait on I/O (model calls, HTTP), so this is above the CPU count, but
#: bounded: a worker may run several flows, each fanning out.
DEFAULT_MAX_WORKERS = 32

Calls: TypeAlias = Sequence[tuple[str, Callable[[], Any]]]


@dataclass(slots=True)
class _Outcome:
    value: Any = None
    error: BaseException | None = None


def _check_max_workers(max_workers: int | None, what: str) -> None:
    if max_workers is not None and (
        isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1
    ):
        raise InvalidInput(f"{what}: max_workers must be an int >= 1, got {max_workers!r}")


def _check_callable(fn: object, what: str) -> None:
    if not callable(fn):
        raise InvalidInput(f"{what} must be callable, got {type(fn).__name__}")


def _is_async(fn: Callable[..., Any]) -> bool:
    """Whether calling ``fn`` only creates a coroutine, so it may be called on a loop."""
    # inspect sees through functools.partial and bound methods; a callable object is
    # async when its __call__ is.
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


def _thread_pool(kind: str, plain: int, max_workers: int | None) -> ThreadPoolExecutor:
    workers = min(plain, max_workers or DEFAULT_MAX_WORKERS)
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"crux-{kind}")


def _settle(outcomes: Sequence[_Outcome | None]) -> list[_Outcome]:
    """Re-raise the first control-flow exit in branch order; else the outcomes."""
    for outcome in outcomes:
        if outcome is not None and not isinstance(outcome.error, Exception | None):
            raise outcome.error
    # Only a control-flow exit skips branches, and it was re-raised above.
    return [o for o in outcomes if o is not None]


def _enter_branch(label: str, fn: Callable[[], Any]) -> Any:
    # Runs inside the branch's copied context, so setting _branch here is invisible to
    # the caller and to the other branches.
    _branch.set(label)
    return call_maybe_async(fn)


def _run_in_threads(kind: str, calls: Calls, max_workers: int | None) -> list[_Outcome]:
    """Every call in a thread of a pool private to this call (no async branch)."""
    # Set when control flow leaves a branch (or the caller): the flow is stopping, so
    # queued branches must not start side effects whose results nobody will record.
    stop = threading.Event()

    def run(label: str, fn: Callable[[], Any], ctx: contextvars.Context) -> _Outcome | None:
        if stop.is_set():
            return None
        try:
            return _Outcome(value=ctx.run(_enter_branch, label, fn))
        except Exception as exc:
            exc.add_note(f"in {label}")
            return _Outcome(error=exc)
        except BaseException as exc:
            stop.set()
            return _Outcome(error=exc)

    # Leaving the with-block joins every worker thread: none outlives the call.
    with _thread_pool(kind, len(calls), max_workers) as pool:
        # One context copy per branch, taken here in the caller's thread: a Context
        # cannot be entered by two threads at once.
        futures = [pool.submit(run, label, fn, contextvars.copy_context()) for label, fn in calls]
        try:
            results = [future.result() for future in futures]
        except BaseException:
            stop.set()
            raise
    return _settle(results)


async def _gather(
    kind: str, calls: Calls, max_workers: int | None, pool: ThreadPoolExecutor | None = None
) -> list[_Outcome | None]:
    """Every call concurrently on the running loop; one outcome per call, in call order.

    Async calls are tasks; plain ones run in ``pool`` (or a pool made for this call).
    Every failure is returned in its outcome (``_settle`` re-raises control flow, in the
    caller's thread); a call skipped after a control-flow exit has ``None``.
    """
    if not calls:
        return []
    loop = asyncio.get_running_loop()
    plain = sum(not _is_async(fn) for _, fn in calls)
    own_pool = _thread_pool(kind, plain, max_workers) if pool is None and plain else None
    pool = pool or own_pool
    gate = asyncio.Semaphore(max_workers) if max_workers is not None else None
    stopped = False

    async def call(fn: Callable[[], Any]) -> Any:
        if _is_async(fn):
            value = fn()
        else:
            # A copy of this task's context, so the thread sees the branch's variables.
            value = await loop.run_in_executor(pool, contextvars.copy_context().run, fn)
        if inspect.isawaitable(value):
            value = await value
        return value

    async def run(label: str, fn: Callable[[], Any]) -> _Outcome | None:
        nonlocal stopped
        async with gate or contextlib.nullcontext():
            if stopped:
                return None
            # This task runs in its own copy of the caller's context (create_task copies
            # it), so the mark stays in this branch.
            _branch.set(label)
            try:
                return _Outcome(value=await call(fn))
            except asyncio.CancelledError:
                stopped = True
                raise
            except Exception as exc:
                exc.add_note(f"in {label}")
                return _Outcome(error=exc)
            except BaseException as exc:
                stopped = True
                return _Outcome(error=exc)

    tasks = [loop.create_task(run(label, fn)) for label, fn in calls]
    interrupted = False
    try:
        await asyncio.wait(tasks)
    except asyncio.CancelledError:
        # The caller is cancelled: so is every branch, and each is waited for (its
        # finally blocks run) before the cancellation goes on.
        interrupted = stopped = True
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        raise
    finally:
        if own_pool is not None:
            # Normally every thread is idle by now and joins at once; a plain branch
            # still running after a cancel cannot be stopped and is not waited for.
            own_pool.shutdown(wait=not interrupted, cancel_futures=True)
    return [
        _Outcome(error=asyncio.CancelledError(f"{label} was cancelled"))
        if task.cancelled()
        else task.result()
        for (label, _), task in zip(calls, tasks, strict=True)
    ]


async def _run_branches_async(kind: str, calls: Calls, max_workers: int | None) -> list[_Outcome]:
    """The awaitable runner: on the caller's loop."""
    return _settle(await _gather(kind, calls, max_workers))


def _run_branches(kind: str, calls: Calls, max_workers: int | None) -> list[_Outcome]:
    """The blocking runner: threads only, or the flow loop when a branch is async."""
    if not calls:
        return []
    on_loop = flow_loop.on_loop_thread()
    if not on_loop and not any(_is_async(fn) for _, fn in calls):
        return _run_in_threads(kind, calls, max_workers)
    plain = sum(not _is_async(fn) for _, fn in calls)
    # Made (and, leaving the with-block, joined) in the calling thread, so no thread
    # outlives the call and the loop never waits for a join.
    pool = _thread_pool(kind, plain, max_workers) if plain else None
    with pool or contextlib.nullcontext():
        gather = _gather(kind, calls, max_workers, pool)
        if on_loop:
            # Sync code running on the flow loop cannot wait for the loop it blocks: every
            # branch, and any awaitable a plain branch hands back, goes to a private loop.
            outcomes = _run_on_private_loop(kind, gather)
        else:
            # submit() runs the coroutine in a copy of this thread's context.
            future = flow_loop.submit(gather)
            try:
                outcomes = future.result()
            except BaseException:
                future.cancel()
                raise
    # Control flow is re-raised here, in the caller's thread, never through the loop.
    return _settle(outcomes)


def _run_on_private_loop(kind: str, coro: Coroutine[Any, Any, T]) -> T:
    box: dict[str, Any] = {}
    ctx = contextvars.copy_context()  # a new thread starts with an empty context

    def runner() -> None:
        try:
            box["value"] = ctx.run(asyncio.run, coro)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=runner, name=f"crux-{kind}-loop")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    value: T = box["value"]
    return value


def _failures(outcomes: Sequence[_Outcome]) -> list[Exception]:
    return [o.error for o in outcomes if isinstance(o.error, Exception)]


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value
