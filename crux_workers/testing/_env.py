"""``FlowEnvironment``: flows in this process, on a virtual clock, driven by the test.

The environment is an app of its own (``Crux`` over an in-memory record, or a SQLite or
Postgres one, a virtual clock and an inline transport). Flows defined with ``@flow`` on
any app are re-registered on it, so nothing touches the app's real record or broker.
Nothing runs until the test drives the environment: ``start``, ``signal``, ``cancel``,
``complete_task`` run every execution they make due, in order; ``advance`` moves the
clock from one recorded timer to the next and fires each.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

from pydantic import BaseModel

from .._app import Crux
from .._durations import Duration, parse_duration
from .._flow import FlowHandle, FlowRun
from .._models import FlowOutcome, SignalReceipt
from .._registry import FlowDef, Handler
from .._settings import Settings
from .._store._cache import MemoryStepCache
from .._store._clock import aware
from .._store._lifecycle import TERMINAL
from .._store._roles import CruxStore
from ..errors import InvalidInput, WaitTimeout
from ._base import AdvanceReport, SimulatedCrash, TestingError, TimePoint, VirtualClock
from ._transport import InlineTransport, PendingTask

_LIMIT = 10_000


class EnvFlowRun(FlowRun):
    """A flow started in an environment; ``wait`` drives virtual time instead of sleeping."""

    def __init__(self, env: FlowEnvironment, flow_id: str) -> None:
        super().__init__(env.app, flow_id)
        self.env = env

    def __repr__(self) -> str:
        return f"EnvFlowRun(flow_id={self.flow_id!r})"

    def wait(self, timeout: float | None = None) -> FlowOutcome:
        """Advance virtual time, timer by timer, until the flow ends.

        ``timeout`` is in virtual seconds; ``WaitTimeout`` if the flow is still running
        then, ``TestingError`` if it waits for something no timer brings (a signal).
        """
        return self.env.advance_until_done(self.flow_id, timeout=timeout)


Flowish = FlowHandle[Any] | Crux | FlowDef
HandlerWrap = Callable[[FlowDef], Handler]
StoreWrap = Callable[[CruxStore], CruxStore]


class FlowEnvironment:
    """Flows in-process on a virtual clock; use as a context manager.

    - ``flows``: handles (``@flow`` results) or apps whose flows to host up front;
      ``start`` registers a handle it has not seen.
    - ``store``: None for an in-memory record, else a SQLite path or a database URL
      (``sqlite:///...``, ``postgresql+psycopg://...``); its schema is brought to head.
    - ``start``: where the virtual clock starts (default: now, to the second).
    - ``tasks``: results of ``run_task`` children by task name, each a function (called
      with the child's arguments), a value, or an exception instance (the child fails).
      Other children whose Celery task object the flow passed run inline (the task's
      function is called) unless ``run_tasks=False``; the rest wait for
      ``complete_task``.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        *flows: Flowish,
        store: str | Path | None = None,
        start: datetime | None = None,
        tasks: Mapping[str, Any] | None = None,
        run_tasks: bool = True,
        settings: Settings | None = None,
        wrap_handler: HandlerWrap | None = None,
        wrap_store: StoreWrap | None = None,
    ) -> None:
        if start is None:
            start = datetime.now(UTC).replace(microsecond=0)
        self.clock = VirtualClock(start)
        self.settings = settings if settings is not None else Settings.model_construct()
        record = self._open_store(store)
        self.store: CruxStore = wrap_store(record) if wrap_store is not None else record
        self.transport = InlineTransport(tasks, run_tasks=run_tasks)
        self.app = Crux(
            self.settings, store=self.store, cache=MemoryStepCache(), transport=self.transport
        )
        self._wrap = wrap_handler
        self._hosted: dict[str, FlowDef] = {}
        self._flow_ids: list[str] = []
        self._stalled: dict[str, datetime] = {}
        self.crashes: list[tuple[str, datetime]] = []
        self.executions = 0
        # How often each child task's function was called here, by task name.
        self.child_calls: Counter[str] = Counter()
        for item in flows:
            self.register(item)

    def _open_store(self, store: str | Path | None) -> CruxStore:
        if store is None:
            from .._store._memory import MemoryStore

            return MemoryStore(clock=self.clock)
        from .._store._migrate import ensure_schema
        from .._store._sql import SqlStore

        url = str(store)
        if "://" not in url:
            url = f"sqlite:///{Path(url).resolve()}"
        sql = SqlStore(url, clock=self.clock)
        ensure_schema(sql.engine)
        return sql

    # -- context manager -------------------------------------------------------------------

    def __enter__(self) -> FlowEnvironment:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release the record (a SQL store's connections)."""
        self.app.close()

    # -- hosting flows ---------------------------------------------------------------------

    def register(self, item: Flowish) -> None:
        """Host a flow (a handle or its definition), or every flow of an app."""
        defs = item.flow_defs() if isinstance(item, Crux) else [_defn(item)]
        for defn in defs:
            hosted = self._hosted.get(defn.name)
            if hosted is not None:
                if hosted.fn is not defn.fn:
                    raise TestingError(
                        f"another flow called {defn.name!r} is hosted in this environment "
                        "already: use one environment per version of a flow"
                    )
                continue
            fn = self._wrap(defn) if self._wrap is not None else defn.fn
            self.app.registry.define(defn.name, fn, defn.input_model, defn.queue)
            self._hosted[defn.name] = defn

    def start(
        self,
        flow: FlowHandle[Any] | str,
        input: BaseModel | dict[str, Any] | None = None,
        *,
        flow_id: str | None = None,
    ) -> EnvFlowRun:
        """Start a flow and run it until it suspends or ends."""
        if isinstance(flow, str):
            defn = self.app.lookup(flow)
            handle: FlowHandle[Any] = FlowHandle(self.app, defn)
        else:
            handle = flow
            self.register(handle)
        model = handle.validate_input(input)
        flow_id = flow_id if flow_id is not None else str(uuid.uuid4())
        self.app.client.start(handle.name, model, flow_id)
        if flow_id not in self._flow_ids:
            self._flow_ids.append(flow_id)
        self.run_pending()
        return EnvFlowRun(self, flow_id)

    def run(self, flow_id: str) -> EnvFlowRun:
        """The run of a flow already in the record; its timers are the environment's too."""
        if flow_id not in self._flow_ids:
            self._flow_ids.append(flow_id)
        return EnvFlowRun(self, flow_id)

    # -- driving -----------------------------------------------------------------------------

    def now(self) -> datetime:
        """The virtual time."""
        return self.clock.now

    def signal(
        self, flow_id: str, name: str, payload: Any = None, *, key: str | None = None
    ) -> SignalReceipt:
        """Record a signal and run what it wakes."""
        receipt = self.app.signal_flow(flow_id, name, payload, key=key)
        self.run_pending()
        return receipt

    def cancel(self, flow_id: str, reason: str = "") -> str:
        """Cancel a flow ("cancelled", or "cancelling" while a lease runs it)."""
        status = self.app.cancel_flow(flow_id, reason)
        self.run_pending()
        return status

    def pending_tasks(self) -> list[PendingTask]:
        """``run_task`` children waiting for ``complete_task``, oldest first."""
        return list(self.transport.pending.values())

    def complete_task(
        self, task: str, *, result: Any = None, error: BaseException | None = None
    ) -> bool:
        """Complete a pending child, by task id or by task name (the oldest of that name).

        Runs what the outcome wakes; returns whether it woke its flow.
        """
        pending = self.transport.pending
        task_id = task if task in pending else None
        if task_id is None:
            task_id = next((p.task_id for p in pending.values() if p.task == task), None)
        if task_id is None:
            raise TestingError(f"no pending child task {task!r}; pending: {list(pending)}")
        del pending[task_id]
        woke = self.app.complete_task(task_id, result=result, error=error)
        self.run_pending()
        return woke

    def on_task(self, name: str, outcome: Any) -> None:
        """Supply the result of children called ``name`` from now on (see ``tasks``)."""
        self.transport.tasks[name] = outcome

    def run_pending(self) -> int:
        """Run every queued execution, child and published signal; returns how many ran."""
        q = self.transport.queues
        for ran in range(_LIMIT):
            q = self.transport.queues
            if q.runs:
                self._execute(*q.runs.popleft())
            elif q.children:
                self._run_child(*q.children.popleft())
            elif q.signals:
                s = q.signals.popleft()
                self.app.runtime.deliver_signal(s.flow_id, s.name, s.payload, s.key)
            else:
                return ran
        raise TestingError(f"flows keep asking for executions ({_LIMIT} in one drain)")

    def _execute(self, flow_name: str, flow_id: str) -> None:
        self.executions += 1
        try:
            self.app.execute(flow_name, flow_id)
        except SimulatedCrash:
            # The process died here: its lease lapses after the TTL, then the sweep
            # hands the flow to another execution.
            lapse = self.clock.now + timedelta(seconds=self.settings.lease_ttl)
            self._stalled[flow_id] = lapse
            self.crashes.append((flow_id, self.clock.now))

    def _run_child(self, task_id: str, call: dict[str, Any], child: Any) -> None:
        fn = self.transport.resolve(task_id, call, child)
        if fn is None:
            return
        self.child_calls[call["task"]] += 1
        try:
            value = fn()
        except Exception as exc:
            self.app.complete_task(task_id, error=exc)
        else:
            self.app.complete_task(task_id, result=value)

    # -- time --------------------------------------------------------------------------------

    def time_points(self) -> list[TimePoint]:
        """What is due in the record for this environment's flows, earliest first."""
        points: list[TimePoint] = []
        for flow_id in self._flow_ids:
            row = self.store.get_flow(flow_id, details=False)
            if row.status in TERMINAL:
                continue
            wake_at = aware(row.wake_at)
            if wake_at is not None and row.wake_kind is not None:
                if row.wake_kind == "run":  # marked due: the sweep re-sends it after this
                    wake_at += timedelta(seconds=self.settings.redrive_after)
                points.append(TimePoint(wake_at, flow_id, row.name, str(row.wake_kind)))
            elif row.status == "running":
                lapse = self._stalled.get(flow_id) or self.clock.now + timedelta(
                    seconds=self.settings.lease_ttl
                )
                # The sweep takes a lease strictly past its end.
                points.append(
                    TimePoint(lapse + timedelta(milliseconds=1), flow_id, row.name, "lease")
                )
        return sorted(points)

    def advance(self, duration: Duration) -> AdvanceReport:
        """Let ``duration`` pass: fire every timer due within it, in time order.

        Each time point moves the clock to it, sweeps (expire, wake, re-send stalled
        flows) and runs what that made due, before the next one is looked at.
        """
        seconds = parse_duration(duration, what="advance")
        return self.advance_to(self.clock.now + timedelta(seconds=seconds))

    def advance_to(self, when: datetime) -> AdvanceReport:
        """``advance`` up to the absolute virtual time ``when``."""
        started = self.clock.now
        fired: list[TimePoint] = []
        self.run_pending()
        for _ in range(_LIMIT):
            due = [p for p in self.time_points() if p.at <= when]
            if not due:
                break
            at = max(due[0].at, self.clock.now)
            self.clock.move_to(at)
            fired += [p for p in due if p.at <= at]
            self.sweep()
        else:
            raise TestingError(f"timers keep firing ({_LIMIT} before {when.isoformat()})")
        self.clock.move_to(when)
        self.sweep()
        return AdvanceReport(started, self.clock.now, fired, self.time_points())

    def sweep(self) -> None:
        """One sweep at the current virtual time, then run what it made due."""
        store, s = self.store, self.settings
        for _ in range(_LIMIT):
            got = store.sweep(limit=500, redrive_after=s.redrive_after)
            for flow_id in got.expired:
                self.app.cache.drop(flow_id)
            for name, flow_id in got.due:
                self.transport.enqueue(name, flow_id)
            if len(got.expired) + len(got.due) < 500:
                break
        self.run_pending()

    def advance_until_done(self, flow_id: str, *, timeout: float | None = None) -> FlowOutcome:
        """Fire this flow's timers one after another until it ends; its outcome."""
        started = self.clock.now
        self.run_pending()
        for _ in range(_LIMIT):
            outcome = self.app.client.outcome(flow_id)
            if outcome is not None:
                return outcome
            mine = [p for p in self.time_points() if p.flow_id == flow_id]
            if not mine:
                row = self.store.get_flow(flow_id, details=False)
                raise TestingError(
                    f"flow {flow_id} is {row.status} waiting on {row.waiting_on!r}, "
                    "and no timer will change that: signal it, or complete its child"
                )
            if timeout is not None and mine[0].at > started + timedelta(seconds=timeout):
                row = self.store.get_flow(flow_id, details=False)
                raise WaitTimeout(
                    f"flow {flow_id} still {row.status} after {timeout}s of virtual time",
                    flow_id=flow_id,
                    status=row.status,
                )
            self.advance_to(mine[0].at)
        raise TestingError(f"flow {flow_id} did not end after {_LIMIT} timers")


def _defn(item: FlowHandle[Any] | FlowDef) -> FlowDef:
    if isinstance(item, FlowDef):
        return item
    if isinstance(item, FlowHandle):
        return item.defn
    raise InvalidInput(f"cannot host {type(item).__name__}: pass a @flow handle or a Crux app")
