"""Async flows the integration tests run on real workers (imported with --import).

Names start with ``a-`` beside the sync flows of tests/integration/flows.py, except
``rewrite``: tests/integration/rewrite_sync.py holds its sync version, under the same name
and with the same checkpoints, so a flow can suspend under one and resume under the other.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from celery import signature
from pydantic import BaseModel

from crux_workers import Retry, current_step, flow
from crux_workers._context_async import AsyncFlowContext
from crux_workers._demo import Signup, Verified
from tests.integration.flows import Flaky, Long, Nap, Poll, Sleepy, Timed, Topic, effect


async def aeffect(name: str) -> None:
    """``effect`` after a real await: the step's context survives the suspension."""
    await asyncio.sleep(0)
    effect(name)


@flow("a-onboarding", input=Signup)
async def a_onboarding(f: AsyncFlowContext[Signup]) -> Any:
    async def welcome() -> dict[str, str]:
        await aeffect("send-welcome")
        return {"to": f.input.email}

    await f.step("send-welcome", welcome)
    verified = await f.suspend("email-verified", schema=Verified, timeout="24h")
    plan = await f.step("first-week-plan", lambda: effect("first-week-plan") or [f.input.goal])
    done = await f.step("schedule-checkins", lambda: _checkins(plan))
    return {"verified_at": verified.verified_at, "checkins": done, "pid": os.getpid()}


async def _checkins(plan: list[str]) -> int:
    await aeffect("schedule-checkins")
    return len(plan)


@flow("a-fan-out", input=Sleepy)
async def a_fan_out(f: AsyncFlowContext[Sleepy]) -> Any:
    async def one(i: int) -> int:
        await asyncio.sleep(f.input.seconds)
        return i

    async def fan_out() -> list[int]:
        effect("fan-out")
        return list(await asyncio.gather(one(1), one(2), one(3)))

    return await f.step("fan-out", fan_out)


@flow("a-slow", input=Sleepy)
async def a_slow(f: AsyncFlowContext[Sleepy]) -> Any:
    await f.step("before", lambda: aeffect("before"))

    async def nap() -> str:
        effect("slow-start")
        await asyncio.sleep(f.input.seconds)
        effect("slow-end")
        return "rested"

    rested = await f.step("slow", nap)
    return await f.step("after", lambda: effect("after") or rested)


@flow("a-timed", input=Timed)
async def a_timed(f: AsyncFlowContext[Timed]) -> Any:
    await f.step("before", lambda: aeffect("before"))
    return await f.suspend("go", timeout=f.input.timeout)


async def _failing_call(failures: int) -> str:
    info = current_step()
    await aeffect("attempt")
    with open(os.environ["CRUXTEST_EFFECTS"]) as fh:
        calls = sum(1 for line in fh if line.startswith(f"{info.flow_id} attempt "))
    if calls <= failures:
        raise RuntimeError(f"transient failure on call {calls} (attempt {info.attempt})")
    return f"ok on call {calls}"


@flow("a-flaky", input=Flaky)
async def a_flaky(f: AsyncFlowContext[Flaky]) -> Any:
    await f.step("before", lambda: aeffect("before"))
    return await f.step(
        "call",
        lambda: _failing_call(f.input.failures),
        retry=Retry(attempts=f.input.attempts, backoff="fixed", initial="500ms", jitter=False),
    )


@flow("a-napper", input=Nap)
async def a_napper(f: AsyncFlowContext[Nap]) -> Any:
    await f.step("before", lambda: aeffect("before"))
    await f.sleep("nap", f.input.duration)
    return await f.step("after", lambda: effect("after") or "awake")


@flow("a-poller", input=Poll)
async def a_poller(f: AsyncFlowContext[Poll]) -> Any:
    await f.step("before", lambda: aeffect("before"))

    async def check() -> Any:
        effect("check")
        # Blocking calls leave the flow loop: a thread does the file system access.
        seen = await asyncio.to_thread(os.path.exists, f.input.flag)
        return seen and {"seen": True}

    got = await f.wait_until("flag", check, every=f.input.every, timeout="60s")
    await f.step("after", lambda: aeffect("after"))
    return got


@flow("a-long", input=Long)
async def a_long(f: AsyncFlowContext[Long]) -> Any:
    await f.step("before", lambda: aeffect("before"))

    async def work() -> str:
        effect("long-start")
        try:
            await asyncio.sleep(f.input.seconds)
            effect("long-end")
            return "done"
        finally:
            effect("long-finally")

    await f.step("long", work)
    await f.step("next", lambda: aeffect("next"))
    return "unreachable if cancelled"


@flow("a-delegating", input=Topic)
async def a_delegating(f: AsyncFlowContext[Topic]) -> Any:
    plan = await f.run_task(
        "plan",
        signature("children.plan", queue="children"),
        f.input.topic,
        fail_times=f.input.fail_times,
        retry=Retry(attempts=3, backoff="fixed", initial="300ms", jitter=False),
    )

    async def write() -> dict[str, Any]:
        await aeffect("write")
        return {"plan": plan}

    return await f.step("write", write)


class Rewrite(BaseModel):
    label: str


@flow("rewrite", input=Rewrite)
async def rewrite(f: AsyncFlowContext[Rewrite]) -> Any:
    """The async rewrite of rewrite_sync.rewrite: the same checkpoints, in the same order."""
    first = await f.step("first", lambda: _labelled("first", f.input.label))
    got = await f.suspend("go")
    second = await f.step("second", lambda: _labelled("second", got))
    return {"first": first, "second": second, "handler": "async"}


async def _labelled(step: str, value: Any) -> str:
    await aeffect(f"{step}-async")
    return f"{step}:{value}"
