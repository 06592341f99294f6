"""The seed's onboarding flow, run end to end on the embedded default by ``crux-workers demo``."""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ._app import Crux
from ._context import FlowContext, current_step
from ._flow import FlowHandle
from ._models import Retry
from ._settings import Settings


class Signup(BaseModel):
    """Who signed up."""

    email: str
    name: str
    goal: str


class Verified(BaseModel):
    """The e-mail verification signal."""

    verified_at: str


def _say(text: str) -> None:
    print(f"  {time.strftime('%H:%M:%S')}  {text}", flush=True)


def define_onboarding(app: Crux) -> FlowHandle[Signup]:
    """Register the seed's onboarding flow on ``app``."""

    def send_welcome(email: str, name: str) -> dict[str, Any]:
        _say(f"[side effect] welcome e-mail to {email} (key {current_step().idempotency_key})")
        return {"sent_to": email, "greeting": f"Welcome, {name}!"}

    def make_plan(signup: Signup) -> list[str]:
        _say(f"[side effect] planning the first week towards {signup.goal!r}")
        return [f"day {d}: one step towards {signup.goal}" for d in (1, 3, 5)]

    def schedule_emails(email: str, plan: list[str]) -> dict[str, Any]:
        _say(f"[side effect] {len(plan)} check-in e-mails scheduled for {email}")
        return {"scheduled": len(plan)}

    @app.flow("onboarding", input=Signup)
    def onboarding(f: FlowContext[Signup]) -> Any:
        f.step("send-welcome", lambda: send_welcome(f.input.email, f.input.name))
        verification = f.suspend("email-verified", schema=Verified, timeout="24h")
        _say(f"[handler] e-mail verified at {verification.verified_at}")
        plan = f.step(
            "first-week-plan",
            lambda: make_plan(f.input),
            retry=Retry(attempts=3, backoff="exponential"),
        )
        return f.step("schedule-checkins", lambda: schedule_emails(f.input.email, plan))

    return onboarding


class _Transitions(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        _say(f"[engine] {record.getMessage()}")


def run_demo(database: Path | None = None) -> int:
    """Start, suspend, signal, resume, complete: printing each transition. Exit code."""
    tmp = tempfile.TemporaryDirectory(prefix="crux-demo-")
    path = database or Path(tmp.name) / "demo.db"
    app = Crux(Settings(database_url=f"sqlite:///{path}"))
    handler = _Transitions()
    logger = logging.getLogger("crux_workers.flow")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        print(f"crux_workers demo: the onboarding flow on the embedded default ({path})")
        onboarding = define_onboarding(app)
        run = onboarding.run(input={"email": "u@example.com", "name": "Henri", "goal": "shipping"})
        _say(f"[demo] started flow {run.flow_id}")
        deadline = time.monotonic() + 30
        while (state := run.state()).status != "suspended":
            if state.finished or time.monotonic() > deadline:
                _say(f"[demo] unexpected status {state.status}")
                return 1
            time.sleep(0.01)
        _say(
            f"[demo] flow is {state.status}, waiting on {state.waiting_on!r} "
            f"until {state.deadline:%Y-%m-%d %H:%M} UTC; no worker is held"
        )
        receipt = app.signal_flow(
            run.flow_id, "email-verified", {"verified_at": "2026-11-21T10:00:00Z"}
        )
        _say(f"[demo] signal {receipt.name!r} recorded as #{receipt.signal_id}")
        outcome = run.wait(timeout=30)
        _say(f"[demo] outcome: {outcome.status}, result {outcome.result}")
        for step in run.state().steps:
            _say(f"[record] #{step.seq} {step.kind:<7} {step.name:<18} -> {step.result}")
        return 0 if outcome.status == "completed" else 1
    finally:
        logger.removeHandler(handler)
        app.close()
        tmp.cleanup()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_demo())
