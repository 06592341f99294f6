"""Redis (broker and step cache together) and Postgres lost and restarted mid-run."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import pytest

from crux_workers import StoreError
from tests.support.audit import audit, check_chain_results
from tests.support.fleet import FaultFleet
from tests.support.report import report

T = TypeVar("T")
FLOWS = 120
STEP_SECONDS = 0.2


def _retrying(fn: Callable[[], T], timeout: float = 60) -> T:
    """Call ``fn`` until the record answers (the caller's part while Postgres is down)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except StoreError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _start(fleet: FaultFleet) -> list[str]:
    fleet.worker(concurrency=4, ready=False)
    fleet.worker(concurrency=4, ready=False)
    for w in fleet.workers:
        w.wait_ready(timeout=60)
    fleet.beat()
    chain = fleet.flows["fault-chain"]
    return [
        chain.run(input={"steps": 3, "seconds": STEP_SECONDS, "wait": True}).flow_id
        for _ in range(FLOWS)
    ]


def _signal(fleet: FaultFleet, ids: list[str]) -> None:
    for flow_id in ids:
        # The key makes a retried call (its first try may have committed) a duplicate.
        _retrying(partial(fleet.app.signal_flow, flow_id, "go", {"flow": flow_id}, key="go"))


def test_redis_flushed_then_restarted_without_persistence_mid_run(
    fleet: FaultFleet, request: pytest.FixtureRequest
) -> None:
    ids = _start(fleet)
    expected = dict.fromkeys(ids, "completed")
    started = time.monotonic()
    time.sleep(1.0)
    in_flight_at_flush = fleet.in_flight(ids)
    fleet.redis.flushall()  # queue, unacked messages, bindings and step cache: all gone
    _signal(fleet, ids[: FLOWS // 3])
    time.sleep(1.5)
    in_flight_at_restart = fleet.in_flight(ids)
    fleet.redis.stop()
    down = time.monotonic()
    # Signals while the broker is down: recorded in Postgres, their wake-up message lost
    # (each publish retries for about half a second before signal_flow gives up on it).
    _signal(fleet, ids[FLOWS // 3 : FLOWS // 3 + 4])
    time.sleep(max(0.0, 1.0 - (time.monotonic() - down)))
    fleet.redis.start()  # same port, empty: no persistence
    up = time.monotonic()
    _signal(fleet, ids[FLOWS // 3 + 4 :])
    done = fleet.wait_all(expected, timeout=120)

    a = audit(fleet, expected)
    report(
        request,
        "redis flushed + restarted",
        flows=FLOWS,
        in_flight_at_flush=in_flight_at_flush,
        in_flight_at_restart=in_flight_at_restart,
        redis_down_s=f"{up - down:.1f}",
        recovery_s=f"{done - up:.1f}",
        total_s=f"{done - started:.1f}",
        **a.figures(),
    )
    a.assert_ok()
    assert in_flight_at_flush > 0 and in_flight_at_restart > 0
    assert a.committed_steps == 3 * FLOWS
    check_chain_results(fleet, ids)
    assert all(w.proc.poll() is None for w in fleet.workers)


def test_postgres_restarted_and_crashed_mid_run(
    fleet: FaultFleet, request: pytest.FixtureRequest
) -> None:
    ids = _start(fleet)
    expected = dict.fromkeys(ids, "completed")
    started = time.monotonic()
    time.sleep(1.0)
    in_flight_at_restart = fleet.in_flight(ids)
    t = time.monotonic()
    fleet.pg.restart()  # fast shutdown: every session is cut, then a clean start
    restart_s = time.monotonic() - t
    _signal(fleet, ids[: FLOWS // 2])
    time.sleep(1.5)
    in_flight_at_crash = fleet.in_flight(ids)
    fleet.pg.kill()  # SIGKILL of the postmaster: the next start runs crash recovery
    down = time.monotonic()
    time.sleep(1.0)
    fleet.pg.start()
    up = time.monotonic()
    _signal(fleet, ids[FLOWS // 2 :])
    done = fleet.wait_all(expected, timeout=120)

    a = audit(fleet, expected)
    report(
        request,
        "postgres restarted + crashed",
        flows=FLOWS,
        in_flight_at_restart=in_flight_at_restart,
        in_flight_at_crash=in_flight_at_crash,
        restart_s=f"{restart_s:.1f}",
        crash_down_s=f"{up - down:.1f}",
        recovery_s=f"{done - up:.1f}",
        total_s=f"{done - started:.1f}",
        **a.figures(),
    )
    # A sweep that found the record down fails (beat sends the next one a second later).
    a.assert_ok(allowed_task_errors=(r"crux\.sweep\[.*StoreError",))
    assert in_flight_at_restart > 0 and in_flight_at_crash > 0
    assert a.committed_steps == 3 * FLOWS
    check_chain_results(fleet, ids)
    assert all(w.proc.poll() is None for w in fleet.workers)
