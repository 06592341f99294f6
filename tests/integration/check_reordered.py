"""``crux-workers check`` fixtures: version 1 charging before it reserves."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from crux_workers import flow


class Order(BaseModel):
    item: str
    qty: int = 1


class Approval(BaseModel):
    approved: bool
    by: str


class Receipt(BaseModel):
    order_id: str
    total: float


def reserve(item: str, qty: int) -> dict[str, Any]:
    return {"item": item, "qty": qty}


def charge(item: str, qty: int) -> Receipt:
    return Receipt(order_id=f"o-{item}", total=9.5 * qty)


async def charge_async(item: str, qty: int) -> Receipt:
    return charge(item, qty)


@flow("check-order", input=Order)
def order(f: Any) -> str:
    o = f.input
    f.step("charge", lambda: charge(o.item, o.qty))
    f.step("reserve", lambda: reserve(o.item, o.qty))
    f.suspend("approval", schema=Approval, timeout="7d")
    f.suspend("delivered", timeout="30d")
    return "done"


@flow("check-order-async", input=Order)
async def order_async(f: Any) -> str:
    o = f.input
    await f.step("charge", lambda: charge_async(o.item, o.qty))
    await f.step("reserve", lambda: reserve(o.item, o.qty))
    await f.suspend("approval", schema=Approval, timeout="7d")
    await f.suspend("delivered", timeout="30d")
    return "done"
