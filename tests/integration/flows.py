"""Flows the integration tests run on real workers (imported with --import)."""

from __future__ import annotations

import os
import time
from typing import Any

from celery import signature
from pydantic import BaseModel

from crux_workers import FlowContext, Retry, current_step, flow
from crux_workers._demo import Signup, Verified


def effect(name: str) -> None:
    """Record that a side effect happened (O_APPEND: whole lines, many processes)."""
    info = current_step()
    line = f"{info.flow_id} {name} {os.getpid()}\n".encode()
    fd = os.open(os.environ["CRUXTEST_EFFECTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


class Sleepy(BaseModel):
    seconds: float = 0.0


class Count(BaseModel):
    n: int


@flow("onboarding", input=Signup)
def onboarding(f: FlowContext[Signup]) -> Any:
    f.step("send-welcome", lambda: effect("send-welcome") or {"to": f.input.email})
    verified = f.suspend("email-verified", schema=Verified, timeout="24h")
    plan = f.step("first-week-plan", lambda: effect("first-week-plan") or [f.input.goal])
    done = f.step("schedule-checkins", lambda: effect("schedule-checkins") or len(plan))
    return {"verified_at": verified.verified_at, "checkins": done}


@flow("slow", input=Sleepy)
def slow(f: FlowContext[Sleepy]) -> Any:
    f.step("before", lambda: effect("before") or "ok")

    def nap() -> str:
        effect("slow-start")
        time.sleep(f.input.seconds)
        effect("slow-end")
        return "rested"

    rested = f.step("slow", nap)
    return f.step("after", lambda: effect("after") or rested)


@flow("ticks", input=Count)
def ticks(f: FlowContext[Count]) -> Any:
    got = []
    for i in range(f.input.n):
        got.append(f.suspend("tick"))
        f.step("after-tick", lambda i=i: effect(f"after-tick-{i}") or i)
    return got


@flow("pair", input=Count)
def pair(f: FlowContext[Count]) -> Any:
    return [f.suspend("n"), f.suspend("n")]


class Timed(BaseModel):
    timeout: str = "2s"


class Flaky(BaseModel):
    failures: int
    attempts: int = 3
    non_retryable: bool = False


class Nap(BaseModel):
    duration: str = "1s"


class Poll(BaseModel):
    flag: str
    every: str = "500ms"


class Long(BaseModel):
    seconds: float


@flow("timed", input=Timed)
def timed(f: FlowContext[Timed]) -> Any:
    f.step("before", lambda: effect("before") or 1)
    return f.suspend("go", timeout=f.input.timeout)


def _failing_call(failures: int, non_retryable: bool) -> str:
    """Fails the first `failures` calls for this flow (counted in the effects file)."""
    from crux_workers import NonRetryableError

    info = current_step()
    effect("attempt")
    with open(os.environ["CRUXTEST_EFFECTS"]) as fh:
        calls = sum(1 for line in fh if line.startswith(f"{info.flow_id} attempt "))
    if calls <= failures:
        if non_retryable:
            raise NonRetryableError(f"refused on call {calls}")
        raise RuntimeError(f"transient failure on call {calls} (attempt {info.attempt})")
    return f"ok on call {calls}"


@flow("flaky", input=Flaky)
def flaky(f: FlowContext[Flaky]) -> Any:
    from crux_workers import Retry

    f.step("before", lambda: effect("before") or 1)
    return f.step(
        "call",
        lambda: _failing_call(f.input.failures, f.input.non_retryable),
        retry=Retry(attempts=f.input.attempts, backoff="exponential", initial="1s", jitter=False),
    )


@flow("napper", input=Nap)
def napper(f: FlowContext[Nap]) -> Any:
    f.step("before", lambda: effect("before") or 1)
    f.sleep("nap", f.input.duration)
    return f.step("after", lambda: effect("after") or "awake")


@flow("poller", input=Poll)
def poller(f: FlowContext[Poll]) -> Any:
    f.step("before", lambda: effect("before") or 1)

    def check() -> Any:
        effect("check")
        return os.path.exists(f.input.flag) and {"seen": True}

    got = f.wait_until("flag", check, every=f.input.every, timeout="60s")
    f.step("after", lambda: effect("after") or 1)
    return got


@flow("long", input=Long)
def long_flow(f: FlowContext[Long]) -> Any:
    def work() -> str:
        effect("long-start")
        time.sleep(f.input.seconds)
        effect("long-end")
        return "done"

    f.step("long", work)
    f.step("next", lambda: effect("next") or 1)
    return "unreachable if cancelled"


class Topic(BaseModel):
    topic: str
    fail_times: int = 0
    resend_after: str = "5m"
    child_delay: float = 0.0


@flow("delegating", input=Topic)
def delegating(f: FlowContext[Topic]) -> Any:
    # Another service's task, known by name only; its signature routes it to that
    # service's queue.
    plan = f.run_task(
        "plan",
        signature("children.plan", queue="children"),
        f.input.topic,
        fail_times=f.input.fail_times,
        delay=f.input.child_delay,
        retry=Retry(attempts=3, backoff="fixed", initial="300ms", jitter=False),
        resend_after=f.input.resend_after,
    )
    return f.step("write", lambda: effect("write") or {"plan": plan})
