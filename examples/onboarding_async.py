"""The seed's onboarding flow, async: welcome, verification, plan, paced check-ins.

The same flow as ``examples/onboarding.py`` written with ``async def``; its steps call
async clients (stand-ins here) and are awaited on the worker's flow loop. Run a fleet
with ``crux-workers worker --import examples.onboarding_async`` (plus ``beat``), then::

    from examples.onboarding_async import onboarding
    run = onboarding.run(input={"email": "u@example.com", "name": "Henri", "goal": "shipping"})
    signal_flow(run.flow_id, "email-verified", {"verified_at": "2026-11-21T10:00:00Z"})

A flow that is not verified within ``verify_within`` (24 h by default) ends ``expired``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel

from crux_workers import Retry, current_step, flow


class Signup(BaseModel):
    """Who signed up, and how the check-ins are paced."""

    email: str
    name: str
    goal: str
    verify_within: str = "24h"
    checkins: int = 3
    checkin_every: str = "2d"


class Verified(BaseModel):
    """The e-mail verification signal."""

    verified_at: str


async def send_welcome(email: str, name: str) -> dict[str, Any]:
    """Stand-in for an async mailer; the idempotency key lets a real one drop repeats."""
    await asyncio.sleep(0)
    return {"to": email, "greeting": f"Welcome, {name}!", "key": current_step().idempotency_key}


async def make_plan(signup: Signup) -> list[str]:
    """Stand-in for a planner that may fail transiently (hence the retry policy)."""
    await asyncio.sleep(0)
    return [f"day {d}: one step towards {signup.goal}" for d in (1, 3, 5)]


async def send_checkin(email: str, n: int, plan: list[str]) -> dict[str, Any]:
    """Stand-in for a check-in e-mail."""
    await asyncio.sleep(0)
    return {"to": email, "checkin": n, "about": plan[(n - 1) % len(plan)]}


@flow("onboarding-async", input=Signup)
async def onboarding(f: Any) -> dict[str, Any]:
    """Welcome, wait for verification, plan with retries, then paced check-ins."""
    s = f.input
    await f.step("send-welcome", lambda: send_welcome(s.email, s.name))
    verified = await f.suspend("email-verified", schema=Verified, timeout=s.verify_within)
    plan = await f.step(
        "first-week-plan",
        lambda: make_plan(s),
        retry=Retry(attempts=3, backoff="exponential"),
    )
    for n in range(1, s.checkins + 1):
        await f.sleep("until-checkin", s.checkin_every)
        await f.step("checkin", lambda n=n: send_checkin(s.email, n, plan))
    return {"verified_at": verified.verified_at, "plan": plan, "checkins": s.checkins}
