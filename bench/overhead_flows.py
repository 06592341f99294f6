"""Flows of bench/overhead.py, shared by the benchmark process and its Celery worker.

The worker imports this module with ``--import bench.overhead_flows`` and the
``BENCH_OVERHEAD_WORKER=1`` environment variable: the flows and a raw Celery task
are then registered on the default app (configured from ``CRUX_*``). The benchmark
process imports it without that variable and calls ``define(app)`` on its own app.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

from pydantic import BaseModel

from crux_workers import Crux, FlowContext, FlowHandle, default_app

STEPS = "bench_steps"  # identifiers: before a67d646 a "." or "-" broke Celery registration
TICKS = "bench_ticks"
ASTEPS = "bench_steps_async"
ATICKS = "bench_ticks_async"
RAW_TASK = "bench.raw_incr"


class Steps(BaseModel):
    n: int


class Ticks(BaseModel):
    pre: int = 0  # completed steps before the first suspend (replayed on every resume)
    ticks: int = 1  # sequential suspends
    post: int = 0  # steps after the last suspend
    signal: str = "tick"


def _noop(i: int) -> int:
    return i


def steps_flow(f: FlowContext[Steps]) -> int:
    for i in range(f.input.n):
        f.step(f"s{i}", partial(_noop, i))
    return f.input.n


def ticks_flow(f: FlowContext[Ticks]) -> int:
    for i in range(f.input.pre):
        f.step(f"s{i}", partial(_noop, i))
    for _ in range(f.input.ticks):
        f.suspend(f.input.signal)
    for i in range(f.input.post):
        f.step(f"p{i}", partial(_noop, i))
    return f.input.ticks


async def steps_flow_async(f: Any) -> int:
    for i in range(f.input.n):
        await f.step(f"s{i}", partial(_noop, i))
    return int(f.input.n)


async def ticks_flow_async(f: Any) -> int:
    for i in range(f.input.pre):
        await f.step(f"s{i}", partial(_noop, i))
    for _ in range(f.input.ticks):
        await f.suspend(f.input.signal)
    for i in range(f.input.post):
        await f.step(f"p{i}", partial(_noop, i))
    return int(f.input.ticks)


def define_async(app: Crux) -> tuple[FlowHandle[Steps], FlowHandle[Ticks]]:
    """The same flows as ``async def`` handlers (same checkpoints)."""
    return (
        app.flow(ASTEPS, input=Steps)(steps_flow_async),
        app.flow(ATICKS, input=Ticks)(ticks_flow_async),
    )


def define(app: Crux) -> tuple[FlowHandle[Steps], FlowHandle[Ticks]]:
    """Register the benchmark flows on ``app``."""
    return app.flow(STEPS, input=Steps)(steps_flow), app.flow(TICKS, input=Ticks)(ticks_flow)


def define_raw_task(app: Crux) -> Any:
    """A plain Celery task on the same app and queue: one Redis INCR, for a raw hop."""
    import redis

    url = app.settings.redis_url
    assert url is not None
    client = redis.Redis.from_url(url)

    def raw_incr(key: str) -> None:
        client.incr(key)

    return app.celery.task(name=RAW_TASK, ignore_result=True, shared=False)(raw_incr)


if os.environ.get("BENCH_OVERHEAD_WORKER") == "1":
    define(default_app())
    define_raw_task(default_app())
