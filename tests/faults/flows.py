"""Flows the fault tests run on real workers (imported with --import tests.faults.flows).

Every step function records what it does in the effects file (``CRUXTEST_EFFECTS``), one
tab-separated line per event, written with a single O_APPEND write so that lines from
many processes never interleave:

    kind  flow_id  name  occurrence  attempt  pid  unix_time  token

``kind`` is ``start`` when a step's function begins and ``gap`` for code a flow runs
between two steps. A step returns its ``token`` (unique per call), so the committed
result in ``crux_steps`` names exactly which recorded call was the one that committed,
and every other ``start`` of that step is an attempt that never committed.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

from pydantic import BaseModel

from crux_workers import FlowContext, current_step, flow


def record(kind: str, flow_id: str, name: str, occurrence: int, attempt: int, token: str) -> None:
    """Append one event line to the effects file."""
    line = (
        f"{kind}\t{flow_id}\t{name}\t{occurrence}\t{attempt}\t{os.getpid()}\t"
        f"{time.time():.6f}\t{token}\n"
    ).encode()
    fd = os.open(os.environ["CRUXTEST_EFFECTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def work(seconds: float) -> str:
    """A step's side effect: record its start, take ``seconds``, return a unique token."""
    info = current_step()
    token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    record("start", info.flow_id, info.name, info.occurrence, info.attempt, token)
    if seconds > 0:
        time.sleep(seconds)
    return token


class Chain(BaseModel):
    """``steps`` steps "work" of ``seconds`` each; with ``wait``, a signal after the first."""

    steps: int = 3
    seconds: float = 0.1
    wait: bool = False


@flow("fault-chain", input=Chain)
def chain(f: FlowContext[Chain]) -> Any:
    tokens: list[str] = []
    go: Any = None
    for i in range(f.input.steps):
        tokens.append(f.step("work", lambda: work(f.input.seconds)))
        if f.input.wait and i == 0:
            go = f.suspend("go")
    return {"tokens": tokens, "go": go}


class Pausable(BaseModel):
    """A quick step, a long one, a pause between steps, then a last step."""

    long: float = 0.0
    gap: float = 0.0


@flow("fault-pausable", input=Pausable)
def pausable(f: FlowContext[Pausable]) -> Any:
    first = f.step("prep", lambda: work(0))
    long = f.step("long", lambda: work(f.input.long))
    if f.input.gap > 0:
        # Code between two steps (re-run by every replay): an executor paused here holds
        # no step, only its lease, which nobody renews while no step runs.
        record("gap", f.flow_id, "gap", 0, 0, f"{os.getpid()}-gap")
        time.sleep(f.input.gap)
    last = f.step("last", lambda: work(0))
    return [first, long, last]


class Item(BaseModel):
    """The schema signals to the inbox must fit."""

    n: int
    tag: str


class Inbox(BaseModel):
    """Take ``item`` signals until one with tag "stop" arrives."""

    step_seconds: float = 0.0


@flow("fault-inbox", input=Inbox)
def inbox(f: FlowContext[Inbox]) -> Any:
    got: list[Any] = []
    while True:
        item = f.suspend("item", schema=Item)
        if item.tag == "stop":
            return got

        def take(item: Item = item) -> list[Any]:
            return [item.n, item.tag, work(f.input.step_seconds)]

        got.append(f.step("take", take))
