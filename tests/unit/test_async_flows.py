"""Async flows (``async def`` handlers) against the in-memory store and the embedded default.

The same record and rules as sync flows: replay, non-determinism, retries, sleeps, polls,
and a cancel that reaches a running async step at its current ``await``.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from crux_workers import (
    Crux,
    NonDeterminismError,
    Retry,
    Settings,
    current_step,
)
from crux_workers._store._cache import MemoryStepCache
from tests.support.harness import Harness, QueueDispatcher


class Empty(BaseModel):
    pass


class Approval(BaseModel):
    approved: bool


def test_an_async_flow_replays_its_steps_across_suspend_and_resume(h: Harness) -> None:
    loops: set[int] = set()

    async def fetch(x: int) -> int:
        h.calls["fetch"] += 1
        loops.add(id(asyncio.get_running_loop()))
        await asyncio.sleep(0)
        return x * 2

    @h.app.flow("async-replay", input=Empty)
    async def flow(f: Any) -> Any:
        a = await f.step("fetch", lambda: fetch(21))  # returns an awaitable
        b = await f.step("plain", lambda: h.calls.update(["plain"]) or "sync fn")
        c = await f.step("coro-fn", _coro_fn(h))  # an async def itself
        got = await f.suspend("approval", schema=Approval)
        d = await f.step("after", lambda: fetch(got.approved + 1))
        return {"a": a, "b": b, "c": c, "approved": got.approved, "d": d}

    run = flow.run(input={})
    h.drain()
    state = run.state()
    assert (state.status, state.waiting_on) == ("suspended", "approval")
    h.app.signal_flow(run.flow_id, "approval", {"approved": True})
    h.drain()
    outcome = run.outcome()
    assert outcome is not None and outcome.status == "completed", run.state()
    assert outcome.result == {"a": 42, "b": "sync fn", "c": [1, 2], "approved": True, "d": 4}
    # Each step ran once although the handler ran twice; one long-lived loop served both.
    assert h.calls == {"fetch": 2, "plain": 1, "coro-fn": 1}
    assert len(loops) == 1
    assert [(s.kind, s.name) for s in run.state().steps] == [
        ("step", "fetch"),
        ("step", "plain"),
        ("step", "coro-fn"),
        ("suspend", "approval"),
        ("step", "after"),
    ]


def _coro_fn(h: Harness) -> Any:
    async def fn() -> list[int]:
        h.calls["coro-fn"] += 1
        await asyncio.sleep(0.01)
        return [1, 2]

    return fn


def test_a_changed_async_handler_fails_the_replay_with_non_determinism(h: Harness) -> None:
    version = {"n": 1}

    @h.app.flow("async-drift", input=Empty)
    async def flow(f: Any) -> Any:
        await f.step("one" if version["n"] == 1 else "renamed", lambda: 1)
        await f.suspend("go")
        return "done"

    run = flow.run(input={})
    h.drain()
    assert run.state().status == "suspended"
    version["n"] = 2
    h.app.signal_flow(run.flow_id, "go", None)
    h.drain()
    state = run.state()
    assert state.status == "failed" and state.error is not None
    assert state.error.type == f"{NonDeterminismError.__module__}.NonDeterminismError"
    assert "'one'#0" in state.error.message and "'renamed'#0" in state.error.message


def test_a_failing_async_step_is_retried_after_its_backoff(h: Harness) -> None:
    async def flaky() -> str:
        h.calls["flaky"] += 1
        await asyncio.sleep(0)
        if h.calls["flaky"] <= 2:
            raise RuntimeError(f"failure #{h.calls['flaky']} on attempt {current_step().attempt}")
        return "ok"

    @h.app.flow("async-retry", input=Empty)
    async def flow(f: Any) -> Any:
        await f.step("before", lambda: h.calls.update(["before"]))
        return await f.step(
            "flaky", flaky, retry=Retry(attempts=3, backoff="fixed", initial="10s", jitter=False)
        )

    run = flow.run(input={})
    h.drain()
    assert run.state().wake_kind == "retry" and h.calls["flaky"] == 1
    h.tick(11)
    assert h.calls["flaky"] == 2
    h.tick(11)
    outcome = run.outcome()
    assert outcome is not None and (outcome.status, outcome.result) == ("completed", "ok")
    state = run.state()
    assert [e.message for e in state.step_errors] == [
        "failure #1 on attempt 1",
        "failure #2 on attempt 2",
    ]
    assert [s.attempts for s in state.steps if s.name == "flaky"] == [3]
    assert h.calls["before"] == 1


def test_async_sleep_and_wait_until_with_an_async_condition(h: Harness) -> None:
    ready = {"flag": False}

    async def check() -> Any:
        h.calls["check"] += 1
        await asyncio.sleep(0)
        return ready["flag"] and {"seen": h.calls["check"]}

    @h.app.flow("async-time", input=Empty)
    async def flow(f: Any) -> Any:
        await f.step("before", lambda: h.calls.update(["before"]))
        await f.sleep("nap", "30s")
        seen = await f.wait_until("ready", check, every="10s", timeout="1h")
        return await f.step("after", lambda: h.calls.update(["after"]) or seen)

    run = flow.run(input={})
    h.drain()
    assert run.state().wake_kind == "sleep"
    h.tick(31)
    assert h.calls["check"] == 1 and run.state().status == "suspended"
    h.tick(11)
    assert h.calls["check"] == 2
    ready["flag"] = True
    h.tick(11)
    outcome = run.outcome()
    assert outcome is not None and outcome.result == {"seen": 3}
    assert h.calls == {"before": 1, "check": 3, "after": 1}


def test_an_async_suspend_expires_at_its_timeout(h: Harness) -> None:
    @h.app.flow("async-expiry", input=Empty)
    async def flow(f: Any) -> Any:
        return await f.suspend("never", timeout="1m")

    run = flow.run(input={})
    h.drain()
    h.tick(61)
    assert run.state().status == "expired"


def test_a_cancel_interrupts_a_running_async_step_at_its_await(h: Harness) -> None:
    events: list[str] = []

    async def long_call(flow_id: str) -> str:
        try:
            # The cancel comes from another thread while this step awaits.
            await asyncio.to_thread(h.app.cancel_flow, flow_id, "not needed")
            events.append("awaiting")
            await asyncio.sleep(60)
            events.append("slept")
            return "unreachable"
        finally:
            await asyncio.sleep(0.05)  # a finally block may await too
            events.append(f"finally:{current_step().name}")

    @h.app.flow("async-cancel", input=Empty)
    async def flow(f: Any) -> Any:
        await f.step("before", lambda: "ok")
        await f.step("long", lambda: long_call(f.flow_id))
        return await f.step("next", lambda: events.append("next"))

    run = flow.run(input={})
    started = time.monotonic()
    h.drain()
    took = time.monotonic() - started
    state = run.state()
    assert (state.status, state.cancel_reason) == ("cancelled", "not needed")
    assert events == ["awaiting", "finally:long"]
    assert [s.name for s in state.steps] == ["before"]  # nothing of "long" was committed
    assert took < 10  # bounded (about a second: the keeper's check interval)


def test_a_sync_step_polls_current_step_cancelled(h: Harness) -> None:
    seen: list[bool] = []

    def polite(flow_id: str) -> str:
        info = current_step()
        seen.append(info.cancelled)
        threading.Thread(target=h.app.cancel_flow, args=(flow_id, "stop")).start()
        deadline = time.monotonic() + 10
        while not info.cancelled and time.monotonic() < deadline:
            time.sleep(0.02)
        seen.append(info.cancelled)
        raise RuntimeError("stopped early")

    @h.app.flow("sync-polling", input=Empty)
    def flow(f: Any) -> Any:
        f.step("polite", lambda: polite(f.flow_id), retry=Retry(attempts=5))
        return "unreachable"

    run = flow.run(input={})
    h.drain()
    state = run.state()
    assert seen == [False, True]
    assert (state.status, state.cancel_reason) == ("cancelled", "stop")
    # The failure after the cancel is moot: no retry, nothing committed.
    assert state.steps == [] and state.wake_kind is None


def test_checkpoints_awaited_concurrently_are_refused(h: Harness) -> None:
    async def slow(v: str) -> str:
        h.calls[v] += 1
        await asyncio.sleep(0.05)
        return v

    @h.app.flow("async-gather", input=Empty)
    async def flow(f: Any) -> Any:
        return await asyncio.gather(f.step("a", lambda: slow("a")), f.step("b", lambda: slow("b")))

    run = flow.run(input={})
    h.drain()
    state = run.state()
    assert state.status == "failed" and state.error is not None
    assert "step 'b' called while step 'a' is still running" in state.error.message
    assert h.calls == {"a": 1}
    time.sleep(0.2)  # the orphaned step "a" cannot commit after the flow failed
    assert run.state().steps == []


def test_concurrency_inside_one_async_step_is_the_users_own(h: Harness) -> None:
    async def fan_out() -> list[int]:
        async def one(i: int) -> int:
            await asyncio.sleep(0.3)
            return i

        return list(await asyncio.gather(one(1), one(2), one(3)))

    @h.app.flow("async-fan-out", input=Empty)
    async def flow(f: Any) -> Any:
        return await f.step("fan-out", fan_out)

    run = flow.run(input={})
    h.drain()
    outcome = run.outcome()
    assert outcome is not None and outcome.result == [1, 2, 3]
    step = run.state().steps[0]
    assert step.completed_at is not None and step.started_at is not None
    assert (step.completed_at - step.started_at).total_seconds() < 0.8


def test_a_cancelled_error_from_the_steps_own_code_is_a_step_failure(h: Harness) -> None:
    async def cancels_itself() -> str:
        h.calls["call"] += 1
        if h.calls["call"] == 1:
            inner = asyncio.ensure_future(asyncio.sleep(10))
            await asyncio.sleep(0)
            inner.cancel()
            await inner  # raises CancelledError, without any cancel of the flow
        return "second time lucky"

    @h.app.flow("async-self-cancel", input=Empty)
    async def flow(f: Any) -> Any:
        return await f.step("call", cancels_itself, retry=Retry(attempts=2, initial="1s"))

    run = flow.run(input={})
    h.drain()
    state = run.state()
    assert (state.status, state.wake_kind) == ("suspended", "retry")
    assert [e.type for e in state.step_errors] == ["asyncio.exceptions.CancelledError"]
    h.tick(5)
    outcome = run.outcome()
    assert outcome is not None and outcome.result == "second time lucky"


def test_a_flow_suspended_under_a_sync_handler_resumes_under_its_async_rewrite(
    h: Harness,
) -> None:
    def sync_version(f: Any) -> Any:
        a = f.step("a", lambda: h.calls.update(["sync-a"]) or "A")
        got = f.suspend("go")
        return {"a": a, "got": got, "b": f.step("b", lambda: h.calls.update(["sync-b"]) or "B")}

    async def async_version(f: Any) -> Any:
        a = await f.step("a", lambda: h.calls.update(["async-a"]) or "A")
        got = await f.suspend("go")
        b = await f.step("b", lambda: _async_value(h, "async-b", "B"))
        return {"a": a, "got": got, "b": b}

    def app_with(handler: Any) -> tuple[Crux, Any]:
        app = Crux(
            Settings(lease_ttl=10),
            store=h.store,
            cache=MemoryStepCache(),
            dispatcher=QueueDispatcher(),
        )
        return app, app.flow("rewritten", input=Empty)(handler)

    # sync first, async after the signal
    sync_app, sync_flow = app_with(sync_version)
    async_app, async_flow = app_with(async_version)
    run = sync_flow.run(input={})
    sync_app.execute("rewritten", run.flow_id)
    assert run.state().status == "suspended"
    async_app.signal_flow(run.flow_id, "go", 1)
    async_app.execute("rewritten", run.flow_id)
    outcome = run.outcome()
    assert outcome is not None and outcome.result == {"a": "A", "got": 1, "b": "B"}
    assert h.calls == {"sync-a": 1, "async-b": 1}

    # and the reverse
    h.calls.clear()
    run = async_flow.run(input={})
    async_app.execute("rewritten", run.flow_id)
    assert run.state().status == "suspended"
    sync_app.signal_flow(run.flow_id, "go", 2)
    sync_app.execute("rewritten", run.flow_id)
    outcome = run.outcome()
    assert outcome is not None and outcome.result == {"a": "A", "got": 2, "b": "B"}
    assert h.calls == {"async-a": 1, "sync-b": 1}
    for app in (sync_app, async_app):
        app.close()


async def _async_value(h: Harness, name: str, value: str) -> str:
    h.calls[name] += 1
    await asyncio.sleep(0)
    return value


def test_the_embedded_default_runs_an_async_flow(tmp_path: Path) -> None:
    app = Crux(Settings(database_url=f"sqlite:///{tmp_path / 'crux.db'}", sweep_interval=0.2))
    calls: list[str] = []

    @app.flow("embedded-async", input=Empty)
    async def flow(f: Any) -> Any:
        a = await f.step("a", lambda: _append(calls, "a"))
        await f.sleep("nap", "300ms")
        got = await f.suspend("go", schema=Approval, timeout="1m")
        return {"a": a, "approved": got.approved}

    try:
        run = flow.run(input={})
        deadline = time.monotonic() + 30
        while run.state().status != "suspended" or run.state().waiting_on != "go":
            assert time.monotonic() < deadline, run.state()
            time.sleep(0.02)
        app.signal_flow(run.flow_id, "go", {"approved": True})
        outcome = run.wait(timeout=30)
        assert (outcome.status, outcome.result) == ("completed", {"a": "a", "approved": True})
        assert calls == ["a"]
        assert [s.kind for s in run.state().steps] == ["step", "sleep", "suspend"]
    finally:
        app.close()


async def _append(calls: list[str], v: str) -> str:
    calls.append(v)
    await asyncio.sleep(0)
    return v


def test_sync_handler_async_step_finally_runs_before_the_flow_is_cancelled(h: Harness) -> None:
    events: list[str] = []

    async def long_call(flow_id: str) -> None:
        try:
            await asyncio.to_thread(h.app.cancel_flow, flow_id, "stop")
            await asyncio.sleep(60)
        finally:
            await asyncio.sleep(0.3)
            events.append("finally")

    @h.app.flow("sync-async-cancel", input=Empty)
    def flow(f: Any) -> Any:
        return f.step("long", lambda: long_call(f.flow_id))

    run = flow.run(input={})
    h.drain()
    assert run.state().status == "cancelled"
    assert events == ["finally"]


def test_sync_handler_async_step_cancelled_by_itself_is_a_step_failure(h: Harness) -> None:
    async def cancels_itself() -> None:
        inner = asyncio.ensure_future(asyncio.sleep(10))
        await asyncio.sleep(0)
        inner.cancel()
        await inner

    @h.app.flow("sync-self-cancel", input=Empty)
    def flow(f: Any) -> Any:
        return f.step("call", cancels_itself)

    run = flow.run(input={})
    h.drain()
    assert run.state().status == "failed"


_PARALLEL_IN_ASYNC_STEP = """
import asyncio, threading, os, sys
from pydantic import BaseModel
from crux_workers import parallel
from tests.support.harness import Harness

class Empty(BaseModel):
    pass

h = Harness()

async def one(i):
    await asyncio.sleep(0.01)
    return i

@h.app.flow("parallel-in-async-step", input=Empty)
async def flow(f):
    return await f.step("fan", lambda: parallel(lambda: one(1), lambda: one(2)))

run = flow.run(input={})
t = threading.Thread(target=h.drain, daemon=True)
t.start()
t.join(10)
print("deadlocked" if t.is_alive() else run.state().status, flush=True)
os._exit(0)
"""


def test_blocking_parallel_with_async_branches_inside_an_async_step() -> None:
    # In a subprocess: the deadlock would block this process's flow loop for good.
    done = subprocess.run(
        [sys.executable, "-c", _PARALLEL_IN_ASYNC_STEP],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.strip().splitlines()[-1] == "completed", done.stdout + done.stderr
