"""Flows the console tests drive: one that waits for an approval, one that fails until fixed.

Imported by the test process and by the fleet's workers (``--import``).
``CRUXTEST_CONSOLE_FIX`` names a file: while it is missing, ``payment``'s charge
step fails; creating it "deploys the fix".
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from crux_workers import FlowContext, flow


class Order(BaseModel):
    order: str
    amount: int = 10


class Approval(BaseModel):
    approved: bool
    by: str
    note: str | None = None


def _charge(amount: int) -> dict[str, Any]:
    fix = os.environ.get("CRUXTEST_CONSOLE_FIX")
    if fix and not Path(fix).exists():
        raise RuntimeError(f"payment gateway refused {amount}")
    return {"charged": amount}


@flow("approval", input=Order)
def approval(f: FlowContext[Order]) -> Any:
    f.step("reserve", lambda: {"reserved": f.input.order})
    got = f.suspend("approval", schema=Approval, timeout="1h")
    f.step("notify", lambda: f"approved by {got.by}")
    return {"order": f.input.order, "approved": got.approved}


@flow("payment", input=Order)
def payment(f: FlowContext[Order]) -> Any:
    f.step("reserve", lambda: {"reserved": f.input.order})
    return f.step("charge", lambda: _charge(f.input.amount))


@flow("memo", input=Order)
def memo(f: FlowContext[Order]) -> Any:
    """Waits for a signal without a schema: the console offers a JSON box."""
    return f.suspend("memo")
