"""Transports: how work leaves this process, chosen once per app.

Three things travel: "advance flow X" requests, ``run_task`` children, and signals
published for the ingress. The embedded default runs all three on threads of this
process; the fleet sends them as Celery messages (``_tasks.CeleryTransport``, the only
module that imports Celery). Every message is a hint: the record decides.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .errors import TaskFailed

log = logging.getLogger("crux_workers.transport")


@dataclass(frozen=True, slots=True)
class PublishedSignal:
    """A signal published for the ingress: its fields, and its wire form."""

    flow_id: str
    name: str
    payload: Any
    key: str
    body: str
    headers: dict[str, str]


class Transport(Protocol):
    """Sends executions, child tasks and published signals to where they run."""

    def enqueue(
        self, flow_name: str, flow_id: str, countdown: float | None = None, *, start: bool = False
    ) -> None:
        """Ask for the flow to be advanced, now or after ``countdown`` seconds.

        ``start`` marks a flow's first execution: a transport may run those after the
        resumes of flows already in progress.
        """
        ...

    def send_child(self, task_id: str, call: dict[str, Any], child: Any) -> None:
        """Start a ``run_task`` child; its outcome comes back through ``complete_task``."""
        ...

    def publish_signal(self, signal: PublishedSignal) -> None:
        """Hand a published signal to the ingress (or record it, where there is none)."""
        ...

    def start(self) -> None:
        """Start what serves requests in this process (embedded executors); else nothing."""
        ...

    def close(self) -> None:
        """Stop sending; release what the transport holds."""
        ...


@runtime_checkable
class BatchEnqueue(Protocol):
    """A transport (or dispatcher) that asks for many executions at once.

    Optional: a transport without it gets one ``enqueue`` per flow. The Celery
    transport publishes a batch over one producer and connection.
    """

    def enqueue_many(self, flow_name: str, flow_ids: Sequence[str], *, start: bool = False) -> None:
        """Ask for each flow of ``flow_ids`` (all of ``flow_name``) to be advanced now.

        May raise part way: the flows not sent yet stay due in the record.
        """
        ...


class Dispatcher(Protocol):
    """The part of a transport that requests executions (tests and benchmarks swap it)."""

    def enqueue(
        self, flow_name: str, flow_id: str, countdown: float | None = None, *, start: bool = False
    ) -> None:
        """Ask for the flow to be advanced."""
        ...

    def close(self) -> None:
        """Stop sending."""
        ...


class LocalWorker(Protocol):
    """What the embedded transport drives in this process (the app's runtime)."""

    def execute(self, flow_name: str, flow_id: Any) -> object:
        """Advance one flow."""
        ...

    def sweep(self) -> object:
        """Fire due timers, re-send stalled flows."""
        ...

    def complete_task(
        self, task_id: str, *, result: Any = None, error: BaseException | None = None
    ) -> bool:
        """Record a child's outcome and wake its flow."""
        ...

    def deliver_signal(self, flow_id: str, name: str, payload: Any, key: str) -> object:
        """Record a signal as the ingress would."""
        ...


class EmbeddedTransport:
    """The embedded default: executions, children and signals stay in this process.

    Executions run on a pool of threads, a sweeper thread stands in for beat, children
    run on threads of their own. Threads start on first use.
    """

    def __init__(self, worker: LocalWorker, threads: int, sweep_interval: float) -> None:
        self._worker = worker
        self._threads = threads
        self._sweep_interval = sweep_interval
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._stop = threading.Event()
        # Child task objects seen in this process: a child given by name cannot run here.
        self._children: dict[str, Any] = {}

    def start(self) -> None:
        """Start the executor threads and the sweeper (idempotent)."""
        with self._lock:
            if self._pool is not None or self._closed:
                return
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="crux-embedded")
            threading.Thread(
                target=self._sweep_loop, name="crux-embedded-sweeper", daemon=True
            ).start()

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self._sweep_interval):
            try:
                self._worker.sweep()
            except Exception:
                log.exception("embedded sweep failed")

    def _run(self, flow_name: str, flow_id: str) -> None:
        try:
            self._worker.execute(flow_name, flow_id)
        except Exception:
            log.exception("embedded execution of flow %s failed", flow_id)

    def enqueue(
        self, flow_name: str, flow_id: str, countdown: float | None = None, *, start: bool = False
    ) -> None:
        """Run the execution on the pool, now or after ``countdown`` seconds."""
        if self._closed:
            return
        if countdown and countdown > 0:
            timer = threading.Timer(countdown, self.enqueue, (flow_name, flow_id))
            timer.daemon = True
            timer.start()
            return
        self.start()
        pool = self._pool
        try:
            if pool is None:
                raise RuntimeError("closed")
            pool.submit(self._run, flow_name, flow_id)
        except RuntimeError:  # shut down meanwhile
            log.info("embedded pool closed; flow %s stays recorded", flow_id)

    def enqueue_many(self, flow_name: str, flow_ids: Sequence[str], *, start: bool = False) -> None:
        """Run each execution on the pool (no broker: nothing to batch)."""
        for flow_id in flow_ids:
            self.enqueue(flow_name, flow_id, start=start)

    def send_child(self, task_id: str, call: dict[str, Any], child: Any) -> None:
        """Run the child on a thread of this process (there is no broker)."""
        if child is not None:
            self._children[call["task"]] = child
        threading.Thread(
            target=self._run_child,
            args=(task_id, call),
            name=f"crux-child-{call['task']}",
            daemon=True,
        ).start()

    def _run_child(self, task_id: str, call: dict[str, Any]) -> None:
        fn = self._children.get(call["task"])
        if fn is None:
            self._worker.complete_task(
                task_id,
                error=TaskFailed(
                    f"task {call['task']!r} is not available in this process (the embedded "
                    "default runs children locally: pass the task object, not its name)",
                    task=call["task"],
                ),
            )
            return
        try:
            value = fn(*call["args"], **call["kwargs"])
        except Exception as exc:
            self._worker.complete_task(task_id, error=exc)
        else:
            self._worker.complete_task(task_id, result=value)

    def publish_signal(self, signal: PublishedSignal) -> None:
        """No broker, no ingress: record the signal directly."""
        self._worker.deliver_signal(signal.flow_id, signal.name, signal.payload, signal.key)

    def close(self) -> None:
        """Finish running executions, start no new ones."""
        self._closed = True
        self._stop.set()
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


class RecordOnlyTransport(EmbeddedTransport):
    """Requests no execution: the record says what is due, and a running fleet acts.

    For short-lived processes on the embedded default (the CLI): running a flow on a
    thread of a process about to exit would only leave it stalled for a while.
    """

    def enqueue(
        self, flow_name: str, flow_id: str, countdown: float | None = None, *, start: bool = False
    ) -> None:
        """Do nothing: the flow is marked due in the record already."""


class DispatchingTransport:
    """A transport whose executions go to ``dispatcher``; children and signals to ``base``."""

    def __init__(self, dispatcher: Dispatcher, base: Transport) -> None:
        self.dispatcher = dispatcher
        self.base = base

    def enqueue(
        self, flow_name: str, flow_id: str, countdown: float | None = None, *, start: bool = False
    ) -> None:
        """Hand the request to the dispatcher."""
        self.dispatcher.enqueue(flow_name, flow_id, countdown, start=start)

    def enqueue_many(self, flow_name: str, flow_ids: Sequence[str], *, start: bool = False) -> None:
        """Hand the requests to the dispatcher: as one batch if it takes batches."""
        if isinstance(self.dispatcher, BatchEnqueue):
            self.dispatcher.enqueue_many(flow_name, flow_ids, start=start)
            return
        for flow_id in flow_ids:
            self.dispatcher.enqueue(flow_name, flow_id, None, start=start)

    def send_child(self, task_id: str, call: dict[str, Any], child: Any) -> None:
        """Send the child as the base transport does."""
        self.base.send_child(task_id, call, child)

    def publish_signal(self, signal: PublishedSignal) -> None:
        """Publish as the base transport does."""
        self.base.publish_signal(signal)

    def start(self) -> None:
        """Start the base transport."""
        self.base.start()

    def close(self) -> None:
        """Close both."""
        self.dispatcher.close()
        self.base.close()
