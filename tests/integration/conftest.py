from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from crux_workers import Crux, FlowHandle, Settings
from tests.integration import flows as test_flows
from tests.workers import Beat, Effects, Worker, fleet_env


class Fleet:
    """A test's database and Redis, its workers, and an app in the test process."""

    def __init__(self, pg_url: str, redis_url: str, tmp: Path) -> None:
        self.pg_url, self.redis_url, self.tmp = pg_url, redis_url, tmp
        self.effects = Effects(tmp / "effects.txt")
        self.env = fleet_env(pg_url, redis_url, self.effects.path)
        self.app = Crux(
            Settings(
                database_url=pg_url,
                redis_url=redis_url,
                lease_ttl=3,
                visibility_timeout=6,
                sweep_interval=1,
                redrive_after=2,
            )
        )
        self.flows: dict[str, FlowHandle[Any]] = {}
        for value in vars(test_flows).values():
            if isinstance(value, FlowHandle):
                self.flows[value.name] = self.app.flow(value.name, input=value.input_model)(
                    value.fn
                )
        self.workers: list[Worker] = []
        self.beats: list[Beat] = []

    def beat(self, name: str = "beat") -> Beat:
        b = Beat(name, self.env, self.tmp)
        self.beats.append(b)
        return b

    def worker(self, name: str, **kwargs: Any) -> Worker:
        w = Worker(name, self.env, self.tmp, **kwargs)
        self.workers.append(w)
        return w.wait_ready()

    def close(self) -> None:
        for w in self.workers:
            w.kill()
        for b in self.beats:
            b.kill()
        self.app.close()


@pytest.fixture
def fleet(pg_url: str, redis_url: str, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(pg_url, redis_url, tmp_path)
    try:
        yield f
    finally:
        f.close()
