"""DBOS Transact peer of bench/peers.py: the same three workloads as DBOS workflows.

Run as a worker process (DBOS's "queue worker" pattern: the driver enqueues with
``DBOSClient``, each worker dequeues from one queue and runs workflows on its threads):

    BENCH_DBOS_URL=postgresql://... BENCH_DBOS_EXECUTOR=w0 python -m bench.peers_dbos

Optional: ``BENCH_DBOS_CONCURRENCY`` (workflows one worker runs at once, default 8),
``BENCH_DBOS_POLL`` (queue polling interval, seconds, default 0.01), ``BENCH_DBOS_TRACE``
(a file: W3 appends "workflow_id time" each time its body is entered, so the replay
after a restart can be timed from its re-entry).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from dbos import DBOS

APP = "crux_peers"
QUEUE = "peers"
W1 = "peers_w1"
W2 = "peers_w2"
W3 = "peers_w3"
W1_FIRST = "peers_w1_first"
APPROVAL = "approval"
GO = "go"
RECV_TIMEOUT = 600.0


@DBOS.step(name="peers_noop")
def noop(i: int) -> int:
    return i


@DBOS.step(name=W1_FIRST)
def first() -> int:
    return 0


@DBOS.workflow(name=W1)
def w1(i: int) -> int:
    """step -> recv ``approval`` -> step -> step."""
    first()
    DBOS.recv(APPROVAL, timeout_seconds=RECV_TIMEOUT)
    noop(1)
    noop(2)
    return i


@DBOS.workflow(name=W2)
def w2(steps: int) -> int:
    """``steps`` no-op steps."""
    for i in range(steps):
        noop(i)
    return steps


_trace = os.environ.get("BENCH_DBOS_TRACE")


@DBOS.workflow(name=W3)
def w3(k: int) -> int:
    """K completed steps, then recv ``go``."""
    if _trace:  # not durable on purpose: marks where a recovery's replay begins
        with open(_trace, "a") as out:
            out.write(f"{DBOS.workflow_id} {time.time():.6f}\n")
    for i in range(k):
        noop(i)
    DBOS.recv(GO, timeout_seconds=RECV_TIMEOUT)
    return k


def main() -> None:
    DBOS(
        config={
            "name": APP,
            "system_database_url": os.environ["BENCH_DBOS_URL"],
            "executor_id": os.environ["BENCH_DBOS_EXECUTOR"],
            "application_version": "bench",
            "log_level": "WARNING",
        }
    )
    DBOS.launch()
    DBOS.register_queue(
        QUEUE,
        worker_concurrency=int(os.environ.get("BENCH_DBOS_CONCURRENCY", "8")),
        polling_interval_sec=float(os.environ.get("BENCH_DBOS_POLL", "0.01")),
        on_conflict="always_update",
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("ready.", flush=True)
    stop.wait()
    DBOS.destroy(workflow_completion_timeout_sec=0)
    sys.exit(0)


if __name__ == "__main__":
    main()
