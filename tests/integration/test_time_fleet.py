"""Time and failure on real workers and beat: expiry, retries, sleep, polls, cancel."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text

from crux_workers import FlowNotWaiting
from tests.support.fleet import Fleet

from .test_fleet import step_commits, wait_status


def flow_runs(pg_url: str) -> dict[str, tuple[str, int, int]]:
    """flow id -> (status, runs, epoch), straight from the record."""
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, status, runs, epoch FROM crux_flows")).all()
    finally:
        engine.dispose()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def test_expiry_on_time_even_with_the_broker_flushed(fleet: Fleet) -> None:
    fleet.worker("w1")
    fleet.beat()
    runs = [fleet.flows["timed"].run(input={"timeout": "2s"}) for _ in range(10)]
    for run in runs:
        wait_status(run, "suspended")
    deadlines = {run.flow_id: run.state().deadline for run in runs}
    client = redis.Redis.from_url(fleet.redis_url)
    client.flushdb()  # whatever broker messages existed are gone
    client.close()
    lateness = []
    for run in runs:
        outcome = run.wait(timeout=30)
        assert outcome.status == "expired"
        finished = run.state().finished_at
        assert finished is not None
        lateness.append((finished - deadlines[run.flow_id]).total_seconds())  # type: ignore[operator]
    lateness.sort()
    print(
        f"\nexpiry lateness over {len(lateness)} flows, sweep interval 1s: "
        f"min {lateness[0]:.3f}s median {lateness[len(lateness) // 2]:.3f}s "
        f"max {lateness[-1]:.3f}s"
    )
    assert lateness[0] >= 0
    assert lateness[-1] < 1 + 2.0  # one sweep interval, plus slack for a loaded machine
    with pytest.raises(FlowNotWaiting):
        fleet.app.signal_flow(runs[0].flow_id, "go", "too late")
    assert all(runs_ == 1 for _, runs_, _ in flow_runs(fleet.pg_url).values())


def test_retries_back_off_and_record_each_attempt(fleet: Fleet) -> None:
    fleet.worker("w1")
    fleet.beat()
    ok = fleet.flows["flaky"].run(input={"failures": 2, "attempts": 3})
    outcome = ok.wait(timeout=30)
    assert outcome.status == "completed" and outcome.result == "ok on call 3"
    state = ok.state()
    assert [e.details["attempt"] for e in state.step_errors] == [1, 2]
    call = next(s for s in state.steps if s.name == "call")
    assert call.attempts == 3
    errors = fleet.app.store.get_flow(ok.flow_id).step_errors
    gaps = [
        (errors[1].created_at - errors[0].created_at).total_seconds(),
        (call.completed_at - errors[1].created_at).total_seconds(),
    ]
    print(f"\nretry gaps with initial=1s exponential: {gaps[0]:.3f}s, {gaps[1]:.3f}s")
    assert 0.9 <= gaps[0] < 1 + 2.5 and 1.9 <= gaps[1] < 2 + 2.5
    assert fleet.effects.count(ok.flow_id)["before"] == 1

    exhausted = fleet.flows["flaky"].run(input={"failures": 9, "attempts": 2})
    failed = exhausted.wait(timeout=30)
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.type == "builtins.RuntimeError"
    assert failed.error.message == "transient failure on call 2 (attempt 2)"
    assert "_failing_call" in (failed.error.traceback or "")

    refused = fleet.flows["flaky"].run(input={"failures": 9, "non_retryable": True})
    assert refused.wait(timeout=30).status == "failed"
    assert fleet.effects.count(refused.flow_id)["attempt"] == 1


def test_sleep_and_wait_until_rerun_no_completed_step(fleet: Fleet, tmp_path: Path) -> None:
    fleet.worker("w1")
    fleet.beat()
    started = time.monotonic()
    nap = fleet.flows["napper"].run(input={"duration": "1500ms"})
    flag = tmp_path / "flag"
    poll = fleet.flows["poller"].run(input={"flag": str(flag), "every": "300ms"})
    assert nap.wait(timeout=30).result == "awake"
    assert time.monotonic() - started >= 1.5
    checks_before = fleet.effects.count(poll.flow_id)["check"]
    assert checks_before >= 2
    flag.touch()
    assert poll.wait(timeout=30).result == {"seen": True}
    assert fleet.effects.count(nap.flow_id) == {"before": 1, "after": 1}
    polled = fleet.effects.count(poll.flow_id)
    assert polled["before"] == 1 and polled["after"] == 1 and polled["check"] > checks_before
    assert set(step_commits(fleet.pg_url, poll.flow_id).values()) == {1}


def test_cancel_while_suspended_and_during_a_long_step(fleet: Fleet) -> None:
    fleet.worker("w1")
    waiting = fleet.flows["timed"].run(input={"timeout": "1h"})
    wait_status(waiting, "suspended")
    assert fleet.app.cancel_flow(waiting.flow_id, "not needed") == "cancelled"
    outcome = waiting.wait(timeout=5)
    assert (outcome.status, outcome.cancel_reason) == ("cancelled", "not needed")

    busy = fleet.flows["long"].run(input={"seconds": 1.5})
    fleet.effects.wait_for("long-start")
    assert fleet.app.cancel_flow(busy.flow_id, "stop") == "cancelling"
    outcome = busy.wait(timeout=30)
    assert (outcome.status, outcome.cancel_reason) == ("cancelled", "stop")
    assert [s.name for s in busy.state().steps] == ["long"]
    assert fleet.effects.count(busy.flow_id) == {"long-start": 1, "long-end": 1}


def test_a_dead_executor_without_any_message_is_recovered_by_the_sweeper(fleet: Fleet) -> None:
    fleet.worker("w1")
    fleet.beat()
    store = fleet.app.store
    store.create_flow("orphan", "napper", '{"duration": "100ms"}')
    store.claim("orphan", "a-worker-that-died", ttl=2)  # leased, and no message anywhere
    outcome = fleet.app.get_flow("orphan")
    assert outcome.status == "running"
    deadline = time.monotonic() + 30
    while fleet.app.get_flow("orphan").status != "completed":
        assert time.monotonic() < deadline, "the sweeper did not recover the flow"
        time.sleep(0.05)


def test_two_beats_act_on_each_due_flow_once(fleet: Fleet) -> None:
    fleet.worker("w1", concurrency=2)
    fleet.beat("beat-a")
    fleet.beat("beat-b")
    naps = [fleet.flows["napper"].run(input={"duration": "1s"}) for _ in range(10)]
    timers = [fleet.flows["timed"].run(input={"timeout": "1s"}) for _ in range(10)]
    for run in naps:
        assert run.wait(timeout=30).status == "completed"
    for run in timers:
        assert run.wait(timeout=30).status == "expired"
    time.sleep(3)  # a few more ticks from both beats
    records = flow_runs(fleet.pg_url)
    for run in naps:
        assert records[run.flow_id][:2] == ("completed", 2), records[run.flow_id]
    for run in timers:
        assert records[run.flow_id][:2] == ("expired", 1), records[run.flow_id]
    for run in naps:
        assert fleet.effects.count(run.flow_id) == {"before": 1, "after": 1}
    sent = [b.log.read_text().count("crux.sweep") for b in fleet.beats]
    assert all(n >= 2 for n in sent), sent
