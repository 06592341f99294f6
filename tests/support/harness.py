"""The unit tier's harness: an app on the in-memory store and a fake clock, driven by hand."""

from __future__ import annotations

from collections import Counter

from crux_workers import Crux, Settings
from crux_workers._store._cache import MemoryStepCache
from crux_workers._store._memory import MemoryStore
from tests.support.clock import Clock


class QueueDispatcher:
    """Collects enqueued executions; the test drives them one by one."""

    def __init__(self) -> None:
        self.queue: list[tuple[str, str, float | None]] = []

    def enqueue(
        self, flow_name: str, flow_id: str, countdown: float | None = None, *, start: bool = False
    ) -> None:
        self.queue.append((flow_name, flow_id, countdown))

    def close(self) -> None:
        pass


class Harness:
    def __init__(self) -> None:
        self.clock = Clock()
        self.store = MemoryStore(clock=self.clock)
        self.cache = MemoryStepCache()
        self.dispatcher = QueueDispatcher()
        self.app = Crux(
            Settings(lease_ttl=10),
            store=self.store,
            cache=self.cache,
            dispatcher=self.dispatcher,
        )
        self.calls: Counter[str] = Counter()
        self.countdowns: list[float] = []

    def drain(self, limit: int = 100) -> int:
        """Run queued executions until none is left; returns how many ran.

        Delayed messages (countdowns) are dropped, as if the broker lost them: time
        only moves through ``tick``, and the sweeper must fire every timer.
        """
        ran = 0
        while self.dispatcher.queue:
            assert ran < limit, "executions keep re-enqueueing"
            name, flow_id, countdown = self.dispatcher.queue.pop(0)
            if countdown:
                self.countdowns.append(countdown)
                continue
            self.app.execute(name, flow_id)
            ran += 1
        return ran

    def tick(self, seconds: float) -> None:
        """Let time pass, run one sweep, run what it published."""
        self.clock.advance(seconds)
        self.app.sweep()
        self.drain()
