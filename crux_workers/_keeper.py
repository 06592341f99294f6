"""One thread per process that looks after running steps: lease renewals, cancel checks."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger("crux_workers.flow")

_TICK = 0.25


class Watched(Protocol):
    """An execution whose step is running."""

    def renew(self) -> None:
        """Extend the lease (remembering if it was lost)."""
        ...

    def check_cancel(self) -> None:
        """Look for a cancel request in the record, and tell the running step."""
        ...


@dataclass(slots=True)
class _Watch:
    execution: Watched
    renew_every: float
    cancel_every: float | None
    next_renew: float
    next_cancel: float


class Keeper:
    """Renews the leases of running steps and watches for cancel requests meanwhile."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: dict[int, _Watch] = {}
        self._pid = 0

    def _ensure_thread(self) -> None:
        # Started lazily, and again in a forked child, where the parent's thread is gone.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            threading.Thread(target=self._run, name="crux-step-keeper", daemon=True).start()

    @contextmanager
    def watch(
        self, execution: Watched, renew_every: float, cancel_every: float | None
    ) -> Iterator[None]:
        """Look after ``execution`` for as long as the block runs."""
        now = time.monotonic()
        watch = _Watch(
            execution,
            renew_every,
            cancel_every,
            now + renew_every,
            now + (cancel_every or 0.0),
        )
        key = id(watch)
        with self._lock:
            self._ensure_thread()
            self._watched[key] = watch
        try:
            yield
        finally:
            with self._lock:
                self._watched.pop(key, None)

    def _run(self) -> None:
        while True:
            time.sleep(_TICK)
            now = time.monotonic()
            with self._lock:
                watched = list(self._watched.values())
            for w in watched:
                try:
                    if w.next_renew <= now:
                        w.next_renew = now + w.renew_every
                        w.execution.renew()
                    if w.cancel_every is not None and w.next_cancel <= now:
                        w.next_cancel = now + w.cancel_every
                        w.execution.check_cancel()
                except Exception:  # this thread serves every running step of the process
                    log.exception("the step keeper could not look after an execution")


keeper = Keeper()
