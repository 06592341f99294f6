"""Dispatchers: how "advance flow X" reaches an executor (Celery, or local threads)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

log = logging.getLogger("crux_workers.dispatch")


class Dispatcher(Protocol):
    """Sends "advance this flow" to some executor. A hint only: the record decides."""

    def enqueue(
        self, flow_name: str, flow_id: str, countdown: float | None = None, *, start: bool = False
    ) -> None:
        """Ask for the flow to be advanced, now or after ``countdown`` seconds.

        ``start`` marks a flow's first execution: a dispatcher may run those after the
        resumes of flows already in progress.
        """
        ...

    def close(self) -> None:
        """Stop sending."""
        ...


class ThreadDispatcher:
    """The embedded default: executions run on a pool of threads in this process."""

    def __init__(
        self,
        execute: Callable[[str, str], object],
        threads: int,
        *,
        sweep: Callable[[], object] | None = None,
        sweep_interval: float = 5.0,
    ) -> None:
        self._execute = execute
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="crux-embedded")
        self._closed = False
        self._stop = threading.Event()
        if sweep is not None:
            # The embedded stand-in for beat: timers and lost wake-ups need a sweeper too.
            threading.Thread(
                target=self._sweep_loop,
                args=(sweep, sweep_interval),
                name="crux-embedded-sweeper",
                daemon=True,
            ).start()

    def _sweep_loop(self, sweep: Callable[[], object], interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                sweep()
            except Exception:
                log.exception("embedded sweep failed")

    def _run(self, flow_name: str, flow_id: str) -> None:
        try:
            self._execute(flow_name, flow_id)
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
        try:
            self._pool.submit(self._run, flow_name, flow_id)
        except RuntimeError:  # shut down meanwhile
            log.info("embedded pool closed; flow %s stays recorded", flow_id)

    def close(self) -> None:
        """Finish running executions, start no new ones."""
        self._closed = True
        self._stop.set()
        self._pool.shutdown(wait=True)


class CeleryDispatcher:
    """Publishes the flow's Celery task (JSON, routed like any task)."""

    def __init__(self, send: Callable[[str, str, float | None, bool], None]) -> None:
        self._send = send

    def enqueue(
        self, flow_name: str, flow_id: str, countdown: float | None = None, *, start: bool = False
    ) -> None:
        """Publish the task; with ``countdown`` for short delays only (see docs/time.md).

        Starts go out at a lower priority than resumes, so a signal's resume does not
        wait behind a burst of new flows.
        """
        self._send(flow_name, flow_id, countdown, start)

    def close(self) -> None:
        """Nothing to release: Celery owns the producer pool."""


class RecordOnlyDispatcher:
    """Requests nothing: the record says what is due, and a running fleet's sweeper acts.

    For short-lived processes on the embedded default (the CLI): running a flow on a
    thread of a process about to exit would only leave it stalled for a while.
    """

    def enqueue(
        self, flow_name: str, flow_id: str, countdown: float | None = None, *, start: bool = False
    ) -> None:
        """Do nothing: the flow is marked due in the record already."""

    def close(self) -> None:
        """Nothing to release."""
