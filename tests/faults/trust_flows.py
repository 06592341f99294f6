"""Flows of the trust-boundary fault tests (imported by their workers with --import).

Each step records its side effect in the effects file (see tests/faults/flows.py), so a
test counts how often it really ran.
"""

from __future__ import annotations

import os
from typing import Any

from celery import signature
from pydantic import BaseModel

from crux_workers import FlowContext, flow
from tests.faults.flows import work


class Empty(BaseModel):
    pass


@flow("trust-child", input=Empty)
def waits_for_a_child(f: FlowContext[Empty]) -> Any:
    """Waits on a child routed to a queue no worker reads: only an outcome can end it."""
    approval = f.run_task(
        "approve", signature("elsewhere.approve", queue="nobody-reads-this"), resend_after="10m"
    )
    return {"approval": approval}


@flow("trust-crash", input=Empty)
def crashes(f: FlowContext[Empty]) -> Any:
    """Its step kills its own worker process, every time, before it can commit."""

    def boom() -> None:
        work(0)  # the side effect, recorded before the process dies
        os._exit(17)

    f.step("boom", boom)
    return "never"
