"""``crash_test``: run a flow cleanly, then once per checkpoint boundary killed there.

A boundary is one side of one write the execution makes to the record: before a
step's commit (its side effect has happened, the commit has not), after it; at a
suspend; before and after a signal's or a child's result is taken; before and after
the flow's end is recorded. The kill is a ``SimulatedCrash`` raised by a proxy of
the record around the N-th write, so the record is left as a killed worker leaves
it; the environment then lets the lease lapse on virtual time, the sweep re-sends
the flow, and the run is driven to its end like the clean one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, cast

from pydantic import BaseModel

from .._flow import FlowHandle
from .._models import FlowOutcome
from .._registry import FlowDef, Handler
from .._store._roles import CruxStore
from .._store._types import Checkpoint, StepCommit, TaskSend
from ._base import SimulatedCrash
from ._crash_report import CrashReport, CrashRun, outcome_key
from ._env import FlowEnvironment

_WRITES = frozenset(
    {
        "commit_checkpoint",
        "take_signal_or_suspend",
        "take_task_or_send",
        "fail_step",
        "suspend_until",
        "poll_later",
        "finish",
    }
)
_FLOW_ID = "crash-test"
_START = datetime(2030, 1, 1, tzinfo=UTC)
_MAX_DRIVE = 1_000


# -- the kill --------------------------------------------------------------------------------


class CrashingStore:
    """A record that raises ``SimulatedCrash`` at one boundary: before (even ``crash_at``)
    or after (odd) its ``crash_at // 2``-th write; it logs every write it passes on."""

    def __init__(self, inner: CruxStore, crash_at: int | None) -> None:
        self._inner = inner
        self.crash_at = crash_at
        self.writes: list[tuple[str, str]] = []  # (before, after) descriptions
        self.crashed_at: str | None = None

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name not in _WRITES:
            return attr

        def write(*args: Any, **kwargs: Any) -> Any:
            k = len(self.writes)
            step: StepCommit | None = kwargs.get("step")
            if self.crash_at == 2 * k:
                self.writes.append(_describe(name, args, None, crashed=True, step=step))
                self.crashed_at = self.writes[-1][0]
                raise SimulatedCrash(self.crashed_at)
            result = attr(*args, **kwargs)
            self.writes.append(_describe(name, args, result, step=step))
            if self.crash_at == 2 * k + 1:
                self.crashed_at = self.writes[-1][1]
                raise SimulatedCrash(self.crashed_at)
            return result

        return write


def _describe(
    method: str,
    args: tuple[Any, ...],
    result: Any,
    *,
    crashed: bool = False,
    step: StepCommit | None = None,
) -> tuple[str, str]:
    """What "before" and "after" this write mean, in the flow's terms."""
    if step is None:
        return _describe_write(method, args, result, crashed=crashed)
    # The last step's commit rides with this write (a suspend, the finish).
    cp = step.cp
    what = f"{cp.kind} {cp.name!r}#{cp.occurrence}"
    if method == "take_signal_or_suspend":
        write = f"the suspend {args[1].name!r}"
    else:
        write = f"the flow's end ({args[1] if len(args) > 1 else '?'})"
    return (
        f"after {what} ran, before its commit (written with {write})",
        f"after {what} was committed with {write}",
    )


def _describe_write(
    method: str, args: tuple[Any, ...], result: Any, *, crashed: bool
) -> tuple[str, str]:
    if method == "commit_checkpoint":
        cp: Checkpoint = args[1]
        what = f"{cp.kind} {cp.name!r}#{cp.occurrence}"
        if cp.kind in ("step", "wait"):
            return (f"after {what} ran, before its commit", f"after {what} was committed")
        return (f"before {what} is recorded", f"after {what} was recorded")
    if method == "take_signal_or_suspend":
        name = args[1].name
        if crashed:
            return (f"at suspend {name!r}, before a signal is taken or the flow suspends", "")
        if isinstance(result, Checkpoint):
            return (
                f"before signal {name!r} is consumed",
                f"after signal {name!r} was consumed",
            )
        return (
            f"at suspend {name!r}, before it is recorded",
            f"after the flow suspended on {name!r}",
        )
    if method == "take_task_or_send":
        name = args[1].name
        if isinstance(result, TaskSend):
            return (
                f"before child {name!r} is recorded",
                f"after child {name!r} was recorded, before it is sent",
            )
        return (
            f"before child {name!r}'s outcome is taken",
            f"after child {name!r}'s outcome was taken",
        )
    if method == "fail_step":
        name, attempt = args[2], args[3]
        return (
            f"before failed attempt {attempt} of step {name!r} is recorded",
            f"after failed attempt {attempt} of step {name!r} was recorded",
        )
    if method == "suspend_until":
        return (
            f"before the {args[2]} timer is recorded",
            f"after the {args[2]} timer was recorded",
        )
    if method == "poll_later":
        name = args[1].name
        return (f"before wait_until {name!r} suspends", f"after wait_until {name!r} suspended")
    status = args[1] if len(args) > 1 else "?"
    return (f"before the flow is recorded {status}", f"after the flow was recorded {status}")


# -- counting step functions -------------------------------------------------------------------


def _counted(counts: Counter[str], name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    def call() -> Any:
        counts[name] += 1
        return fn()

    return call


class _CountingContext:
    """The handler's ``f``, counting each call of each step's function."""

    def __init__(self, inner: Any, counts: Counter[str]) -> None:
        self._inner = inner
        self._counts = counts

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def step(self, name: str, fn: Callable[[], Any], **kwargs: Any) -> Any:
        return self._inner.step(name, _counted(self._counts, name, fn), **kwargs)


class _AsyncCountingContext(_CountingContext):
    async def step(self, name: str, fn: Callable[[], Any], **kwargs: Any) -> Any:
        return await self._inner.step(name, _counted(self._counts, name, fn), **kwargs)


def _counting(counts: Counter[str]) -> Callable[[FlowDef], Handler]:
    def wrap(defn: FlowDef) -> Handler:
        fn = defn.fn
        if defn.is_async:

            async def handler_async(f: Any) -> Any:
                return await fn(_AsyncCountingContext(f, counts))

            return handler_async

        def handler(f: Any) -> Any:
            return fn(_CountingContext(f, counts))

        return handler

    return wrap


# -- the test ------------------------------------------------------------------------------------


Signal = tuple[str, Any]


def _drive(
    env: FlowEnvironment, flow: FlowHandle[Any], input: Any, signals: Sequence[Signal]
) -> str | None:
    """Start the flow and take it to its end; None when it ended, else why it did not."""
    run = env.start(flow, input, flow_id=_FLOW_ID)
    queue = list(signals)
    for _ in range(_MAX_DRIVE):
        if run.outcome() is not None:
            return None
        row = env.store.get_flow(_FLOW_ID, details=False)
        if (
            queue
            and row.status == "suspended"
            and row.waiting_on == queue[0][0]
            and row.wake_kind != "poll"
        ):
            name, payload = queue.pop(0)
            env.signal(_FLOW_ID, name, payload)
            continue
        points = env.time_points()
        pending = [p.task for p in env.pending_tasks()]
        if pending and points and points[0].kind == "task":
            # Only the child's resend timer is ahead: nothing will complete it.
            return f"children {pending} never completed: pass tasks={{name: fn}}"
        if points:
            env.advance_to(points[0].at)
        elif queue:
            name, payload = queue.pop(0)
            env.signal(_FLOW_ID, name, payload)
        else:
            if pending:
                return f"children {pending} never completed: pass tasks={{name: fn}}"
            return f"{row.status}, waiting on {row.waiting_on!r} with no signal left to send"
    return f"no end after {_MAX_DRIVE} moves"


def _one_run(
    flow: FlowHandle[Any],
    input: Any,
    signals: Sequence[Signal],
    crash_at: int | None,
    options: Mapping[str, Any],
) -> tuple[CrashRun, CrashingStore]:
    import time

    counts: Counter[str] = Counter()
    box: list[CrashingStore] = []

    def wrap_store(store: CruxStore) -> CruxStore:
        box.append(CrashingStore(store, crash_at))
        return cast(CruxStore, box[0])

    began = time.perf_counter()
    with FlowEnvironment(wrap_store=wrap_store, wrap_handler=_counting(counts), **options) as env:
        stuck = _drive(env, flow, input, signals)
        counts.update({f"task {name}": n for name, n in env.child_calls.items()})
        outcome = env.app.client.outcome(_FLOW_ID)
        cps = [f"{c.kind} {c.name!r}#{c.occurrence}" for c in box[0].load_checkpoints(_FLOW_ID)]
    crashing = box[0]
    where = crashing.crashed_at or (
        "clean" if crash_at is None else f"boundary {crash_at} (not reached)"
    )
    run = CrashRun(
        crash_at,
        where,
        outcome,
        cps,
        counts,
        crashing.crashed_at is not None,
        time.perf_counter() - began,
        stuck,
    )
    return run, crashing


def crash_test(
    flow: FlowHandle[Any],
    input: BaseModel | dict[str, Any] | None = None,
    *,
    signals: Iterable[Signal] = (),
    tasks: Mapping[str, Any] | None = None,
    run_tasks: bool = True,
    max_boundaries: int | None = None,
    same_outcome: Callable[[FlowOutcome | None, FlowOutcome | None], bool] | None = None,
    start: datetime = _START,
) -> CrashReport:
    """Run ``flow`` cleanly, then once killed at each checkpoint boundary; compare.

    ``signals`` are ``(name, payload)`` pairs, each sent when the flow first waits on
    that name (or, once nothing else is due, anyway). ``tasks`` and ``run_tasks`` are
    ``FlowEnvironment``'s. Outcomes are compared by status, result and error type,
    unless ``same_outcome(run, clean)`` says otherwise. Every run starts its virtual
    clock at ``start`` and uses the flow id ``crash-test``, so runs compare exactly.
    """
    signals = list(signals)
    options: dict[str, Any] = {"tasks": tasks, "run_tasks": run_tasks, "start": start}
    clean, store = _one_run(flow, input, signals, None, options)
    # A clean run that does not end has no outcome to compare the crashed runs with.
    total = 2 * len(store.writes) if clean.stuck is None else 0
    if max_boundaries is not None:
        total = min(total, max_boundaries)
    runs = [_one_run(flow, input, signals, b, options)[0] for b in range(total)]
    same = same_outcome or (lambda a, b: outcome_key(a) == outcome_key(b))
    return CrashReport(flow.name, clean, runs, same)
