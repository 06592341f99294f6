"""The process's flow loop: one long-lived asyncio event loop per process, on its own thread.

Async flow handlers and async step functions run here, whichever thread executes the
flow (a prefork child's main thread, a ``--pool threads`` worker thread, an embedded
executor thread): library clients bound to a loop (httpx, LLM SDKs) see one loop per
process, and no execution or step pays for creating one. A forked child gets its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger("crux_workers.flow")


class FlowLoop:
    """A lazily started event loop thread, restarted in a forked child."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0

    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop of this process (started on first use)."""
        if self._loop is None or self._pid != os.getpid():
            with self._lock:
                if self._loop is None or self._pid != os.getpid():
                    # After a fork the parent's loop thread does not exist here.
                    loop = asyncio.new_event_loop()
                    ready = threading.Event()
                    thread = threading.Thread(
                        target=_serve, args=(loop, ready), name="crux-flow-loop", daemon=True
                    )
                    thread.start()
                    ready.wait()
                    self._loop, self._thread, self._pid = loop, thread, os.getpid()
        return self._loop

    def on_loop_thread(self) -> bool:
        """Whether the caller runs on this process's flow loop."""
        return self._thread is threading.current_thread() and self._pid == os.getpid()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop, in a copy of the caller's context."""
        # run_coroutine_threadsafe creates the task inside a callback that runs in a copy
        # of the calling thread's context: current_step() is visible to the coroutine.
        return asyncio.run_coroutine_threadsafe(coro, self.loop())

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its result in the calling thread."""
        if self.on_loop_thread():
            coro.close()
            raise RuntimeError(
                "blocking on the flow loop from the flow loop itself: await it instead"
            )
        return self.submit(coro).result()


def _serve(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
    asyncio.set_event_loop(loop)
    loop.call_soon(ready.set)
    while True:
        try:
            loop.run_forever()
            return
        except BaseException:
            # A task raised SystemExit or KeyboardInterrupt: asyncio hands it to the task's
            # waiter and also out of run_forever. The loop serves every flow of the process,
            # so it keeps running.
            log.exception("a task on the flow loop raised a process-level exception")


flow_loop = FlowLoop()
