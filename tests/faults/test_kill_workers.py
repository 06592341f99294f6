"""Workers killed with SIGKILL, again and again, while hundreds of flows are in flight."""

from __future__ import annotations

import random
import time

import pytest

from tests.support.audit import audit, check_chain_results
from tests.support.fleet import FaultFleet
from tests.support.report import report

FLOWS = 240
KILLS = 8  # alternately a whole worker (then replaced) and one pool process
SIGNALLED_DURING_KILLS = 32  # the others get their signal once the killing stops
STEP_SECONDS = 0.25


def test_kill_9_workers_repeatedly_with_200_flows_in_flight(
    fleet: FaultFleet, request: pytest.FixtureRequest
) -> None:
    rng = random.Random(6)
    for _ in range(3):
        fleet.worker(concurrency=4, ready=False)
    for w in fleet.workers:
        w.wait_ready(timeout=60)
    fleet.beat()
    chain = fleet.flows["fault-chain"]
    runs = [
        chain.run(input={"steps": 4, "seconds": STEP_SECONDS, "wait": True}) for _ in range(FLOWS)
    ]
    ids = [r.flow_id for r in runs]
    expected = dict.fromkeys(ids, "completed")
    signalled = 0

    def signal_next(n: int) -> None:
        nonlocal signalled
        for flow_id in ids[signalled : signalled + n]:
            fleet.app.signal_flow(flow_id, "go", {"flow": flow_id}, key="go")
        signalled = min(len(ids), signalled + n)

    in_flight_at_kills: list[int] = []
    started = time.monotonic()
    for k in range(KILLS):
        signal_next(SIGNALLED_DURING_KILLS // KILLS)
        time.sleep(1.0 + rng.random())
        in_flight_at_kills.append(fleet.in_flight(ids))
        busy = fleet.pick_busy(STEP_SECONDS * 0.8, rng)
        if k % 2 == 0:
            owner = fleet.owner_of(busy) if busy else None
            victim = owner or rng.choice(fleet.alive_workers())
            fleet.kill_group(victim)
            fleet.worker(concurrency=4, ready=False)  # the replacement
        else:
            if busy is None:
                busy = rng.choice([p for w in fleet.alive_workers() for p in fleet.children(w)])
            fleet.kill_child(busy)
    last_kill = time.monotonic()
    signal_next(len(ids))
    done = fleet.wait_all(expected, timeout=180)

    a = audit(fleet, expected)
    report(
        request,
        "kill -9 workers",
        flows=FLOWS,
        min_in_flight_at_kill=min(in_flight_at_kills),
        group_kills=fleet.kills["group"],
        child_kills=fleet.kills["child"],
        workers_started=len(fleet.workers),
        recovery_s=f"{done - last_kill:.1f}",
        total_s=f"{done - started:.1f}",
        **a.figures(),
    )
    a.assert_ok()
    check_chain_results(fleet, ids)
    assert min(in_flight_at_kills) >= 200, in_flight_at_kills
    assert fleet.kills["group"] + fleet.kills["child"] == KILLS
    assert a.committed_steps == 4 * FLOWS
    # The kills hit steps in progress: those calls never committed and ran again.
    assert a.interrupted >= 1
