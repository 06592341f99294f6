"""Metrics and Celery events from real workers, real Postgres and real Redis.

The exporter (`crux-workers metrics`) serves the record's gauges; a prefork worker with
CRUX_METRICS_PORT serves its pool processes' counters, summed (multiprocess mode); a
worker started with -E sends task-crux-step and task-crux-flow events.
"""

from __future__ import annotations

import contextlib
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.servers import free_port
from tests.support.fleet import Fleet
from tests.workers import Service, Worker

SIGNUP = {"email": "u@example.com", "name": "Henri", "goal": "shipping"}
VERIFIED = {"verified_at": "2026-11-21T10:00:00Z"}


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as got:
        text = got.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def total(samples: dict[Any, float], name: str, **labels: str) -> float:
    """Sum over every sample of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def eventually(check: Callable[[], bool], timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not reached in {timeout}s: {what}"
        time.sleep(0.2)


def test_metrics_move_with_the_flows_and_the_gauges_match_the_record(fleet: Fleet) -> None:
    worker_port, exporter_port = free_port(), free_port()
    env = {**fleet.env, "CRUX_METRICS_PORT": str(worker_port)}
    worker = Worker("w1", env, fleet.tmp, concurrency=2, imports=fleet.flows_module)
    fleet.workers.append(worker)
    worker.wait_ready(timeout=fleet.ready_timeout)
    fleet.beat()
    exporter = Service(
        "metrics", fleet.env, fleet.tmp, "metrics", "--port", str(exporter_port)
    ).wait_for("metrics: http://")
    try:
        onboarding = fleet.flows["onboarding"]
        runs = [onboarding.run(input=SIGNUP) for _ in range(6)]
        ids = [r.flow_id for r in runs]

        def suspended() -> bool:
            st = fleet.statuses()
            return all(st.get(i) == "suspended" for i in ids)

        eventually(suspended, what="all six flows suspended at email-verified")

        # The gauges say what the record says.
        gauges = scrape(exporter_port)
        assert value(gauges, "crux_record_up") == 1
        by_status = dict(
            fleet.query(
                "SELECT status, count(*) FROM crux_flows WHERE name = 'onboarding' GROUP BY 1"
            )
        )
        assert by_status == {"suspended": 6}
        assert value(gauges, "crux_flows", flow="onboarding", status="suspended") == 6
        assert value(gauges, "crux_flows_waiting", kind="signal", on="email-verified") == 6
        assert total(gauges, "crux_flows_due") == 0

        counters = scrape(worker_port)
        assert value(counters, "crux_steps_committed_total", flow="onboarding", kind="step") == 6
        assert value(counters, "crux_executions_total", flow="onboarding", outcome="suspended") == 6
        assert (
            value(counters, "crux_resume_latency_seconds_count", flow="onboarding", wake="start")
            == 6
        )

        for run in runs:
            fleet.app.signal_flow(run.flow_id, "email-verified", VERIFIED)
        for run in runs:
            assert run.wait(timeout=60).status == "completed"

        counters = scrape(worker_port)
        # Counted in two pool processes, served summed by the worker's main process.
        assert value(counters, "crux_steps_committed_total", flow="onboarding", kind="step") == 18
        assert value(counters, "crux_steps_committed_total", flow="onboarding", kind="suspend") == 6
        assert value(counters, "crux_executions_total", flow="onboarding", outcome="completed") == 6
        assert (
            value(counters, "crux_resume_latency_seconds_count", flow="onboarding", wake="run") == 6
        )
        assert value(counters, "crux_step_duration_seconds_count", flow="onboarding") == 18
        eventually(
            lambda: (total(scrape(worker_port), "crux_sweeps_total", outcome="swept") or 0) >= 1,
            what="a sweep counted",
        )

        gauges = scrape(exporter_port)
        assert value(gauges, "crux_flows", flow="onboarding", status="completed") == 6
        assert value(gauges, "crux_flows", flow="onboarding", status="suspended") is None
        assert total(gauges, "crux_flows_waiting") == 0
        assert value(gauges, "crux_sweep_last_timestamp_seconds") is not None
    finally:
        exporter.kill()


def test_a_worker_with_events_on_sends_each_step_on_the_flows_task(fleet: Fleet) -> None:
    worker = fleet.worker("w1", extra=("-E",))
    celery = fleet.app.celery
    events: list[dict[str, Any]] = []
    lock = threading.Lock()

    def record(event: dict[str, Any]) -> None:
        with lock:
            events.append(event)

    with celery.connection_for_read() as conn:
        receiver = celery.events.Receiver(conn, handlers={"*": record})
        ready = threading.Event()

        def capture() -> None:
            ready.set()
            with contextlib.suppress(TimeoutError):  # socket.timeout is TimeoutError
                receiver.capture(limit=None, timeout=90, wakeup=False)

        thread = threading.Thread(target=capture, daemon=True)
        thread.start()
        ready.wait(10)
        # The receiver's queue exists once it consumes: ping until it hears its own ping.
        eventually(lambda: _pinged(celery, events, lock), what="the receiver is listening")
        run = fleet.flows["onboarding"].run(input=SIGNUP)

        def ours(kind: str) -> list[dict[str, Any]]:
            with lock:
                return [
                    e for e in events if e.get("crux_flow_id") == run.flow_id and e["type"] == kind
                ]

        eventually(lambda: bool(ours("task-crux-flow")), what="the first execution's end event")
        fleet.app.signal_flow(run.flow_id, "email-verified", VERIFIED)
        assert run.wait(timeout=30).status == "completed"
        eventually(
            lambda: len(ours("task-crux-flow")) == 2, what="the second execution's end event"
        )
        receiver.should_stop = True
        thread.join(timeout=10)
    assert worker.proc.poll() is None

    with lock:
        crux = [e for e in events if e.get("crux_flow_id") == run.flow_id]
        received = {e["uuid"] for e in events if e["type"] == "task-received"}
        results = {e["uuid"]: e["result"] for e in events if e["type"] == "task-succeeded"}
    got = [(e["type"], e["crux_status"], e.get("crux_step")) for e in crux]
    assert got == [
        ("task-crux-step", "committed", "send-welcome"),
        ("task-crux-step", "suspended", "email-verified"),
        ("task-crux-flow", "suspended", None),
        ("task-crux-step", "committed", "email-verified"),
        ("task-crux-step", "committed", "first-week-plan"),
        ("task-crux-step", "committed", "schedule-checkins"),
        ("task-crux-flow", "completed", None),
    ]
    assert all(e["crux_flow"] == "onboarding" for e in crux)
    # Each on the id of the Celery task that ran that execution (the task Flower lists).
    first, second = crux[0]["uuid"], crux[3]["uuid"]
    assert first != second and {e["uuid"] for e in crux} == {first, second}
    assert {first, second} <= received
    # Celery's own task-succeeded carries the execution's summary (Flower's Result column).
    assert "'outcome': 'suspended'" in results[first] and run.flow_id in results[first]
    assert "'outcome': 'completed'" in results[second]


def _pinged(celery: Any, events: list[dict[str, Any]], lock: threading.Lock) -> bool:
    with celery.events.default_dispatcher(hostname="test-ping") as dispatcher:
        dispatcher.send("worker-test-ping")
    time.sleep(0.3)
    with lock:
        return any(e["type"] == "worker-test-ping" for e in events)
