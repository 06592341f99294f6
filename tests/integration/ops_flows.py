"""Flows the operations tests run on real workers (imported with --import)."""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel

from crux_workers import FlowContext, Retry, flow
from tests.integration.flows import effect


class Fixable(BaseModel):
    flag: str  # a file: the "fix" is that it exists
    tag: str = "x"


class Decision(BaseModel):
    approve: bool
    note: str = ""


def _needs_flag(path: str) -> str:
    effect("check-flag")
    if not os.path.exists(path):
        raise RuntimeError(f"not fixed yet: {path} is missing")
    return "fixed"


@flow("fixable", input=Fixable)
def fixable(f: FlowContext[Fixable]) -> Any:
    first = f.step("prepare", lambda: effect("prepare") or f"prepared {f.input.tag}")
    fixed = f.step(
        "needs-fix", lambda: _needs_flag(f.input.flag), retry=Retry(attempts=2, initial=0.1)
    )
    return f.step("finish", lambda: effect("finish") or [first, fixed, f.input.tag])


@flow("decide", input=Fixable)
def decide(f: FlowContext[Fixable]) -> Any:
    prepared = f.step("prepare", lambda: effect("prepare") or f"for {f.input.tag}")
    decision = f.suspend("decision", schema=Decision, timeout="1h")
    verdict = "approved" if decision.approve else "rejected"
    return f.step("act", lambda: effect(f"act-{verdict}") or [prepared, verdict, f.input.tag])
