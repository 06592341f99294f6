"""crux_workers flows of bench/peers.py (W1, W2, W3), shared by the driver and its workers.

The workers import this module with ``--import bench.peers_crux`` and
``BENCH_PEERS_WORKER=1``: the flows are then registered on the default app (configured
from ``CRUX_*``). The driver imports it without that variable and calls ``define(app)``
on its own app.

Diagnosis only (``bench/peers.py --profile``): with ``BENCH_PEERS_TRACE=FILE`` a worker
wraps the record's and the cache's methods and appends "flow_id op start end" (wall
clock) per call to FILE, so the driver can lay out one resume's timeline. The engine's
code is not changed; the timed runs never set the variable.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from pydantic import BaseModel

from crux_workers import Crux, FlowContext, FlowHandle, default_app

W1 = "peers_w1"
W2 = "peers_w2"
W3 = "peers_w3"
APPROVAL = "approval"
GO = "go"


class W1Input(BaseModel):
    i: int = 0


class W2Input(BaseModel):
    steps: int = 10


class W3Input(BaseModel):
    k: int = 10


def _noop(i: int) -> int:
    return i


def w1_flow(f: FlowContext[W1Input]) -> int:
    """step -> suspend for ``approval`` -> step -> step."""
    f.step("a", partial(_noop, 0))
    f.suspend(APPROVAL)
    f.step("b", partial(_noop, 1))
    f.step("c", partial(_noop, 2))
    return f.input.i


def w2_flow(f: FlowContext[W2Input]) -> int:
    """``steps`` no-op steps, no suspend."""
    for i in range(f.input.steps):
        f.step(f"s{i}", partial(_noop, i))
    return f.input.steps


def w3_flow(f: FlowContext[W3Input]) -> int:
    """K completed steps, then a suspend: every resume replays the K steps."""
    for i in range(f.input.k):
        f.step(f"s{i}", partial(_noop, i))
    f.suspend(GO)
    return f.input.k


def define(
    app: Crux,
) -> tuple[FlowHandle[W1Input], FlowHandle[W2Input], FlowHandle[W3Input]]:
    """Register the three flows on ``app``."""
    return (
        app.flow(W1, input=W1Input)(w1_flow),
        app.flow(W2, input=W2Input)(w2_flow),
        app.flow(W3, input=W3Input)(w3_flow),
    )


TRACED: list[tuple[str, str, str]] = [  # (module, class, method) of what a trace times
    ("crux_workers._app", "Crux", "execute"),
    ("crux_workers._store._sql", "SqlStore", "claim"),
    ("crux_workers._store._cache", "RedisStepCache", "load"),
    ("crux_workers._store._sql", "SqlStore", "load_checkpoints"),
    ("crux_workers._store._sql", "SqlStore", "take_signal_or_suspend"),
    ("crux_workers._store._sql", "SqlStore", "commit_checkpoint"),
    ("crux_workers._store._cache", "RedisStepCache", "fill"),
    ("crux_workers._store._sql", "SqlStore", "finish"),
    ("crux_workers._store._cache", "RedisStepCache", "drop"),
]


def install_trace(path: str) -> None:
    """Wrap the methods in ``TRACED`` to append "flow_id op start end" lines to ``path``."""
    import importlib

    out = open(path, "a", buffering=1)  # noqa: SIM115 - kept open for the process's life

    def flow_of(args: tuple[Any, ...]) -> str:
        for a in args:
            if isinstance(a, str):
                return a
            fid = getattr(a, "flow_id", None)
            if isinstance(fid, str):
                return fid
        return "?"

    def wrap(name: str, fn: Callable[..., Any], skip: int) -> Callable[..., Any]:
        @functools.wraps(fn)
        def traced(self: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.time()
            try:
                return fn(self, *args, **kwargs)
            finally:
                out.write(f"{flow_of(args[skip:])} {name} {t0:.6f} {time.time():.6f}\n")

        return traced

    for module, cls_name, method in TRACED:
        cls = getattr(importlib.import_module(module), cls_name)
        fn = getattr(cls, method, None)
        if fn is not None:
            skip = 1 if method == "execute" else 0  # execute(flow_name, flow_id)
            setattr(cls, method, wrap(method, fn, skip))


if os.environ.get("BENCH_PEERS_WORKER") == "1":
    define(default_app())
    if os.environ.get("BENCH_PEERS_TRACE"):
        install_trace(os.environ["BENCH_PEERS_TRACE"])
