"""Flows the integration tests run on real workers (imported with --import)."""

from __future__ import annotations

import os
import time
from typing import Any

from pydantic import BaseModel

from crux_workers import FlowContext, current_step, flow


def effect(name: str) -> None:
    """Record that a side effect happened (O_APPEND: whole lines, many processes)."""
    info = current_step()
    line = f"{info.flow_id} {name} {os.getpid()}\n".encode()
    fd = os.open(os.environ["CRUXTEST_EFFECTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


class Signup(BaseModel):
    email: str
    name: str
    goal: str


class Verified(BaseModel):
    verified_at: str


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
