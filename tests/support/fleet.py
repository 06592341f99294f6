"""The one fleet: a test's database and Redis, its worker and beat processes, and an app.

``FleetBase`` is the implementation; the tiers configure it:

- ``Fleet`` (integration): the flows of tests/integration/flows.py, one-process workers;
- ``FaultFleet`` (faults): the flows of tests/faults/flows.py, two-process workers, its
  own Postgres cluster and Redis (which the test may kill), and the means to kill workers
  and their pool processes.

The record is read straight from Postgres, tolerating a database that is restarting.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import psycopg

from crux_workers import Crux, FlowHandle, Settings
from tests.servers import PostgresServer, RedisServer, _child_pids, _pid_alive
from tests.support.effects import Effects, EventEffects, StepEffects
from tests.workers import Beat, Service, Worker, fleet_env

TERMINAL = ("completed", "failed", "cancelled", "expired")

E = TypeVar("E", bound=Effects[Any])


class FleetBase(Generic[E]):
    """A test's database and Redis, its workers and beats, and an app in the test process."""

    flows_module: ClassVar[str]  # registered on the app, imported by the workers
    concurrency: ClassVar[int]  # pool processes of a worker, unless the test says otherwise
    ready_timeout: ClassVar[float]
    broker_options: ClassVar[dict[str, Any] | None] = None  # of the app in the test process

    def __init__(self, pg_url: str, redis_url: str, tmp: Path, effects: E) -> None:
        self.pg_url, self.redis_url, self.tmp = pg_url, redis_url, tmp
        self.dsn = pg_url.replace("postgresql+psycopg://", "postgresql://", 1)
        self.effects = effects
        self.env = fleet_env(pg_url, redis_url, effects.path)
        options: dict[str, Any] = {}
        if self.broker_options is not None:
            options["broker_options"] = self.broker_options
        self.app = Crux(
            Settings(
                database_url=pg_url,
                redis_url=redis_url,
                lease_ttl=3,
                visibility_timeout=6,
                sweep_interval=1,
                redrive_after=2,
                **options,
            )
        )
        self.flows: dict[str, FlowHandle[Any]] = {}
        for value in vars(importlib.import_module(self.flows_module)).values():
            if isinstance(value, FlowHandle):
                self.flows[value.name] = self.app.flow(value.name, input=value.input_model)(
                    value.fn
                )
        self.workers: list[Worker] = []
        self.beats: list[Beat] = []
        self.services: list[Service] = []  # other commands (ingress, metrics): killed at close
        self._names = itertools.count(1)

    # processes

    def worker(self, name: str | None = None, *, ready: bool = True, **options: Any) -> Worker:
        """Start a worker (``options`` go to ``Worker``); wait until it is ready unless told."""
        options.setdefault("concurrency", self.concurrency)
        options.setdefault("imports", self.flows_module)
        w = Worker(name or f"w{next(self._names)}", self.env, self.tmp, **options)
        self.workers.append(w)
        return w.wait_ready(timeout=self.ready_timeout) if ready else w

    def beat(self, name: str | None = None) -> Beat:
        b = Beat(name or f"beat{len(self.beats) + 1}", self.env, self.tmp)
        self.beats.append(b)
        return b

    def service(self, name: str, *args: str, env: dict[str, str] | None = None) -> Service:
        """Start ``crux-workers <args>`` in the fleet's environment; killed at ``close``."""
        s = Service(name, {**self.env, **(env or {})}, self.tmp, *args)
        self.services.append(s)
        return s

    def alive_workers(self) -> list[Worker]:
        return [w for w in self.workers if w.proc.poll() is None]

    def close(self) -> None:
        for w in self.workers:
            with contextlib.suppress(Exception):
                # A test may leave a pool process stopped: let SIGKILL reach everything.
                os.killpg(w.proc.pid, signal.SIGCONT)
            w.kill()
        for b in self.beats:
            b.kill()
        for s in self.services:
            s.kill()
        self.app.close()

    # the record, read directly (tolerating a database that is restarting)

    def query(self, sql: str, params: Iterable[Any] = (), timeout: float = 60) -> list[Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.dsn, connect_timeout=5) as conn:
                    return conn.execute(sql, list(params) or None).fetchall()
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def statuses(self) -> dict[str, str]:
        return dict(self.query("SELECT id, status FROM crux_flows"))

    def in_flight(self, ids: Iterable[str]) -> int:
        st = self.statuses()
        return sum(1 for i in ids if st.get(i) not in TERMINAL)

    def wait_all(self, expected: dict[str, str], timeout: float) -> float:
        """Wait until every flow is terminal; returns when that happened (monotonic)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.statuses()
            pending = [i for i in expected if st.get(i) not in TERMINAL]
            if not pending:
                return time.monotonic()
            if time.monotonic() > deadline:
                sample = {i: st.get(i, "MISSING") for i in pending[:10]}
                raise AssertionError(
                    f"{len(pending)} of {len(expected)} flows not finished after {timeout}s: "
                    f"{sample}\n{self.logs_tail()}"
                )
            time.sleep(0.25)

    def logs_tail(self, lines: int = 25) -> str:
        parts = []
        procs: list[Worker | Beat] = [*self.workers, *self.beats]
        for proc in procs:
            text = proc.log.read_text(errors="replace") if proc.log.exists() else ""
            tail = "\n".join(text.splitlines()[-lines:])
            parts.append(f"--- {proc.name} ---\n{tail}")
        return "\n".join(parts)


class Fleet(FleetBase[StepEffects]):
    """The integration fleet, on the session's Postgres and Redis."""

    flows_module = "tests.integration.flows"
    concurrency = 1
    ready_timeout = 30.0

    def __init__(self, pg_url: str, redis_url: str, tmp: Path) -> None:
        super().__init__(pg_url, redis_url, tmp, StepEffects(tmp / "effects.txt"))


class FaultFleet(FleetBase[EventEffects]):
    """The fault fleet: its own database and Redis, and the means to kill its processes."""

    flows_module = "tests.faults.flows"
    concurrency = 2
    ready_timeout = 60.0
    broker_options = {"unacked_restore_interval": 1, "unacked_restore_throttle": 1}

    def __init__(self, pg: PostgresServer, db: str, redis: RedisServer, tmp: Path) -> None:
        self.pg, self.db, self.redis = pg, db, redis
        super().__init__(pg.url(db), redis.url(0), tmp, EventEffects(tmp / "effects.tsv"))
        self.killed: set[int] = set()  # every pid this test SIGKILLed
        self.kills: Counter[str] = Counter()

    @staticmethod
    def children(w: Worker) -> list[int]:
        """The pool processes of a worker (the prefork children of its main process)."""
        return [p for p in _child_pids(w.proc.pid) if _pid_alive(p)]

    def owner_of(self, pid: int) -> Worker | None:
        for w in self.alive_workers():
            if pid == w.proc.pid or pid in self.children(w):
                return w
        return None

    def kill_group(self, w: Worker) -> list[int]:
        """kill -9 a worker's whole process group (main process and pool)."""
        pids = [w.proc.pid, *self.children(w)]
        self.killed.update(pids)
        w.kill(signal.SIGKILL)
        self.kills["group"] += 1
        return pids

    def kill_child(self, pid: int) -> None:
        """kill -9 one pool process; its worker forks a replacement."""
        self.killed.add(pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self.kills["child"] += 1

    def busy_pids(self, within: float) -> list[int]:
        """Pids that started a step less than ``within`` seconds ago (still inside it)."""
        now = time.time()
        return sorted(
            {
                e.pid
                for e in self.effects.events()
                if e.kind == "start" and now - e.t < within and e.pid not in self.killed
            }
        )

    def pick_busy(self, within: float, rng: random.Random) -> int | None:
        live = {p for w in self.alive_workers() for p in self.children(w)}
        busy = [p for p in self.busy_pids(within) if p in live]
        return rng.choice(busy) if busy else None
