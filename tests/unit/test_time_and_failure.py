"""Retries, sleeps, polls, expiry, cancellation and the sweeper, on a fake clock."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from crux_workers import (
    FlowAlreadyFinished,
    FlowNotFound,
    FlowNotWaiting,
    NonRetryableError,
    Retry,
)
from tests.support.harness import Harness


class Empty(BaseModel):
    pass


def flaky(h: Harness, name: str, failures: int, exc: type[Exception] = RuntimeError) -> Any:
    def fn() -> str:
        h.calls[name] += 1
        if h.calls[name] <= failures:
            raise exc(f"{name} failure #{h.calls[name]}")
        return f"{name} ok"

    return fn


def test_a_failing_step_is_retried_after_its_backoff_without_holding_a_worker(
    h: Harness,
) -> None:
    @h.app.flow("retrying", input=Empty)
    def retrying(f: Any) -> Any:
        f.step("before", lambda: h.calls.update(["before"]))
        return f.step(
            "flaky",
            flaky(h, "flaky", failures=2),
            retry=Retry(attempts=3, backoff="exponential", initial="10s", jitter=False),
        )

    run = retrying.run(input={})
    h.drain()
    state = run.state()
    assert state.status == "suspended" and state.wake_kind == "retry"
    assert state.wake_at == h.clock() + __import__("datetime").timedelta(seconds=10)
    assert h.countdowns == [pytest.approx(10.05)]  # the shortcut, backed by the record
    h.tick(9)
    assert h.calls["flaky"] == 1
    h.tick(2)
    assert h.calls["flaky"] == 2 and run.state().wake_kind == "retry"
    h.tick(21)
    outcome = run.outcome()
    assert outcome is not None and outcome.status == "completed"
    assert outcome.result == "flaky ok"
    state = run.state()
    assert [s.attempts for s in state.steps if s.name == "flaky"] == [3]
    assert [(e.step, e.details["attempt"]) for e in state.step_errors] == [
        ("flaky", 1),
        ("flaky", 2),
    ]
    assert h.calls["before"] == 1


def test_the_last_failed_attempt_fails_the_flow_with_type_message_traceback(h: Harness) -> None:
    @h.app.flow("doomed", input=Empty)
    def doomed(f: Any) -> Any:
        return f.step(
            "never",
            flaky(h, "never", failures=99, exc=ValueError),
            retry=Retry(attempts=3, backoff="fixed", initial="1s", jitter=False),
        )

    run = doomed.run(input={})
    h.drain()
    for _ in range(3):
        h.tick(5)
    state = run.state()
    assert state.status == "failed"
    assert h.calls["never"] == 3
    assert state.error is not None
    assert state.error.type == "builtins.ValueError"
    assert state.error.message == "never failure #3"
    assert state.error.step == "never" and state.error.details["attempt"] == 3
    assert state.error.traceback and "raise exc" in state.error.traceback
    assert len(state.step_errors) == 3


def test_non_retryable_errors_skip_the_remaining_attempts(h: Harness) -> None:
    class Refused(NonRetryableError):
        pass

    @h.app.flow("refused", input=Empty)
    def refused(f: Any) -> Any:
        return f.step("charge", flaky(h, "charge", 99, Refused), retry=Retry(attempts=5))

    run = refused.run(input={})
    h.drain()
    assert run.state().status == "failed"
    assert h.calls["charge"] == 1
    assert run.state().error.type.endswith("Refused")  # type: ignore[union-attr]


def test_durable_sleep_wakes_once_its_time_has_come(h: Harness) -> None:
    @h.app.flow("napper", input=Empty)
    def napper(f: Any) -> Any:
        f.step("a", lambda: h.calls.update(["a"]))
        f.sleep("nap", "1h")
        return f.step("b", lambda: h.calls.update(["b"]) or "awake")

    run = napper.run(input={})
    h.drain()
    assert run.state().status == "suspended" and run.state().wake_kind == "sleep"
    assert h.countdowns == []  # an hour is far beyond the countdown shortcut
    napper.run(resume=run.flow_id)  # an early, stray resume does not end the sleep
    h.drain()
    assert run.state().status == "suspended" and h.calls["b"] == 0
    h.tick(1800)
    assert h.calls["b"] == 0
    h.tick(1801)
    assert run.outcome().result == "awake"  # type: ignore[union-attr]
    assert h.calls == {"a": 1, "b": 1}


def test_wait_until_polls_without_rerunning_completed_steps(h: Harness) -> None:
    checks = {"n": 0}

    def ready() -> Any:
        checks["n"] += 1
        return {"ready_at_check": checks["n"]} if checks["n"] >= 3 else None

    @h.app.flow("poller", input=Empty)
    def poller(f: Any) -> Any:
        f.step("setup", lambda: h.calls.update(["setup"]))
        got = f.wait_until("ready", ready, every="30s", timeout="1h")
        f.step("after", lambda: h.calls.update(["after"]))
        return got

    run = poller.run(input={})
    h.drain()
    assert run.state().wake_kind == "poll" and checks["n"] == 1
    h.tick(10)
    assert checks["n"] == 1
    h.tick(21)
    h.tick(31)
    assert run.outcome().result == {"ready_at_check": 3}  # type: ignore[union-attr]
    assert h.calls == {"setup": 1, "after": 1}
    assert [s.kind for s in run.state().steps] == ["step", "wait", "step"]


def test_wait_until_expires_at_its_timeout(h: Harness) -> None:
    @h.app.flow("hopeless", input=Empty)
    def hopeless(f: Any) -> Any:
        return f.wait_until("never", lambda: False, every="1m", timeout="5m")

    run = hopeless.run(input={})
    h.drain()
    for _ in range(6):
        h.tick(61)
    assert run.state().status == "expired"


def test_the_sweeper_expires_overdue_suspends_without_a_broker_message(h: Harness) -> None:
    @h.app.flow("timed", input=Empty)
    def timed(f: Any) -> Any:
        return f.suspend("go", timeout="10m")

    run = timed.run(input={})
    h.drain()
    epoch = run.state().epoch
    h.tick(599)
    assert run.state().status == "suspended"
    h.tick(2)
    state = run.state()
    assert state.status == "expired" and state.epoch == epoch  # no replay was needed
    assert run.outcome().status == "expired"  # type: ignore[union-attr]
    with pytest.raises(FlowNotWaiting):
        h.app.signal_flow(run.flow_id, "go", 1)


def test_a_signal_just_before_the_deadline_wins_over_the_sweeper(h: Harness) -> None:
    @h.app.flow("timed", input=Empty)
    def timed(f: Any) -> Any:
        return f.suspend("go", timeout="10m")

    run = timed.run(input={})
    h.drain()
    h.clock.advance(599)
    h.app.signal_flow(run.flow_id, "go", "in time")
    h.dispatcher.queue.clear()  # the resume message is lost
    h.tick(2)  # past the deadline: the sweeper must not expire it, but re-publish later
    assert run.state().status == "suspended"
    h.tick(31)
    assert run.outcome().result == "in time"  # type: ignore[union-attr]


def test_a_second_sweep_of_the_same_tick_does_nothing(h: Harness) -> None:
    @h.app.flow("timed", input=Empty)
    def timed(f: Any) -> Any:
        return f.suspend("go", timeout="1m")

    timed.run(input={})
    h.drain()
    h.clock.advance(61)
    first = h.app.sweep()
    second = h.app.sweep()
    assert (first.skipped, first.expired) == (False, 1)
    assert second.skipped


def test_lost_start_messages_and_dead_executors_are_republished(h: Harness) -> None:
    @h.app.flow("simple", input=Empty)
    def simple(f: Any) -> Any:
        return f.step("s", lambda: h.calls.update(["s"]) or "done")

    lost = simple.run(input={})
    h.dispatcher.queue.clear()
    dead = simple.run(input={})
    h.dispatcher.queue.clear()
    h.store.claim(dead.flow_id, "worker-that-died", ttl=10)
    h.tick(5)
    assert lost.state().status == "pending" and dead.state().status == "running"
    h.tick(30)
    assert lost.state().status == "completed"
    assert dead.state().status == "completed"
    assert h.calls["s"] == 2


def test_cancel_a_suspended_flow_at_once(h: Harness) -> None:
    @h.app.flow("waiting", input=Empty)
    def waiting(f: Any) -> Any:
        return f.suspend("go")

    run = waiting.run(input={})
    h.drain()
    assert h.app.cancel_flow(run.flow_id, "customer left") == "cancelled"
    outcome = run.outcome()
    assert outcome is not None
    assert (outcome.status, outcome.cancel_reason) == ("cancelled", "customer left")
    with pytest.raises(FlowNotWaiting):
        h.app.signal_flow(run.flow_id, "go", 1)
    with pytest.raises(FlowAlreadyFinished):
        h.app.cancel_flow(run.flow_id, "again")
    with pytest.raises(FlowNotFound):
        h.app.cancel_flow("nope", "x")


def test_cancel_during_a_step_commits_it_and_starts_no_other(h: Harness) -> None:
    @h.app.flow("busy", input=Empty)
    def busy(f: Any) -> Any:
        def long_step() -> str:
            assert h.app.cancel_flow(f.flow_id, "stop please") == "cancelling"
            return "finished anyway"

        f.step("long", long_step)
        f.step("next", lambda: h.calls.update(["next"]))
        return "unreachable"

    run = busy.run(input={})
    h.drain()
    state = run.state()
    assert (state.status, state.cancel_reason) == ("cancelled", "stop please")
    assert [s.name for s in state.steps] == ["long"]
    assert h.calls["next"] == 0


def test_cancel_a_retrying_or_pending_flow(h: Harness) -> None:
    @h.app.flow("flaky", input=Empty)
    def flow(f: Any) -> Any:
        return f.step("x", flaky(h, "x", 99), retry=Retry(attempts=5, initial="1m"))

    backing_off = flow.run(input={})
    h.drain()
    assert backing_off.state().wake_kind == "retry"
    pending = flow.run(input={})
    assert h.app.cancel_flow(backing_off.flow_id, "a") == "cancelled"
    assert h.app.cancel_flow(pending.flow_id, "b") == "cancelled"
    h.drain()
    h.tick(3600)
    assert h.calls["x"] == 1
