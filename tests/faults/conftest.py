"""Fault tests: their own Postgres and Redis (they kill and restart them), fleets, audits.

The session servers of tests/conftest.py are shared with every other test and are not
restarted when killed, so the fault tests never touch them: one Postgres cluster serves
this package (a fresh database per test, copied from a template holding the schema), and
each test gets its own Redis, started without persistence (``--save '' --appendonly no``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from crux_workers import Crux, FlowHandle, Settings
from tests.faults import flows as fault_flows
from tests.schema_hook import prepare_template
from tests.servers import (
    TMP_ROOT,
    PostgresServer,
    RedisServer,
    ServerError,
    _child_pids,
    _pid_alive,
    free_port,
)
from tests.workers import Beat, Worker, fleet_env

TEMPLATE_DB = "crux_fault_template"
TERMINAL = ("completed", "failed", "cancelled", "expired")
_db_numbers = itertools.count(1)


def _base_dir(prefix: str) -> Path:
    base = Path(tempfile.mkdtemp(prefix=prefix, dir=TMP_ROOT))
    base.chmod(0o755)  # as root, Postgres runs as the postgres user and must get in
    return base


@pytest.fixture(scope="package")
def fault_pg() -> Iterator[PostgresServer]:
    """A Postgres cluster for this package only: tests may restart or kill it."""
    base = _base_dir("crux-fault-pg-")
    server = PostgresServer(base / "pg", free_port())
    try:
        try:
            server.start()
        except (ServerError, OSError) as exc:
            pytest.fail(f"could not start the fault tests' Postgres: {exc}", pytrace=False)
        server.create_database(TEMPLATE_DB)
        prepare_template(server.url(TEMPLATE_DB))
        server.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            params=[TEMPLATE_DB],
        )
        yield server
    finally:
        try:
            server.stop()
        except ServerError:
            server.kill()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def fault_db(fault_pg: PostgresServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh database with the schema; the cluster is (re)started if a test left it down."""
    if fault_pg.postmaster_pid() is None:
        fault_pg.start()
    slug = re.sub(r"[^a-z0-9_]+", "_", request.node.name.lower()).strip("_")
    name = f"f{next(_db_numbers)}_{slug}"[:63]
    fault_pg.create_database(name, template=TEMPLATE_DB)
    yield name
    if fault_pg.postmaster_pid() is None:
        fault_pg.start()
    fault_pg.drop_database(name)


@pytest.fixture
def fault_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test only, without persistence: a restart loses everything."""
    server = RedisServer(tmp_path / "redis", free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fleet(
    fault_pg: PostgresServer, fault_db: str, fault_redis: RedisServer, tmp_path: Path
) -> Iterator[FaultFleet]:
    f = FaultFleet(fault_pg, fault_db, fault_redis, tmp_path)
    try:
        yield f
    finally:
        f.close()


# -- effects ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """One line of the effects file (see tests/faults/flows.py)."""

    kind: str
    flow_id: str
    name: str
    occurrence: int
    attempt: int
    pid: int
    t: float
    token: str


class Effects:
    """The effects file the fault flows write."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.touch()

    def events(self) -> list[Event]:
        out = []
        for line in self.path.read_text().splitlines():
            kind, flow_id, name, occ, attempt, pid, t, token = line.split("\t")
            out.append(
                Event(kind, flow_id, name, int(occ), int(attempt), int(pid), float(t), token)
            )
        return out

    def wait_for(self, pred: Callable[[Event], bool], timeout: float = 60) -> Event:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.events():
                if pred(ev):
                    return ev
            time.sleep(0.02)
        raise TimeoutError(f"no matching side effect within {timeout}s")


# -- the fleet ---------------------------------------------------------------------------


class FaultFleet:
    """A test's own database and Redis, its workers and beat, and an app in this process."""

    def __init__(self, pg: PostgresServer, db: str, redis: RedisServer, tmp: Path) -> None:
        self.pg, self.db, self.redis, self.tmp = pg, db, redis, tmp
        self.pg_url = pg.url(db)
        self.redis_url = redis.url(0)
        self.effects = Effects(tmp / "effects.tsv")
        self.env = fleet_env(self.pg_url, self.redis_url, self.effects.path)
        self.app = Crux(
            Settings(
                database_url=self.pg_url,
                redis_url=self.redis_url,
                lease_ttl=3,
                visibility_timeout=6,
                sweep_interval=1,
                redrive_after=2,
                broker_options={"unacked_restore_interval": 1, "unacked_restore_throttle": 1},
            )
        )
        self.flows: dict[str, FlowHandle[Any]] = {}
        for value in vars(fault_flows).values():
            if isinstance(value, FlowHandle):
                self.flows[value.name] = self.app.flow(value.name, input=value.input_model)(
                    value.fn
                )
        self.workers: list[Worker] = []
        self.beats: list[Beat] = []
        self.killed: set[int] = set()  # every pid this test SIGKILLed
        self.kills: Counter[str] = Counter()
        self._names = itertools.count(1)

    # processes

    def worker(
        self, name: str | None = None, *, concurrency: int = 2, ready: bool = True
    ) -> Worker:
        w = Worker(
            name or f"w{next(self._names)}",
            self.env,
            self.tmp,
            concurrency=concurrency,
            imports="tests.faults.flows",
        )
        self.workers.append(w)
        return w.wait_ready(timeout=60) if ready else w

    def beat(self) -> Beat:
        b = Beat(f"beat{len(self.beats) + 1}", self.env, self.tmp)
        self.beats.append(b)
        return b

    def alive_workers(self) -> list[Worker]:
        return [w for w in self.workers if w.proc.poll() is None]

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

    def close(self) -> None:
        for w in self.workers:
            with contextlib.suppress(Exception):
                # A test may leave a pool process stopped: let SIGKILL reach everything.
                os.killpg(w.proc.pid, signal.SIGCONT)
            w.kill()
        for b in self.beats:
            b.kill()
        self.app.close()

    # the record, read directly (tolerating a database that is restarting)

    def query(self, sql: str, params: Iterable[Any] = (), timeout: float = 60) -> list[Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.pg.dsn(self.db), connect_timeout=5) as conn:
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


# -- the audit ---------------------------------------------------------------------------


@dataclass
class Audit:
    """What the record and the effects say about a set of flows after a fault test."""

    flows: int = 0
    lost: list[str] = field(default_factory=list)  # missing, or not in their expected status
    committed_steps: int = 0
    step_calls: int = 0  # every recorded start of a step function
    interrupted: int = 0  # calls that never committed (crashed or refused), legitimately re-run
    rerun_after_commit: list[str] = field(default_factory=list)
    double_commits: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # committed result from no recorded call
    broken_history: list[str] = field(default_factory=list)  # checkpoints not 0..next_seq-1
    crashes: list[str] = field(default_factory=list)  # worker processes that died unasked
    task_errors: list[str] = field(default_factory=list)  # tasks that raised unexpectedly

    def assert_ok(self, *, allowed_task_errors: tuple[str, ...] = ()) -> None:
        """Assert every invariant; ``allowed_task_errors``: patterns a fault explains."""
        assert self.lost == [], f"flows lost or in the wrong status: {self.lost[:10]}"
        assert self.double_commits == [], f"double commits: {self.double_commits[:10]}"
        assert self.rerun_after_commit == [], (
            f"committed steps that ran again: {self.rerun_after_commit[:10]}"
        )
        assert self.unmatched == [], f"commits matching no recorded call: {self.unmatched[:10]}"
        assert self.broken_history == [], f"histories with holes: {self.broken_history[:10]}"
        assert self.crashes == [], f"worker crashes: {self.crashes[:10]}"
        unexplained = [
            e for e in self.task_errors if not any(re.search(p, e) for p in allowed_task_errors)
        ]
        assert unexplained == [], f"tasks that raised: {unexplained[:10]}"

    def figures(self) -> dict[str, int]:
        return {
            "lost": len(self.lost),
            "committed_steps": self.committed_steps,
            "step_calls": self.step_calls,
            "interrupted_reruns": self.interrupted,
            "reruns_after_commit": len(self.rerun_after_commit),
            "double_commits": len(self.double_commits),
            "crashes": len(self.crashes),
            "task_errors": len(self.task_errors),
        }


_EXIT = re.compile(r"pid:(\d+) exited with")


def audit(fleet: FaultFleet, expected: dict[str, str]) -> Audit:
    """Check the invariants over ``expected`` (flow id -> the status it must end in).

    - lost: a flow missing from the record or not in its expected status;
    - double commits: more than one ``crux_steps`` row per (flow, name, occurrence), read
      straight from Postgres;
    - re-run after commit: a step function that started after that step's commit time
      (attempts interrupted before their commit may run again, later ones may not);
    - unmatched: a committed result whose token no recorded call produced;
    - broken history: a flow whose checkpoints are not exactly seq 0 .. next_seq - 1;
    - crashes: a worker process, or a pool process, that died without the test killing it.
    """
    a = Audit(flows=len(expected))
    st = fleet.statuses()
    a.lost = [
        f"{i}: {st.get(i, 'MISSING')} (want {want})"
        for i, want in expected.items()
        if st.get(i) != want
    ]
    ids = list(expected)
    rows = fleet.query(
        "SELECT flow_id, name, occurrence, count(*), max(completed_at), max(result) "
        "FROM crux_steps WHERE flow_id = ANY(%s) AND kind = 'step' "
        "GROUP BY flow_id, name, occurrence",
        [ids],
    )
    starts: dict[tuple[str, str, int], list[Event]] = defaultdict(list)
    wanted = set(ids)
    for e in fleet.effects.events():
        if e.kind == "start" and e.flow_id in wanted:
            starts[(e.flow_id, e.name, e.occurrence)].append(e)
    committed = set()
    for flow_id, name, occ, count, completed_at, result in rows:
        key = (flow_id, name, occ)
        committed.add(key)
        a.committed_steps += 1
        if count != 1:
            a.double_commits.append(f"{key} committed {count} times")
        calls = starts.get(key, [])
        at = completed_at.timestamp()
        a.rerun_after_commit += [
            f"{key} committed at {at:.6f}, called again at {e.t:.6f} by pid {e.pid} "
            f"(attempt {e.attempt})"
            for e in calls
            if e.t > at
        ]
        if sum(1 for e in calls if e.token in result) != 1:
            a.unmatched.append(f"{key} result {result[:80]} not from exactly one recorded call")
    for flow_id, next_seq, count, first, last in fleet.query(
        "SELECT f.id, f.next_seq, count(s.seq), min(s.seq), max(s.seq) FROM crux_flows f "
        "LEFT JOIN crux_steps s ON s.flow_id = f.id WHERE f.id = ANY(%s) "
        "GROUP BY f.id, f.next_seq",
        [ids],
    ):
        if count != next_seq or (count and (first, last) != (0, next_seq - 1)):
            a.broken_history.append(
                f"{flow_id}: next_seq {next_seq}, seqs {first}..{last} ({count} rows)"
            )
    for key, calls in starts.items():
        a.step_calls += len(calls)
        a.interrupted += len(calls) - (1 if key in committed else 0)
    a.crashes = crashes(fleet)
    a.task_errors = task_errors(fleet)
    return a


def crashes(fleet: FaultFleet) -> list[str]:
    """Worker processes that died although the test did not kill them."""
    out = []
    for w in fleet.workers:
        code = w.proc.poll()
        if code is not None and w.proc.pid not in fleet.killed:
            out.append(f"worker {w.name} (pid {w.proc.pid}) exited with {code}")
        text = w.log.read_text(errors="replace") if w.log.exists() else ""
        for m in _EXIT.finditer(text):
            if int(m.group(1)) not in fleet.killed:
                line = text[text.rfind("\n", 0, m.start()) + 1 : text.find("\n", m.end())]
                out.append(f"{w.name}: {line.strip()}")
    return out


_FIGURES: list[str] = []


def task_errors(fleet: FaultFleet) -> list[str]:
    """Log lines of tasks that raised (a killed pool process's WorkerLostError excepted)."""
    out = []
    for w in fleet.workers:
        text = w.log.read_text(errors="replace") if w.log.exists() else ""
        for line in text.splitlines():
            if "raised unexpected" in line or (
                "Task handler raised error" in line and "WorkerLostError" not in line
            ):
                out.append(f"{w.name}: {line.strip()[:300]}")
    return out


def report(request: pytest.FixtureRequest, name: str, **figures: Any) -> str:
    """Print a one-line summary of a test's figures and attach them to the test report.

    The lines are also repeated in the terminal summary, so they show without ``-s``.
    """
    for key, value in figures.items():
        request.node.user_properties.append((key, value))
    line = f"[faults] {name}: " + " ".join(f"{k}={v}" for k, v in figures.items())
    print("\n" + line)
    _FIGURES.append(line)
    return line


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _FIGURES:
        terminalreporter.section("fault test figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)


def check_chain_results(fleet: FaultFleet, ids: list[str]) -> None:
    """Each fault-chain flow returned the committed results of its steps, in order.

    A replay returns stored values, so whatever ran twice, the outcome is the one record.
    """
    results = dict(fleet.query("SELECT id, result FROM crux_flows WHERE id = ANY(%s)", [ids]))
    steps: dict[str, list[str]] = defaultdict(list)
    for flow_id, result in fleet.query(
        "SELECT flow_id, result FROM crux_steps WHERE flow_id = ANY(%s) AND kind = 'step' "
        "ORDER BY flow_id, seq",
        [ids],
    ):
        steps[flow_id].append(json.loads(result))
    wrong = []
    for flow_id in ids:
        got = json.loads(results[flow_id])
        if got != {"tokens": steps[flow_id], "go": {"flow": flow_id}}:
            wrong.append(f"{flow_id}: {got} vs steps {steps[flow_id]}")
    assert wrong == [], wrong[:5]
