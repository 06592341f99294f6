"""Async flows on real `crux-workers worker` processes (prefork and threads), Postgres, Redis.

The flows are in tests/integration/async_flows.py (and the sync twin of ``rewrite`` in
tests/integration/rewrite_sync.py); they record their side effects like the sync ones.
"""

from __future__ import annotations

import signal
import statistics
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from crux_workers import FlowHandle, FlowRun
from tests.integration import async_flows
from tests.support.fleet import Fleet

from .test_fleet import _in_group, step_commits, wait_status
from .test_run_task import ChildWorker

FLOWS = "tests.integration.async_flows"
SIGNUP = {"email": "u@example.com", "name": "Henri", "goal": "shipping"}
CANCELS = 20


@pytest.fixture
def afleet(fleet: Fleet) -> Fleet:
    """The fleet, with the async flows known to the test's app (as a client)."""
    for value in vars(async_flows).values():
        if isinstance(value, FlowHandle):
            fleet.flows[value.name] = fleet.app.flow(value.name, input=value.input_model)(value.fn)
    return fleet


@pytest.fixture
def children(afleet: Fleet) -> Iterator[ChildWorker]:
    w = ChildWorker(afleet.env, afleet.tmp)
    yield w
    w.kill()


def seconds(start: datetime | None, end: datetime | None) -> float:
    assert start is not None and end is not None
    return (end - start).total_seconds()


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_an_async_flow_across_two_workers_runs_each_step_once(afleet: Fleet, pool: str) -> None:
    afleet.worker("w1", imports=FLOWS, pool=pool, concurrency=2)
    afleet.worker("w2", imports=FLOWS, pool=pool, concurrency=2)
    run = afleet.flows["a-onboarding"].run(input=SIGNUP)
    wait_status(run, "suspended")
    state = run.state()
    assert state.waiting_on == "email-verified" and state.deadline is not None
    afleet.app.signal_flow(run.flow_id, "email-verified", {"verified_at": "2026-11-21T10:00:00Z"})
    outcome = run.wait(timeout=30)
    assert outcome.status == "completed", run.state()
    assert outcome.result["verified_at"] == "2026-11-21T10:00:00Z"
    assert outcome.result["checkins"] == 1
    assert afleet.effects.count(run.flow_id) == {
        "send-welcome": 1,
        "first-week-plan": 1,
        "schedule-checkins": 1,
    }
    assert set(step_commits(afleet.pg_url, run.flow_id).values()) == {1}

    # Three sleeps of 0.3 s gathered inside one step run concurrently on the flow loop.
    fan = afleet.flows["a-fan-out"].run(input={"seconds": 0.3})
    assert fan.wait(timeout=30).result == [1, 2, 3]
    (step,) = fan.state().steps
    took = seconds(step.started_at, step.completed_at)
    print(f"\n[async] {pool}: gather of 3 x asyncio.sleep(0.3) in one step took {took:.3f}s")
    assert took < 0.8


def test_async_retries_sleep_wait_until_and_expiry(afleet: Fleet, tmp_path: Any) -> None:
    afleet.worker("w1", imports=FLOWS, concurrency=4)
    afleet.beat()
    ok = afleet.flows["a-flaky"].run(input={"failures": 2, "attempts": 3})
    doomed = afleet.flows["a-flaky"].run(input={"failures": 9, "attempts": 2})
    nap = afleet.flows["a-napper"].run(input={"duration": "1500ms"})
    flag = tmp_path / "flag"
    poll = afleet.flows["a-poller"].run(input={"flag": str(flag), "every": "300ms"})
    timed = afleet.flows["a-timed"].run(input={"timeout": "2s"})
    started = time.monotonic()

    outcome = ok.wait(timeout=30)
    assert (outcome.status, outcome.result) == ("completed", "ok on call 3"), ok.state()
    state = ok.state()
    assert [e.details["attempt"] for e in state.step_errors] == [1, 2]
    assert [s.attempts for s in state.steps if s.name == "call"] == [3]
    assert afleet.effects.count(ok.flow_id) == {"before": 1, "attempt": 3}
    failed = doomed.wait(timeout=30)
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.message == "transient failure on call 2 (attempt 2)"
    assert "_failing_call" in (failed.error.traceback or "")

    assert nap.wait(timeout=30).result == "awake"
    assert time.monotonic() - started >= 1.5
    assert afleet.effects.count(nap.flow_id) == {"before": 1, "after": 1}

    deadline = time.monotonic() + 30
    while afleet.effects.count(poll.flow_id)["check"] < 2:
        assert time.monotonic() < deadline, poll.state()
        time.sleep(0.05)
    flag.touch()
    assert poll.wait(timeout=30).result == {"seen": True}
    polled = afleet.effects.count(poll.flow_id)
    assert polled["before"] == 1 and polled["after"] == 1 and polled["check"] >= 2
    assert set(step_commits(afleet.pg_url, poll.flow_id).values()) == {1}

    expired = timed.wait(timeout=30)
    assert expired.status == "expired"
    assert afleet.effects.count(timed.flow_id) == {"before": 1}


def test_async_run_task_on_another_services_worker(afleet: Fleet, children: ChildWorker) -> None:
    afleet.worker("w1", imports=FLOWS)
    run = afleet.flows["a-delegating"].run(input={"topic": "durability", "fail_times": 1})
    outcome = run.wait(timeout=60)
    assert outcome.status == "completed", run.state()
    assert outcome.result == {"plan": ["intro to durability", "durability in depth"]}
    state = run.state()
    assert [(s.kind, s.name, s.attempts) for s in state.steps] == [
        ("task", "plan", 2),
        ("step", "write", 1),
    ]
    assert afleet.effects.count(run.flow_id) == {"child-plan-1": 1, "child-plan-2": 1, "write": 1}


def test_kill_9_mid_async_step_reruns_it_elsewhere_and_commits_each_step_once(
    afleet: Fleet,
) -> None:
    afleet.worker("w1", imports=FLOWS)
    afleet.worker("w2", imports=FLOWS)
    run = afleet.flows["a-slow"].run(input={"seconds": 2.0})
    _, _, pid = afleet.effects.wait_for("slow-start")
    owner = next(w for w in afleet.workers if _in_group(pid, w.proc.pid))
    owner.kill(signal.SIGKILL)
    outcome = run.wait(timeout=60)
    assert outcome.status == "completed", [w.tail() for w in afleet.workers]
    effects = afleet.effects.count(run.flow_id)
    assert effects["before"] == 1 and effects["after"] == 1
    assert effects["slow-start"] >= 2 and effects["slow-end"] == 1
    rerun = [p for f, s, p in afleet.effects.lines() if f == run.flow_id and s == "slow-start"]
    assert rerun[-1] != pid and not _in_group(rerun[-1], owner.proc.pid)
    assert step_commits(afleet.pg_url, run.flow_id) == {
        ("before", 0): 1,
        ("slow", 0): 1,
        ("after", 0): 1,
    }


def test_a_cancel_interrupts_a_60s_async_step_within_the_bound(
    afleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    # Both pools at once: prefork (one flow per pool process) and threads.
    pre = afleet.worker("pre", imports=FLOWS, pool="prefork", concurrency=4)
    thr = afleet.worker("thr", imports=FLOWS, pool="threads", concurrency=6)
    runs: list[FlowRun] = [
        afleet.flows["a-long"].run(input={"seconds": 60}) for _ in range(CANCELS)
    ]
    cancelled_at: dict[str, float] = {}
    pool_of: dict[str, str] = {}
    deadline = time.monotonic() + 120
    while len(cancelled_at) < CANCELS:
        assert time.monotonic() < deadline, f"{len(cancelled_at)} cancels in 120s"
        for flow_id, step, pid in afleet.effects.lines():
            if step == "long-start" and flow_id not in cancelled_at:
                pool_of[flow_id] = "prefork" if _in_group(pid, pre.proc.pid) else "threads"
                cancelled_at[flow_id] = time.time()
                assert afleet.app.cancel_flow(flow_id, "not needed") == "cancelling"
        time.sleep(0.02)
    latencies: dict[str, float] = {}
    for run in runs:
        outcome = run.wait(timeout=30)
        assert (outcome.status, outcome.cancel_reason) == ("cancelled", "not needed")
        state = run.state()
        assert state.finished_at is not None
        latencies[run.flow_id] = state.finished_at.timestamp() - cancelled_at[run.flow_id]
        # The step's finally ran; nothing of it (nor after it) was committed.
        assert afleet.effects.count(run.flow_id) == {
            "before": 1,
            "long-start": 1,
            "long-finally": 1,
        }
        assert [s.name for s in state.steps] == ["before"]
        assert step_commits(afleet.pg_url, run.flow_id) == {("before", 0): 1}
    values = sorted(latencies.values())
    by_pool = {
        p: sorted(v for f, v in latencies.items() if pool_of[f] == p)
        for p in ("prefork", "threads")
    }
    line = (
        f"[async] cancel of a running 60 s async step, cancel_flow -> finished_at over "
        f"{len(values)} cancels: median {statistics.median(values):.3f}s "
        f"max {values[-1]:.3f}s min {values[0]:.3f}s"
        + "".join(
            f"; {p} ({len(v)}): median {statistics.median(v):.3f}s max {v[-1]:.3f}s"
            for p, v in by_pool.items()
            if v
        )
    )
    with capsys.disabled():
        print("\n" + line)
    assert len(values) == CANCELS
    assert values[-1] < 5.0, line
    assert by_pool["prefork"] and by_pool["threads"], pool_of  # both pools were exercised
    assert pre.proc.poll() is None and thr.proc.poll() is None


def _wait_waiting(run: FlowRun, name: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while run.state().waiting_on != name:
        assert time.monotonic() < deadline, run.state()
        time.sleep(0.05)


def test_a_flow_suspended_under_its_sync_handler_resumes_under_its_async_rewrite(
    afleet: Fleet,
) -> None:
    rewrite = afleet.flows["rewrite"]
    sync_worker = afleet.worker("sync1", imports="tests.integration.rewrite_sync")
    to_async = rewrite.run(input={"label": "x"})
    _wait_waiting(to_async, "go")
    sync_worker.stop()
    async_worker = afleet.worker("async1", imports=FLOWS)
    afleet.app.signal_flow(to_async.flow_id, "go", "signal-1")
    outcome = to_async.wait(timeout=30)
    assert outcome.result == {"first": "first:x", "second": "second:signal-1", "handler": "async"}
    assert afleet.effects.count(to_async.flow_id) == {"first-sync": 1, "second-async": 1}

    # The reverse: suspended under the async handler, resumed under the sync one.
    to_sync = rewrite.run(input={"label": "y"})
    _wait_waiting(to_sync, "go")
    async_worker.stop()
    afleet.worker("sync2", imports="tests.integration.rewrite_sync")
    afleet.app.signal_flow(to_sync.flow_id, "go", "signal-2")
    outcome = to_sync.wait(timeout=30)
    assert outcome.result == {"first": "first:y", "second": "second:signal-2", "handler": "sync"}
    assert afleet.effects.count(to_sync.flow_id) == {"first-async": 1, "second-sync": 1}
    for run in (to_async, to_sync):
        assert [(s.kind, s.name) for s in run.state().steps] == [
            ("step", "first"),
            ("suspend", "go"),
            ("step", "second"),
        ]
        assert set(step_commits(afleet.pg_url, run.flow_id).values()) == {1}
