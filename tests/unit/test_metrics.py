"""Metrics, spans and observers on the in-memory store, driven by hand on a fake clock."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from crux_workers import Retry
from crux_workers.cli import main
from crux_workers.errors import StoreError
from crux_workers.ops import (
    RecordCollector,
    install_metrics,
    install_tracing,
    metrics_asgi_app,
    metrics_registry,
    metrics_wsgi_app,
)
from tests.support.harness import Harness


class Empty(BaseModel):
    pass


class Approval(BaseModel):
    ok: bool


def _define(h: Harness) -> Any:
    @h.app.flow("review", input=Empty)
    def review(f: Any) -> Any:
        f.step("draft", lambda: h.calls.update(["draft"]) or "text")
        decision = f.suspend("approve", schema=Approval)
        return f.step("publish", lambda: decision.ok)

    return review


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_the_record_gauges_count_flows_waits_and_the_due_backlog(h: Harness) -> None:
    review = _define(h)
    waiting = review.run(input={})
    h.drain()
    h.clock.advance(7)
    review.run(input={})  # recorded, not yet executed: due
    h.clock.advance(5)
    registry = metrics_registry(h.app)
    assert _value(registry, "crux_record_up") == 1
    assert _value(registry, "crux_flows", flow="review", status="suspended") == 1
    assert _value(registry, "crux_flows", flow="review", status="pending") == 1
    assert _value(registry, "crux_flows_waiting", kind="signal", on="approve") == 1
    assert _value(registry, "crux_flows_due", flow="review") == 1
    assert _value(registry, "crux_flows_due_oldest_age_seconds") == 5
    h.drain()
    h.app.signal_flow(waiting.flow_id, "approve", {"ok": True})
    h.drain()
    assert _value(registry, "crux_flows", flow="review", status="completed") == 1
    assert _value(registry, "crux_flows_waiting", kind="signal", on="approve") == 1
    assert _value(registry, "crux_flows_due", flow="review") is None
    assert _value(registry, "crux_flows_due_oldest_age_seconds") == 0


def test_a_record_that_does_not_answer_is_reported_down_not_raised() -> None:
    def down() -> Any:
        raise StoreError("database error on postgresql://u@db/x: refused")

    registry = CollectorRegistry()
    registry.register(RecordCollector(down))
    assert registry.get_sample_value("crux_record_up") == 0
    assert registry.get_sample_value("crux_flows_due") is None


def test_counters_follow_steps_executions_latency_and_sweeps(h: Harness) -> None:
    counters = install_metrics(h.app)
    assert install_metrics(h.app) is counters  # once per app
    review = _define(h)

    attempts = []

    @h.app.flow("flaky", input=Empty)
    def flaky(f: Any) -> Any:
        def once_broken() -> str:
            attempts.append(1)
            if len(attempts) == 1:
                raise RuntimeError("first attempt fails")
            return "ok"

        return f.step("call", once_broken, retry=Retry(attempts=2, initial="10s", jitter=False))

    run = review.run(input={})
    flaky.run(input={})
    h.drain()
    h.clock.advance(3)
    h.app.signal_flow(run.flow_id, "approve", {"ok": True})
    h.clock.advance(2)  # the resume is claimed 2s after the signal was recorded
    h.drain()
    h.tick(10)  # the retry's backoff passes; the sweep publishes it
    r = metrics_registry(h.app, record=False)
    assert _value(r, "crux_steps_committed_total", flow="review", kind="step") == 2
    assert _value(r, "crux_steps_committed_total", flow="review", kind="suspend") == 1
    assert _value(r, "crux_steps_committed_total", flow="flaky", kind="step") == 1
    assert _value(r, "crux_steps_failed_total", flow="flaky", outcome="retry") == 1
    assert _value(r, "crux_executions_total", flow="review", outcome="suspended") == 1
    assert _value(r, "crux_executions_total", flow="review", outcome="completed") == 1
    assert _value(r, "crux_executions_total", flow="flaky", outcome="completed") == 1
    assert _value(r, "crux_resume_latency_seconds_count", flow="review", wake="run") == 1
    assert _value(r, "crux_resume_latency_seconds_sum", flow="review", wake="run") == 2
    # The sweep marks the retry due (wake "run") at the instant it publishes it.
    assert _value(r, "crux_resume_latency_seconds_count", flow="flaky", wake="run") == 1
    assert _value(r, "crux_resume_latency_seconds_sum", flow="flaky", wake="run") == 0
    assert _value(r, "crux_resume_latency_seconds_count", flow="flaky", wake="start") == 1
    assert _value(r, "crux_resume_latency_seconds_count", flow="review", wake="start") == 1
    assert _value(r, "crux_step_duration_seconds_count", flow="review") == 2
    assert _value(r, "crux_sweeps_total", outcome="swept") == 1
    assert _value(r, "crux_sweep_repairs_total", action="published") == 1
    assert _value(r, "crux_flows") is None  # record=False: only this process's counters


def test_an_observer_that_raises_does_not_change_the_flow(h: Harness) -> None:
    class Broken:
        def __getattr__(self, name: str) -> Any:
            def fail(*args: Any) -> None:
                raise RuntimeError(f"observer bug in {name}")

            return fail

    h.app.runtime.observers.add(Broken())  # type: ignore[arg-type]
    review = _define(h)
    run = review.run(input={})
    h.drain()
    h.app.signal_flow(run.flow_id, "approve", {"ok": False})
    h.drain()
    outcome = run.outcome()
    assert outcome is not None and outcome.status == "completed" and outcome.result is False


def test_spans_nest_steps_and_suspends_under_each_execution(h: Harness) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    install_tracing(h.app, provider.get_tracer("test"))
    review = _define(h)
    run = review.run(input={})
    h.drain()
    h.app.signal_flow(run.flow_id, "approve", {"ok": True})
    h.drain()
    spans = exporter.get_finished_spans()
    names = [s.name for s in spans]
    assert names == [
        "crux.step draft",
        "crux.suspend approve",
        "crux.flow review",
        "crux.step approve",
        "crux.step publish",
        "crux.flow review",
    ]
    flows = [s for s in spans if s.name == "crux.flow review"]
    assert [f.attributes["crux.outcome"] for f in flows] == ["suspended", "completed"]  # type: ignore[index]
    assert all(s.attributes["crux.flow_id"] == run.flow_id for s in spans)  # type: ignore[index]
    for span in spans:
        if span.name != "crux.flow review":
            parent = span.parent
            assert parent is not None
            assert parent.span_id in {f.context.span_id for f in flows}  # type: ignore[union-attr]
    step = next(s for s in spans if s.name == "crux.step approve")
    assert step.attributes["crux.kind"] == "suspend"  # type: ignore[index]


def test_the_wsgi_and_asgi_apps_serve_the_metrics(h: Harness) -> None:
    _define(h).run(input={})
    got: list[str] = []
    body = b"".join(
        metrics_wsgi_app(h.app)(
            {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": ""},
            lambda status, headers: got.append(status),
        )
    )
    assert got == ["200 OK"] and b'crux_flows_due{flow="review"} 1.0' in body

    sent: list[dict[str, Any]] = []

    async def call() -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/metrics", "query_string": b"",
                 "headers": []}  # fmt: skip
        await metrics_asgi_app(h.app)(scope, receive, send)

    asyncio.run(call())
    assert sent[0]["status"] == 200
    assert b'crux_flows{flow="review",status="pending"} 1.0' in sent[1]["body"]


def test_the_due_and_metrics_commands_read_the_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from crux_workers import Crux, Settings

    url = f"sqlite:///{tmp_path}/crux.db"
    app = Crux(Settings(database_url=url), record_only=True)

    @app.flow("later", input=Empty)
    def later(f: Any) -> Any:
        return None

    later.run(input={})
    later.run(input={})
    app.close()
    for key in [k for k in __import__("os").environ if k.startswith("CRUX_")]:
        monkeypatch.delenv(key)
    env = {"CRUX_DATABASE_URL": url}
    runner = CliRunner()
    got = runner.invoke(main, ["due"], env=env)
    assert got.exit_code == 0, got.output
    assert got.output.strip() == "2"
    as_json = json.loads(runner.invoke(main, ["due", "--json", "--flow", "later"], env=env).output)
    assert as_json["due"] == 2 and as_json["by_flow"] == {"later": 2}
    exposed = runner.invoke(main, ["metrics", "--once"], env=env)
    assert exposed.exit_code == 0, exposed.output
    assert 'crux_flows_due{flow="later"} 2.0' in exposed.output
    assert "crux_record_up 1.0" in exposed.output
