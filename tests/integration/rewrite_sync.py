"""The sync version of async_flows.rewrite: same name, same checkpoints (--import it alone)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from crux_workers import FlowContext, flow
from tests.integration.flows import effect


class Rewrite(BaseModel):
    label: str


@flow("rewrite", input=Rewrite)
def rewrite(f: FlowContext[Rewrite]) -> Any:
    """Suspends at "go" between two steps; resumable by its async rewrite and the reverse."""
    first = f.step("first", lambda: _labelled("first", f.input.label))
    got = f.suspend("go")
    second = f.step("second", lambda: _labelled("second", got))
    return {"first": first, "second": second, "handler": "sync"}


def _labelled(step: str, value: Any) -> str:
    effect(f"{step}-sync")
    return f"{step}:{value}"
