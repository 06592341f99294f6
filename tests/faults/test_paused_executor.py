"""An executor paused (SIGSTOP) past its lease while another takes over, then resumed."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest

from tests.support.audit import audit
from tests.support.effects import Event
from tests.support.fleet import FaultFleet
from tests.support.report import report


def _snapshot(fleet: FaultFleet, flow_id: str) -> tuple[Any, ...]:
    flow = fleet.query(
        "SELECT status, result, epoch, next_seq, lease_owner FROM crux_flows WHERE id = %s",
        [flow_id],
    )
    steps = fleet.query(
        "SELECT seq, name, occurrence, result, epoch, completed_at FROM crux_steps "
        "WHERE flow_id = %s ORDER BY seq",
        [flow_id],
    )
    return tuple(flow), tuple(steps)


def _pause_resume(
    fleet: FaultFleet, flow_id: str, paused_at: Event
) -> tuple[tuple[Any, ...], tuple[Any, ...], dict[str, float]]:
    """SIGSTOP the pool process at ``paused_at`` until another executor finished the flow.

    Returns the record before and after the SIGCONT, and timings.
    """
    pid = paused_at.pid
    owner = fleet.owner_of(pid)
    assert owner is not None
    os.kill(pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        fleet.wait_all({flow_id: "completed"}, timeout=60)
        finished = time.monotonic()
        before = _snapshot(fleet, flow_id)
    finally:
        os.kill(pid, signal.SIGCONT)
    resumed = time.monotonic()
    # The resumed execution notices it lost the flow when it tries to write.
    marker = f"flow {flow_id}: "
    deadline = time.monotonic() + 30
    while True:
        text = owner.log.read_text(errors="replace")
        if any(marker in line and "stops without writing" in line for line in text.splitlines()):
            break
        assert time.monotonic() < deadline, f"no lease-lost line from {owner.name}:\n{owner.tail()}"
        time.sleep(0.05)
    refused = time.monotonic()
    time.sleep(0.5)  # anything it would still write would land now
    after = _snapshot(fleet, flow_id)
    return (
        before,
        after,
        {
            "paused_s": round(resumed - stopped, 1),
            "takeover_done_s": round(finished - stopped, 1),
            "refused_after_resume_s": round(refused - resumed, 2),
        },
    )


def test_paused_executor_mid_step_is_fenced_after_resume(
    fleet: FaultFleet, request: pytest.FixtureRequest
) -> None:
    fleet.worker(concurrency=1)
    fleet.worker(concurrency=1)
    fleet.beat()
    run = fleet.flows["fault-pausable"].run(input={"long": 3.0})
    first = fleet.effects.wait_for(lambda e: e.name == "long" and e.flow_id == run.flow_id)
    before, after, timings = _pause_resume(fleet, run.flow_id, first)

    assert before == after, "the resumed executor changed the record"
    (flow,), steps = after
    assert flow[0] == "completed"
    long_row = next(s for s in steps if s[1] == "long")
    # The step the paused executor was inside was committed by its successor.
    assert str(first.pid) not in long_row[3]
    assert long_row[4] == flow[2], "the commit is not from the last epoch"
    late = [e for e in fleet.effects.events() if e.pid == first.pid and e.name == "last"]
    assert late == [], "the resumed executor went on to the next step"
    a = audit(fleet, {run.flow_id: "completed"})
    report(request, "SIGSTOP mid-step", epochs=flow[2], **timings, **a.figures())
    a.assert_ok()
    assert a.interrupted == 1  # the paused call of "long", re-run by the successor


def test_paused_executor_between_steps_runs_no_committed_step(
    fleet: FaultFleet, request: pytest.FixtureRequest
) -> None:
    """Paused between two steps (no step running, so no lease renewal), then resumed.

    While it was stopped, another executor took the flow over and committed every
    remaining step. Resumed, the stale executor must stop before calling a step's
    function, not run it again and only then be refused at the commit.
    """
    fleet.worker(concurrency=1)
    fleet.worker(concurrency=1)
    fleet.beat()
    run = fleet.flows["fault-pausable"].run(input={"long": 0.05, "gap": 2.0})
    gap = fleet.effects.wait_for(lambda e: e.kind == "gap" and e.flow_id == run.flow_id)
    before, after, timings = _pause_resume(fleet, run.flow_id, gap)

    assert before == after, "the resumed executor changed the record"
    (flow,), _ = after
    assert flow[0] == "completed"
    a = audit(fleet, {run.flow_id: "completed"})
    report(request, "SIGSTOP between steps", epochs=flow[2], **timings, **a.figures())
    a.assert_ok()
