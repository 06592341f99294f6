"""The record's side of the trust boundary (issue 11), on real Postgres, Redis and workers.

- forged child outcomes (defect 1): a broker client that knows a flow id sends
  ``crux.task_done`` / ``crux.task_failed`` for it; nothing changes, the real outcome works;
- data errors (defect 5): a write the record refuses fails the flow once, not forever;
- crash loops (defect 5): a step that kills its worker every time parks the flow ``failed``;
- a tampered step cache (defect 7): the record's value wins, and the mismatch is logged;
- retention (defect 9): ``flows purge`` also deletes old refused ingress messages.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import redis
from celery import Celery
from pydantic import BaseModel

from crux_workers import Crux, FlowContext, FlowHandle, Settings
from crux_workers._store._cache import MemoryStepCache
from crux_workers._store._sql import SqlStore
from tests.faults import trust_flows
from tests.faults.conftest import FaultFleet
from tests.servers import PostgresServer, RedisServer
from tests.workers import REPO, Worker


class Empty(BaseModel):
    pass


# -- real workers --------------------------------------------------------------------


def _trust_worker(fleet: FaultFleet, name: str, **env: str) -> Worker:
    """A worker that imports the trust flows (and the fault flows, to serve other work)."""
    w = Worker(
        name,
        {**fleet.env, **env},
        fleet.tmp,
        concurrency=2,
        imports="tests.faults.trust_flows",
        extra=("--import", "tests.faults.flows"),
    )
    fleet.workers.append(w)
    return w.wait_ready(timeout=60)


def _handles(fleet: FaultFleet) -> dict[str, FlowHandle[Any]]:
    handles: dict[str, FlowHandle[Any]] = {}
    for value in vars(trust_flows).values():
        if isinstance(value, FlowHandle):
            handles[value.name] = fleet.app.flow(value.name, input=value.input_model)(value.fn)
    return handles


def _until(what: str, check: Any, timeout: float, fleet: FaultFleet) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout}s\n{fleet.logs_tail()}")


def test_forged_child_outcomes_from_a_broker_client_change_nothing(fleet: FaultFleet) -> None:
    worker = _trust_worker(fleet, "trusty")
    handles = _handles(fleet)
    run = handles["trust-child"].run(input={})
    flow_id = run.flow_id

    def sent() -> Any:
        rows = fleet.query(
            "SELECT t.task_id, f.status, f.wake_kind FROM crux_tasks t "
            "JOIN crux_flows f ON f.id = t.flow_id WHERE t.flow_id = %s",
            [flow_id],
        )
        return rows[0] if rows and rows[0][1] == "suspended" else None

    recorded_id, _, _ = _until("the child sent", sent, 60, fleet)

    # The attack: a plain Celery client on the same broker, knowing only the flow id.
    mallory = Celery(broker=fleet.redis_url)
    try:
        guessed = f"crux:{flow_id}:0:1"
        mallory.send_task(
            "crux.task_done", args=[{"approved_by": "mallory"}, guessed], queue="crux"
        )
        mallory.send_task("crux.task_failed", args=[guessed], queue="crux")
        mallory.send_task(
            "crux.task_done",
            args=[{"approved_by": "mallory"}, f"{guessed}:{'0' * 32}"],
            queue="crux",
        )
    finally:
        mallory.close()

    def refused_or_changed() -> bool:
        status = fleet.statuses()[flow_id]
        refusals = worker.log.read_text(errors="replace").count("refused a child task outcome")
        return status != "suspended" or refusals >= 3

    _until("the forged outcomes handled", refused_or_changed, 60, fleet)
    time.sleep(1)  # anything they might have woken has had time to run
    state = run.state()
    assert (state.status, state.wake_kind, state.steps) == ("suspended", "task", []), state
    # The id that was sent carries its secret, and nothing logs it.
    token = recorded_id.rsplit(":", 1)[1]
    assert recorded_id == f"crux:{flow_id}:0:1:{token}" and len(token) == 32
    task_status, result, error = fleet.query(
        "SELECT status, result, error FROM crux_tasks WHERE flow_id = %s", [flow_id]
    )[0]
    assert (task_status, result, error) == ("pending", None, None)
    log = worker.log.read_text(errors="replace")
    refusals = [line for line in log.splitlines() if "refused a child task outcome" in line]
    assert len(refusals) == 3 and all(flow_id in line for line in refusals), refusals
    assert "WARNING" in refusals[0]
    assert token not in log, "the task id's secret must never be logged"

    # The real outcome, under the id that was sent, completes the flow.
    assert fleet.app.complete_task(recorded_id, result={"approved_by": "alice"})
    outcome = run.wait(timeout=60)
    assert outcome.status == "completed"
    assert outcome.result == {"approval": {"approved_by": "alice"}}


def test_a_crash_loop_is_parked_failed_and_the_workers_keep_serving(fleet: FaultFleet) -> None:
    # Three lapses in a row park a flow. The step's side effect runs once per execution
    # that died: the first claim (no lapse) and the claims taking lapses 1 and 2; the
    # claim that would take lapse 3 parks the flow instead of running it: exactly 3.
    _trust_worker(fleet, "crashy", CRUX_MAX_LAPSES="3")
    _trust_worker(fleet, "steady", CRUX_MAX_LAPSES="3")
    fleet.beat()
    handles = _handles(fleet)
    run = handles["trust-crash"].run(input={})
    outcome = run.wait(timeout=120)
    assert outcome.status == "failed", outcome
    assert outcome.error is not None
    assert outcome.error.type == "crux_workers.errors.CrashLoop"
    assert "parked after 3 executions died without progress" in outcome.error.message
    calls = [e for e in fleet.effects.events() if e.flow_id == run.flow_id and e.name == "boom"]
    assert len(calls) == 3, calls
    assert len({e.pid for e in calls}) == 3, "each execution died with its process"
    (runs, lapses) = fleet.query(
        "SELECT runs, lapses FROM crux_flows WHERE id = %s", [run.flow_id]
    )[0]
    assert runs == 4 and lapses == 0

    # The same workers go on serving other flows.
    others = [fleet.flows["fault-chain"].run(input={"steps": 2, "seconds": 0}) for _ in range(3)]
    for other in others:
        assert other.wait(timeout=60).status == "completed"


# -- in this process, with a queue in place of the broker ----------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


class Queue:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, float | None]] = []

    def enqueue(
        self, flow_name: str, flow_id: str, countdown: float | None = None, *, start: bool = False
    ) -> None:
        self.sent.append((flow_name, flow_id, countdown))

    def close(self) -> None:
        pass


class Rig:
    """An app on the fault cluster whose executions run only when the test says so."""

    def __init__(self, url: str, *, redis_url: str | None = None, max_lapses: int = 5) -> None:
        self.clock = Clock()
        self.store = SqlStore(url, clock=self.clock)
        self.queue = Queue()
        self.app = Crux(
            Settings(database_url=url, redis_url=redis_url, lease_ttl=5, max_lapses=max_lapses),
            store=self.store,
            cache=None if redis_url else MemoryStepCache(),
            dispatcher=self.queue,
        )
        self.effects: Counter[str] = Counter()

    def drain(self, limit: int = 50) -> int:
        """Run what was asked for, delayed requests included; returns how many ran."""
        ran = 0
        while self.queue.sent and ran < limit:
            name, flow_id, countdown = self.queue.sent.pop(0)
            if countdown:
                self.clock.now += timedelta(seconds=countdown)
            self.app.execute(name, flow_id)
            ran += 1
        return ran


@pytest.fixture
def pg(fault_pg: PostgresServer, fault_db: str) -> str:
    return fault_pg.url(fault_db)


def _sql(fault_pg: PostgresServer, fault_db: str, statement: str) -> None:
    with psycopg.connect(fault_pg.dsn(fault_db), autocommit=True) as conn:
        conn.execute(statement)


@pytest.fixture
def rig(pg: str) -> Iterator[Rig]:
    r = Rig(pg, max_lapses=3)
    try:
        yield r
    finally:
        r.app.close()


def test_a_value_the_record_refuses_fails_the_flow_once(
    rig: Rig, fault_pg: PostgresServer, fault_db: str
) -> None:
    # A check Postgres enforces and Python does not know about: the step commit is a
    # data error (a CheckViolation), which no retry can cure.
    _sql(
        fault_pg,
        fault_db,
        "ALTER TABLE crux_steps ADD CONSTRAINT no_poison CHECK (result NOT LIKE '%poison%')",
    )

    @rig.app.flow("poisoned", input=Empty)
    def poisoned(f: FlowContext[Empty]) -> Any:
        def fetch() -> str:
            rig.effects["fetch"] += 1
            return "poison"

        return f.step("fetch", fetch)

    run = poisoned.run(input={})
    ran = rig.drain()
    state = run.state()
    assert ran == 1, f"{ran} executions: a data error was retried as if the record were down"
    assert rig.effects["fetch"] == 1
    assert state.status == "failed" and state.steps == []
    assert state.error is not None and state.error.type == "crux_workers.errors.RecordRefused"
    assert "no_poison" in state.error.message


def test_when_even_the_failure_is_refused_the_crash_loop_rule_parks_the_flow(
    rig: Rig, fault_pg: PostgresServer, fault_db: str
) -> None:
    _sql(
        fault_pg,
        fault_db,
        "ALTER TABLE crux_steps ADD CONSTRAINT no_poison CHECK (result NOT LIKE '%poison%');"
        "ALTER TABLE crux_flows ADD CONSTRAINT no_poison_error "
        "CHECK (error IS NULL OR error NOT LIKE '%no_poison%')",
    )

    @rig.app.flow("poisoned-twice", input=Empty)
    def poisoned(f: FlowContext[Empty]) -> Any:
        def fetch() -> str:
            rig.effects["fetch"] += 1
            return "poison"

        return f.step("fetch", fetch)

    run = poisoned.run(input={})
    ran = rig.drain()
    state = run.state()
    assert state.status == "failed", (state.status, ran)
    assert state.error is not None and state.error.type == "crux_workers.errors.CrashLoop"
    assert rig.effects["fetch"] == 3 and ran < 50


def test_a_tampered_step_cache_is_a_miss_and_the_record_decides(
    pg: str, fault_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    rig = Rig(pg, redis_url=fault_redis.url(0))
    try:
        seen: list[Any] = []

        @rig.app.flow("pay-then-ship", input=Empty)
        def pay_then_ship(f: FlowContext[Empty]) -> Any:
            paid = f.step("paid", lambda: False)
            f.suspend("go")
            seen.append(paid)
            return f.step("ship", lambda: "shipped" if paid else "held")

        run = pay_then_ship.run(input={})
        rig.drain()
        assert run.state().status == "suspended"
        client = redis.Redis.from_url(fault_redis.url(0))
        key = f"crux:steps:{{{run.flow_id}}}"
        cached = client.hget(key, "0")
        assert cached == b'["step", "paid", 0]\nfalse', cached
        # The attack: one HSET into the cache Redis.
        client.hset(key, "0", '["step", "paid", 0]\ntrue')
        client.close()

        with caplog.at_level(logging.WARNING, logger="crux_workers"):
            rig.app.signal_flow(run.flow_id, "go", {})
            rig.drain()
        outcome = run.outcome()
        assert outcome is not None and outcome.status == "completed"
        assert seen == [False], "the flow acted on the tampered cache"
        assert outcome.result == "held"
        assert any("do not match the record" in r.getMessage() for r in caplog.records)
        # The cache was refilled from the record.
        refill = redis.Redis.from_url(fault_redis.url(0))
        try:
            assert refill.hget(key, "0") in (None, b'["step", "paid", 0]\nfalse')
        finally:
            refill.close()
    finally:
        rig.app.close()


def test_purge_also_deletes_refused_messages_older_than_the_cutoff(
    pg: str, fault_pg: PostgresServer, fault_db: str
) -> None:
    store = SqlStore(pg)
    try:
        old = store.record_rejected("bad_json", "Expecting value", "{" * 10)
        new = store.record_rejected("bad_json", "Expecting value", "[" * 10)
    finally:
        store.close()
    _sql(
        fault_pg,
        fault_db,
        f"UPDATE crux_rejected_signals SET received_at = now() - interval '40 days' "
        f"WHERE id = {old}",
    )
    env = {"CRUX_DATABASE_URL": pg, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "crux_workers", "flows", "purge", "--finished-before", "30d"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "purged 1 refused message(s)" in done.stdout, done.stdout
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "crux_workers",
            "flows",
            "purge",
            "--finished-before",
            "30d",
            "--json",
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(again.stdout)["purged_rejected"] == 0, again.stdout
    store = SqlStore(pg)
    try:
        assert [r.id for r in store.list_rejected()] == [new]
    finally:
        store.close()
