"""Operations on the in-memory store: retry, fork, the send-time check, waiting, retention."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel, Field

from crux_workers import (
    Crux,
    FlowNotFound,
    FlowNotRetryable,
    ForkOrigin,
    InvalidInput,
    InvalidSignal,
    Retry,
    Settings,
)
from crux_workers._ops import retention_tick
from crux_workers._schema_check import schema_errors
from crux_workers._store._memory import MemoryStore
from tests.support.clock import Clock
from tests.support.harness import Harness


class Order(BaseModel):
    item: str


class Approval(BaseModel):
    approved: bool
    reviewer: str = Field(default="", max_length=5)


def test_retry_reruns_the_failed_step_only_with_a_fresh_attempt_count(h: Harness) -> None:
    fixed = {"now": False}
    attempts: list[int] = []

    @h.app.flow("fragile", input=Order)
    def fragile(f: Any) -> Any:
        a = f.step("a", lambda: h.calls.update(["a"]) or f.input.item)

        def b() -> str:
            from crux_workers import current_step

            attempts.append(current_step().attempt)
            if not fixed["now"]:
                raise RuntimeError("broken")
            return "ok"

        return [a, f.step("b", b, retry=Retry(attempts=2, initial=1, jitter=False))]

    run = fragile.run(input={"item": "tea"})
    h.drain()
    h.tick(2)
    assert run.state().status == "failed" and attempts == [1, 2]
    with pytest.raises(FlowNotFound):
        h.app.retry_flow("nope")
    fixed["now"] = True
    assert asyncio.run(h.app.retry_flow_async(run.flow_id)) == "pending"
    h.drain()
    state = run.state()
    assert (state.status, state.result, state.retries) == ("completed", ["tea", "ok"], 1)
    assert attempts == [1, 2, 1] and h.calls == {"a": 1}
    assert len(state.step_errors) == 2
    with pytest.raises(FlowNotRetryable):
        h.app.retry_flow(run.flow_id)


def test_a_fork_at_a_suspend_waits_for_its_own_signal(h: Harness) -> None:
    @h.app.flow("review", input=Order)
    def review(f: Any) -> Any:
        a = f.step("a", lambda: h.calls.update(["a"]) or f.input.item)
        got = f.suspend("approval", schema=Approval)
        return f.step("b", lambda: h.calls.update(["b"]) or [a, got.approved, f.input.item])

    run = review.run(input={"item": "tea"})
    h.drain()
    h.app.signal_flow(run.flow_id, "approval", {"approved": True})
    h.drain()
    fork = h.app.fork_flow(run.flow_id, 1, flow_id="other")
    h.drain()
    assert fork.state().status == "suspended"
    assert fork.state().forked_from == ForkOrigin(flow_id=run.flow_id, at=1)
    h.app.signal_flow("other", "approval", {"approved": False})
    h.drain()
    assert fork.state().result == ["tea", False, "tea"]
    replaced = asyncio.run(h.app.fork_flow_async(run.flow_id, 2, {"item": "coffee"}))
    h.drain()
    assert replaced.state().result == ["tea", True, "coffee"]
    assert h.calls == {"a": 1, "b": 3}
    with pytest.raises(InvalidInput) as err:
        h.app.fork_flow(run.flow_id, 1, {"item": 5})
    assert "invalid input" in str(err.value)
    with pytest.raises(InvalidInput):
        h.app.fork_flow(run.flow_id, True)  # type: ignore[arg-type]


def test_fork_with_a_new_input_needs_the_flow_registered(tmp_path: Path) -> None:
    store = MemoryStore()
    app = Crux(Settings(), store=store, record_only=True)
    store.create_flow("f", "elsewhere", '{"item":"tea"}')
    with pytest.raises(InvalidInput) as err:
        app.fork_flow("f", 0, {"item": "coffee"})
    assert "not registered in this process" in str(err.value)
    assert app.fork_flow("f", 0).state().input == {"item": "tea"}  # the same input: fine
    app.close()


def test_the_send_check_refuses_with_every_error_and_records_nothing(h: Harness) -> None:
    @h.app.flow("gate", input=Order)
    def gate(f: Any) -> Any:
        return f.suspend("approval", schema=Approval).approved

    run = gate.run(input={"item": "tea"})
    h.drain()
    with pytest.raises(InvalidSignal) as err:
        h.app.signal_flow(run.flow_id, "approval", {"reviewer": "much too long"})
    assert [(e["loc"], e["type"]) for e in err.value.errors] == [  # type: ignore[attr-defined]
        (["approved"], "missing"),
        (["reviewer"], "too_long"),
    ]
    assert run.state().signals == []
    with pytest.raises(InvalidSignal):
        h.app.signal_flow(run.flow_id, "approval", [1, 2])
    assert h.app.signal_flow(run.flow_id, "approval", {"approved": "true"}).delivered
    h.drain()
    assert run.state().result is True


def test_waiting_groups_by_kind_and_name(h: Harness) -> None:
    @h.app.flow("gate", input=Order)
    def gate(f: Any) -> Any:
        if f.input.item == "nap":
            f.sleep("nap", "1h")
        return f.suspend("approval", timeout="2h")

    for item in ("tea", "coffee", "nap"):
        gate.run(input={"item": item})
    h.drain()
    groups = [(w.name, w.kind, w.on, w.count) for w in h.app.waiting()]
    assert groups == [("gate", "signal", "approval", 2), ("gate", "sleep", "", 1)]
    assert asyncio.run(h.app.waiting_async(name="gate")) == h.app.waiting(name="gate")
    signal = h.app.waiting(name="gate")[0]
    assert signal.nearest_deadline == h.clock() + timedelta(hours=2)
    assert h.app.waiting(name="other") == []


@pytest.mark.parametrize(
    ("value", "errors"),
    [
        ({"n": "5", "b": "off", "x": 1.0}, []),
        ({"n": 5.5, "b": True}, [(["n"], "type")]),
        ({"n": 1, "b": 2}, [(["b"], "type")]),
        ({"n": 1, "b": True, "kind": "c"}, [(["kind"], "enum")]),
        ({"n": 1, "b": True, "inner": {"tags": ["a", 3]}}, [(["inner", "tags", 1], "type")]),
        ({"n": 1, "b": True, "inner": {}}, [(["inner", "tags"], "missing")]),
        ({"n": 1, "b": True, "inner": 3}, [(["inner"], "anyOf")]),
        ({"n": 1, "b": True, "pair": [1, "two"]}, []),
        ({"n": 1, "b": True, "pair": ["one", 2]}, [(["pair", 0], "type"), (["pair", 1], "type")]),
        ({"n": -1, "b": True}, [(["n"], "minimum")]),
        ({"n": 1, "b": True, "extra": 1}, [(["extra"], "extra_forbidden")]),
        (None, [([], "type")]),
    ],
)
def test_the_schema_check_follows_what_pydantic_accepts(value: Any, errors: Any) -> None:
    class Inner(BaseModel):
        tags: list[str]

    class Payload(BaseModel):
        model_config = {"extra": "forbid"}
        n: int = Field(ge=0)
        b: bool
        x: float = 0.0
        kind: Literal["a", "b"] = "a"
        inner: Inner | None = None
        pair: tuple[int, str] | None = None

    got = schema_errors(Payload.model_json_schema(), value)
    assert [(e["loc"], e["type"]) for e in got] == errors
    # Never stricter than the model itself.
    if not errors:
        Payload.model_validate(value)


def test_retention_purges_once_per_tick_and_only_when_set(tmp_path: Path) -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    off = Crux(Settings(), store=store, record_only=True)
    assert retention_tick(off) is None
    app = Crux(Settings(retention="1d", retention_interval="1h"), store=store, record_only=True)
    store.create_flow("old", "demo", "{}")
    store.cancel("old", "done")
    store.record_rejected("bad_json", "x", "{")
    clock.advance(2 * 86400)
    store.create_flow("young", "demo", "{}")
    store.cancel("young", "done")
    first = retention_tick(app)
    assert first is not None and (first.skipped, first.purged) == (False, 1)
    again = retention_tick(app)  # a second beat, same hour
    assert again is not None and again.skipped and again.tick == first.tick
    assert store.list_rejected() == []
    assert store.get_flow("young").status == "cancelled"
    clock.advance(3600)
    later = retention_tick(app)
    assert later is not None and not later.skipped and later.purged == 0
    off.close()
    app.close()


def test_beat_runs_retention_only_when_it_is_set(tmp_path: Path) -> None:
    common: dict[str, Any] = {
        "database_url": f"sqlite:///{tmp_path}/r.db",
        "redis_url": "redis://127.0.0.1:1/0",
    }
    plain = Crux(Settings(**common))
    assert set(plain.celery.conf.beat_schedule) == {"crux-sweep"}
    assert "crux.retention" in plain.celery.tasks  # a worker takes beat's request anyway
    kept = Crux(Settings(**common, retention="30d", retention_interval="10m"))
    entry = kept.celery.conf.beat_schedule["crux-retention"]
    assert (entry["task"], entry["schedule"]) == ("crux.retention", 600.0)
    assert "crux.retention" in kept.celery.tasks
    plain.close()
    kept.close()
