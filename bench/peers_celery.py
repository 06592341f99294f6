"""Raw Celery peer of bench/peers.py: one tiny task, chained; no durability at all.

Workers: ``python -m celery -A bench.peers_celery worker ...`` with ``BENCH_CELERY_BROKER``
(a Redis URL) set. The Celery configuration is crux_workers' own (JSON, acks_late,
prefetch 1, no result backend), so the difference to crux is the durable record only.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery, chain

QUEUE = "peers_raw"
TASK = "peers.tiny"

app = Celery("peers_raw", broker=os.environ.get("BENCH_CELERY_BROKER"), set_as_current=False)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    result_backend=None,
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
)

_client: redis.Redis | None = None


def _redis() -> redis.Redis:
    global _client
    if _client is None:  # per process: prefork children connect after the fork
        _client = redis.Redis.from_url(os.environ["BENCH_CELERY_BROKER"])
    return _client


@app.task(name=TASK, acks_late=True, ignore_result=True, shared=False)  # type: ignore[untyped-decorator]
def tiny(fid: str, out: str | None = None) -> None:
    """A no-op; with ``out``, push "fid time" to that Redis list (the observed end)."""
    if out:
        _redis().rpush(out, f"{fid} {time.time():.6f}")


def tiny_chain(fid: str, length: int, out: str) -> Any:
    """``length`` tiny tasks in a chain; the last one reports to ``out``."""
    sigs = [tiny.si(fid) for _ in range(length - 1)] + [tiny.si(fid, out)]
    return chain(*sigs) if length > 1 else sigs[0]
