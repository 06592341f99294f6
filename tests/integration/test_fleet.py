"""Flows on real `crux-workers worker` processes, real Postgres and real Redis."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine, text

from crux_workers import FlowNotFound, FlowNotWaiting, FlowRun, InvalidInput, InvalidSignal
from tests.support.fleet import Fleet


def wait_status(run: FlowRun, status: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (current := run.state().status) != status:
        assert time.monotonic() < deadline, f"flow still {current}, expected {status}"
        time.sleep(0.02)


def step_commits(pg_url: str, flow_id: str) -> dict[tuple[str, int], int]:
    """How many rows the record holds per (step name, occurrence)."""
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT name, occurrence, count(*) FROM crux_steps WHERE flow_id = :f "
                    "GROUP BY name, occurrence"
                ),
                {"f": flow_id},
            ).all()
    finally:
        engine.dispose()
    return {(r[0], r[1]): r[2] for r in rows}


SIGNUP = {"email": "u@example.com", "name": "Henri", "goal": "shipping"}


def test_onboarding_across_two_workers_runs_each_step_once(fleet: Fleet) -> None:
    fleet.worker("w1")
    fleet.worker("w2")
    onboarding = fleet.flows["onboarding"]
    run = onboarding.run(input=SIGNUP)
    wait_status(run, "suspended")
    state = run.state()
    assert state.waiting_on == "email-verified" and state.deadline is not None
    fleet.app.signal_flow(run.flow_id, "email-verified", {"verified_at": "2026-11-21T10:00:00Z"})
    outcome = run.wait(timeout=30)
    assert outcome.status == "completed"
    assert outcome.result == {"verified_at": "2026-11-21T10:00:00Z", "checkins": 1}
    assert fleet.effects.count(run.flow_id) == {
        "send-welcome": 1,
        "first-week-plan": 1,
        "schedule-checkins": 1,
    }
    assert set(step_commits(fleet.pg_url, run.flow_id).values()) == {1}


def test_signal_before_suspend_and_same_name_signals_in_order(fleet: Fleet) -> None:
    fleet.worker("w1")
    run = fleet.flows["pair"].run(input={"n": 2})
    fleet.app.signal_flow(run.flow_id, "n", "first", key="a")
    fleet.app.signal_flow(run.flow_id, "n", "dup", key="a")
    fleet.app.signal_flow(run.flow_id, "n", "second", key="b")
    assert run.wait(timeout=30).result == ["first", "second"]
    statuses = [(s.payload, s.status) for s in run.state().signals]
    assert statuses == [("first", "consumed"), ("second", "consumed")]


def test_invalid_payload_is_refused_at_send_then_a_valid_one_resumes(fleet: Fleet) -> None:
    fleet.worker("w1")
    run = fleet.flows["onboarding"].run(input=SIGNUP)
    wait_status(run, "suspended")
    # The flow waits with a schema: the payload is checked at once (docs/operations.md).
    with pytest.raises(InvalidSignal) as err:
        fleet.app.signal_flow(run.flow_id, "email-verified", {"when": "yesterday"})
    assert ["verified_at"] in [e["loc"] for e in err.value.errors]  # type: ignore[attr-defined]
    state = run.state()
    assert state.signals == [] and state.status == "suspended"
    fleet.app.signal_flow(run.flow_id, "email-verified", {"verified_at": "now"})
    assert run.wait(timeout=30).status == "completed"
    assert fleet.effects.count(run.flow_id)["send-welcome"] == 1


def test_redis_flushed_while_suspended_loses_no_progress(fleet: Fleet) -> None:
    fleet.worker("w1")
    run = fleet.flows["onboarding"].run(input=SIGNUP)
    wait_status(run, "suspended")
    client = redis.Redis.from_url(fleet.redis_url)
    assert client.dbsize() > 0
    client.flushdb()
    client.close()
    fleet.app.signal_flow(run.flow_id, "email-verified", {"verified_at": "t"})
    assert run.wait(timeout=30).status == "completed"
    assert fleet.effects.count(run.flow_id) == {
        "send-welcome": 1,
        "first-week-plan": 1,
        "schedule-checkins": 1,
    }


@pytest.mark.parametrize("target", ["child", "group"])
def test_kill_9_mid_step_completes_elsewhere_with_each_step_committed_once(
    fleet: Fleet, target: str
) -> None:
    w1 = fleet.worker("w1")
    fleet.worker("w2")
    run = fleet.flows["slow"].run(input={"seconds": 2.0})
    _, _, pid = fleet.effects.wait_for("slow-start")
    if target == "child":
        os.kill(pid, signal.SIGKILL)
    else:
        owner = next(w for w in fleet.workers if _in_group(pid, w.proc.pid))
        owner.kill(signal.SIGKILL)
    outcome = run.wait(timeout=60)
    assert outcome.status == "completed", (w1.tail(), fleet.workers[1].tail())
    effects = fleet.effects.count(run.flow_id)
    assert effects["before"] == 1 and effects["after"] == 1
    assert effects["slow-start"] >= 2
    commits = step_commits(fleet.pg_url, run.flow_id)
    assert commits == {("before", 0): 1, ("slow", 0): 1, ("after", 0): 1}


def _in_group(pid: int, pgid: int) -> bool:
    try:
        return os.getpgid(pid) == pgid
    except ProcessLookupError:
        return False


def test_racing_signals_are_each_consumed_once(fleet: Fleet) -> None:
    fleet.worker("w1", concurrency=2)
    fleet.worker("w2", concurrency=2)
    n = 20
    run = fleet.flows["ticks"].run(input={"n": n})
    wait_status(run, "suspended")
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def send(i: int) -> None:
        try:
            barrier.wait()
            fleet.app.signal_flow(run.flow_id, "tick", i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    outcome = run.wait(timeout=60)
    assert outcome.status == "completed", outcome.error
    assert sorted(outcome.result) == list(range(n))
    signals = run.state().signals
    assert all(s.status == "consumed" for s in signals)
    # consumed in arrival order: the signal ids and the checkpoints rise together
    by_id = sorted(signals, key=lambda s: s.id)
    assert [s.payload for s in by_id] == outcome.result
    assert [s.consumed_seq for s in by_id] == sorted(s.consumed_seq for s in by_id)  # type: ignore[type-var]
    commits = step_commits(fleet.pg_url, run.flow_id)
    assert len(commits) == 2 * n and set(commits.values()) == {1}
    effects = fleet.effects.count(run.flow_id)
    assert effects == {f"after-tick-{i}": 1 for i in range(n)}


def test_refusals_are_typed(fleet: Fleet) -> None:
    with pytest.raises(FlowNotFound):
        fleet.app.signal_flow("no-such-flow", "x", {})
    with pytest.raises(InvalidInput):
        fleet.flows["onboarding"].run(input={"email": "x"}, flow_id="bad-input")
    with pytest.raises(FlowNotFound):
        fleet.app.get_flow("bad-input")
    fleet.worker("w1")
    run = fleet.flows["pair"].run(input={"n": 2}, flow_id="done-1")
    again = fleet.flows["pair"].run(input={"n": 2}, flow_id="done-1")
    assert again.flow_id == run.flow_id
    fleet.app.signal_flow(run.flow_id, "n", 1)
    fleet.app.signal_flow(run.flow_id, "n", 2)
    assert run.wait(timeout=30).status == "completed"
    with pytest.raises(FlowNotWaiting):
        fleet.app.signal_flow(run.flow_id, "n", 3)


def test_a_malformed_task_message_does_not_crash_the_worker(fleet: Fleet) -> None:
    w = fleet.worker("w1")
    celery: Any = fleet.app.celery
    celery.send_task("crux.flow.pair", args=[{"not": "an id"}])
    celery.send_task("crux.flow.pair", args=[])
    celery.send_task("crux.flow.pair", args=["no-such-flow"])
    run = fleet.flows["pair"].run(input={"n": 2})
    fleet.app.signal_flow(run.flow_id, "n", 1)
    fleet.app.signal_flow(run.flow_id, "n", 2)
    assert run.wait(timeout=30).status == "completed"
    assert w.proc.poll() is None


def test_resumes_run_before_a_backlog_of_starts(fleet: Fleet) -> None:
    w1 = fleet.worker("w1")
    onboarding = fleet.flows["onboarding"]
    waiting = onboarding.run(input=SIGNUP)
    wait_status(waiting, "suspended")
    w1.kill()
    backlog = [onboarding.run(input=SIGNUP) for _ in range(20)]
    fleet.app.signal_flow(waiting.flow_id, "email-verified", {"verified_at": "now"})
    client = redis.Redis.from_url(fleet.redis_url)
    try:
        # Starts wait in "crux:9", the resume in "crux", which workers read first.
        assert client.llen("crux:9") == 20
        assert client.llen("crux") == 1
    finally:
        client.close()
    fleet.worker("w2")
    assert waiting.wait(timeout=60).status == "completed"
    for run in backlog:
        wait_status(run, "suspended", timeout=60)
    resumed_at = waiting.state().finished_at
    assert resumed_at is not None
    first_steps = [run.state().steps[0].completed_at for run in backlog]
    assert resumed_at < min(first_steps)
