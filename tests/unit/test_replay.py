"""The replay engine against the in-memory store: no servers, no Celery."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic import BaseModel

from crux_workers import (
    FlowIdConflict,
    FlowNotFound,
    FlowNotWaiting,
    InvalidInput,
    InvalidSignal,
    current_step,
)
from crux_workers._store._types import Lease, Suspension
from crux_workers.errors import LeaseLost
from tests.support.harness import Harness


class Empty(BaseModel):
    pass


class Order(BaseModel):
    item: str
    qty: int


class Approval(BaseModel):
    approved: bool


def define_onboarding(h: Harness) -> Any:
    @h.app.flow("onboarding", input=Order)
    def onboarding(f: Any) -> Any:
        a = f.step("a", lambda: h.calls.update(["a"]) or {"item": f.input.item})
        got = f.suspend("approval", schema=Approval)
        b = f.step("b", lambda: h.calls.update(["b"]) or got.approved)
        return {"a": a, "b": b}

    return onboarding


def test_completed_steps_never_run_again_across_suspend_and_resume(h: Harness) -> None:
    flow = define_onboarding(h)
    run = flow.run(input={"item": "tea", "qty": 2})
    h.drain()
    assert run.state().status == "suspended"
    assert run.state().waiting_on == "approval"
    h.app.signal_flow(run.flow_id, "approval", {"approved": True})
    h.drain()
    outcome = run.outcome()
    assert outcome is not None and outcome.status == "completed"
    assert outcome.result == {"a": {"item": "tea"}, "b": True}
    assert h.calls == {"a": 1, "b": 1}
    steps = run.state().steps
    assert [(s.kind, s.name, s.occurrence) for s in steps] == [
        ("step", "a", 0),
        ("suspend", "approval", 0),
        ("step", "b", 0),
    ]


def test_replay_after_cache_loss_reads_the_record_and_reruns_nothing(h: Harness) -> None:
    flow = define_onboarding(h)
    run = flow.run(input={"item": "tea", "qty": 2})
    h.drain()
    h.cache.clear()
    h.app.signal_flow(run.flow_id, "approval", {"approved": False})
    h.drain()
    assert run.state().status == "completed"
    assert h.calls == {"a": 1, "b": 1}


def test_a_partial_cache_falls_back_to_the_record(h: Harness) -> None:
    @h.app.flow("three", input=Empty)
    def three(f: Any) -> Any:
        for i in range(3):
            f.step("s", lambda i=i: h.calls.update([f"s{i}"]) or i)
        return f.suspend("go")

    run = three.run(input={})
    h.drain()
    # Drop one entry in the middle, as a failed best-effort HSET would leave it.
    h.cache._data[run.flow_id].pop(1)
    h.app.signal_flow(run.flow_id, "go", "now")
    h.drain()
    assert run.outcome() is not None
    assert run.outcome().result == "now"  # type: ignore[union-attr]
    assert h.calls == {"s0": 1, "s1": 1, "s2": 1}


def test_loops_give_each_occurrence_its_own_checkpoint(h: Harness) -> None:
    @h.app.flow("review", input=Empty)
    def review(f: Any) -> Any:
        drafts = []
        while True:
            draft = f.step("draft", lambda: h.calls.update(["draft"]) or len(drafts))
            drafts.append(draft)
            verdict = f.suspend("approval", schema=Approval)
            if verdict.approved:
                return drafts

    run = review.run(input={})
    h.drain()
    for approved in (False, False, True):
        h.app.signal_flow(run.flow_id, "approval", {"approved": approved})
        h.drain()
    assert run.outcome().result == [0, 1, 2]  # type: ignore[union-attr]
    assert h.calls["draft"] == 3
    occurrences = [(s.name, s.occurrence) for s in run.state().steps]
    assert occurrences == [
        ("draft", 0),
        ("approval", 0),
        ("draft", 1),
        ("approval", 1),
        ("draft", 2),
        ("approval", 2),
    ]


def test_a_replay_that_diverges_fails_with_non_determinism_naming_both(h: Harness) -> None:
    branch = {"name": "left"}

    @h.app.flow("fickle", input=Empty)
    def fickle(f: Any) -> Any:
        f.step(branch["name"], lambda: 1)
        f.suspend("go")
        return "done"

    run = fickle.run(input={})
    h.drain()
    branch["name"] = "right"
    h.app.signal_flow(run.flow_id, "go", None)
    h.drain()
    state = run.state()
    assert state.status == "failed"
    assert state.error is not None
    assert state.error.type.endswith("NonDeterminismError")
    assert "'left'" in state.error.message and "'right'" in state.error.message
    assert state.error.details["expected"] == "step 'left'#0"
    assert state.error.details["actual"] == "step 'right'#0"


def test_a_signal_before_its_suspend_is_consumed_without_suspending(h: Harness) -> None:
    flow = define_onboarding(h)
    run = flow.run(input={"item": "tea", "qty": 1})
    h.app.signal_flow(run.flow_id, "approval", {"approved": True})
    h.drain()
    assert run.state().status == "completed"
    assert run.state().signals[0].status == "consumed"


def test_same_name_signals_are_consumed_in_arrival_order(h: Harness) -> None:
    @h.app.flow("two", input=Empty)
    def two(f: Any) -> Any:
        return [f.suspend("n"), f.suspend("n")]

    run = two.run(input={})
    h.app.signal_flow(run.flow_id, "n", "first")
    h.app.signal_flow(run.flow_id, "n", "second")
    h.drain()
    assert run.outcome().result == ["first", "second"]  # type: ignore[union-attr]


def test_a_duplicate_key_is_recorded_once(h: Harness) -> None:
    @h.app.flow("two", input=Empty)
    def two(f: Any) -> Any:
        return [f.suspend("n"), f.suspend("n")]

    run = two.run(input={})
    first = h.app.signal_flow(run.flow_id, "n", 1, key="k1")
    again = h.app.signal_flow(run.flow_id, "n", 99, key="k1")
    assert again.duplicate and again.signal_id == first.signal_id
    h.drain()
    assert run.state().status == "suspended"
    h.app.signal_flow(run.flow_id, "n", 2, key="k2")
    h.drain()
    assert run.outcome().result == [1, 2]  # type: ignore[union-attr]


def test_an_invalid_payload_is_rejected_when_buffered_and_refused_at_send_when_waited_for(
    h: Harness,
) -> None:
    flow = define_onboarding(h)
    run = flow.run(input={"item": "tea", "qty": 1})
    # Sent before the flow waits for it: kept, and rejected when the suspend takes it.
    early = h.app.signal_flow(run.flow_id, "approval", {"approved": "maybe-not-a-bool"})
    assert not early.delivered
    h.drain()
    state = run.state()
    assert state.status == "suspended"
    assert state.signals[0].status == "rejected"
    assert "approved" in (state.signals[0].error or "")
    assert state.waiting_schema is not None and "approved" in state.waiting_schema["properties"]
    # Sent while the flow waits with its schema: refused at once, nothing recorded.
    with pytest.raises(InvalidSignal) as err:
        h.app.signal_flow(run.flow_id, "approval", {"approved": "maybe-not-a-bool"})
    assert [e["loc"] for e in err.value.errors] == [["approved"]]
    assert len(run.state().signals) == 1
    assert h.app.signal_flow(run.flow_id, "approval", {"approved": True}).delivered
    h.drain()
    done = run.state()
    assert done.status == "completed" and done.waiting_schema is None
    assert h.calls == {"a": 1, "b": 1}


def test_signals_to_unknown_or_finished_flows_are_refused(h: Harness) -> None:
    flow = define_onboarding(h)
    with pytest.raises(FlowNotFound):
        h.app.signal_flow("nope", "approval", {})
    run = flow.run(input={"item": "tea", "qty": 1})
    h.app.signal_flow(run.flow_id, "approval", {"approved": True})
    h.drain()
    with pytest.raises(FlowNotWaiting) as err:
        h.app.signal_flow(run.flow_id, "approval", {"approved": True})
    assert err.value.status == "completed"  # type: ignore[attr-defined]


def test_invalid_input_raises_and_records_nothing(h: Harness) -> None:
    flow = define_onboarding(h)
    with pytest.raises(InvalidInput) as err:
        flow.run(input={"item": "tea", "qty": "many"}, flow_id="bad")
    assert err.value.errors[0]["loc"] == ("qty",)  # type: ignore[attr-defined]
    with pytest.raises(FlowNotFound):
        h.app.get_flow("bad")
    assert h.dispatcher.queue == []


def test_the_same_flow_id_twice_is_one_flow(h: Harness) -> None:
    flow = define_onboarding(h)
    r1 = flow.run(input={"item": "tea", "qty": 1}, flow_id="order-1")
    h.drain()
    r2 = flow.run(input={"item": "coffee", "qty": 9}, flow_id="order-1")
    assert r1.flow_id == r2.flow_id
    assert r2.state().input == {"item": "tea", "qty": 1}
    assert h.dispatcher.queue == []  # suspended, not pending: no second start
    assert h.calls == {"a": 1}

    @h.app.flow("other", input=Empty)
    def other(f: Any) -> None:
        return None

    with pytest.raises(FlowIdConflict):
        other.run(input={}, flow_id="order-1")


def test_an_unserializable_step_result_fails_the_flow_naming_the_step(h: Harness) -> None:
    @h.app.flow("bad", input=Empty)
    def bad(f: Any) -> Any:
        return f.step("make-object", lambda: object())

    run = bad.run(input={})
    h.drain()
    state = run.state()
    assert state.status == "failed"
    assert state.error is not None
    assert state.error.type.endswith("StepResultNotSerializable")
    assert "make-object" in state.error.message
    assert state.steps == []


def test_a_raising_step_fails_the_flow_with_type_message_and_traceback(h: Harness) -> None:
    def boom() -> None:
        raise KeyError("missing-thing")

    @h.app.flow("boom", input=Empty)
    def flow(f: Any) -> Any:
        return f.step("explode", boom)

    run = flow.run(input={})
    h.drain()
    err = run.state().error
    assert err is not None
    assert err.type == "builtins.KeyError"
    assert err.step == "explode"
    assert "missing-thing" in err.message
    assert err.traceback is not None and "def boom" not in err.traceback
    assert "in boom" in err.traceback


def test_async_steps_and_the_active_step_context(h: Harness) -> None:
    async def fetch() -> dict[str, Any]:
        await asyncio.sleep(0)
        info = current_step()
        return {"key": info.idempotency_key, "attempt": info.attempt}

    @h.app.flow("asyncy", input=Empty)
    def flow(f: Any) -> Any:
        return f.step("fetch", fetch)

    run = flow.run(input={}, flow_id="f1")
    h.drain()
    assert run.outcome().result == {"key": "f1:fetch:0", "attempt": 1}  # type: ignore[union-attr]


def test_pydantic_results_come_back_as_json_on_first_run_and_replay(h: Harness) -> None:
    seen = []

    @h.app.flow("models", input=Empty)
    def flow(f: Any) -> Any:
        value = f.step("order", lambda: Order(item="tea", qty=1))
        seen.append(value)
        f.suspend("go")
        return value

    run = flow.run(input={})
    h.drain()
    h.app.signal_flow(run.flow_id, "go", None)
    h.drain()
    assert seen == [{"item": "tea", "qty": 1}, {"item": "tea", "qty": 1}]


def test_a_stale_executor_cannot_write(h: Harness) -> None:
    flow = define_onboarding(h)
    run = flow.run(input={"item": "tea", "qty": 1})
    first = h.store.claim(run.flow_id, "worker-a", ttl=5)
    assert not isinstance(first, type(None)) and hasattr(first, "lease")
    busy = h.store.claim(run.flow_id, "worker-b", ttl=5)
    assert busy.reason == "busy" and busy.retry_after == pytest.approx(5)  # type: ignore[union-attr]
    h.clock.advance(6)
    second = h.store.claim(run.flow_id, "worker-b", ttl=5)
    assert second.lease.epoch == first.lease.epoch + 1  # type: ignore[union-attr]
    from crux_workers._store._types import Checkpoint

    stale: Lease = first.lease  # type: ignore[union-attr]
    with pytest.raises(LeaseLost):
        h.store.commit_checkpoint(
            stale, Checkpoint(0, "step", "a", 0, "1"), started_at=h.clock(), attempts=1, ttl=5
        )
    with pytest.raises(LeaseLost):
        h.store.take_signal_or_suspend(stale, Suspension(0, "x", 0, None), str, 5)
    with pytest.raises(LeaseLost):
        h.store.finish(stale, "completed", result="1")
    assert h.store.load_checkpoints(run.flow_id) == []


def test_a_resume_finding_the_lease_held_retries_after_it_expires(h: Harness) -> None:
    flow = define_onboarding(h)
    run = flow.run(input={"item": "tea", "qty": 1})
    h.dispatcher.queue.clear()
    h.store.claim(run.flow_id, "crashed-worker", ttl=10)
    h.app.execute("onboarding", run.flow_id)
    assert len(h.dispatcher.queue) == 1
    _, _, countdown = h.dispatcher.queue[0]
    assert countdown is not None and 10 <= countdown <= 10.5
    h.clock.advance(11)
    h.dispatcher.queue.clear()
    h.app.execute("onboarding", run.flow_id)  # the delayed re-try, delivered
    h.drain()
    assert run.state().status == "suspended"
    assert h.calls == {"a": 1}


def test_a_stray_resume_of_a_suspended_flow_does_nothing(h: Harness) -> None:
    flow = define_onboarding(h)
    run = flow.run(input={"item": "tea", "qty": 1})
    h.drain()
    epoch = run.state().epoch
    h.app.execute("onboarding", run.flow_id)
    assert run.state().epoch == epoch
    assert run.state().status == "suspended"


def test_an_explicit_resume_replays_a_suspended_flow(h: Harness) -> None:
    flow = define_onboarding(h)
    run = flow.run(input={"item": "tea", "qty": 1})
    h.drain()
    epoch = run.state().epoch
    flow.run(resume=run.flow_id)
    h.drain()
    assert run.state().epoch == epoch + 1
    assert run.state().status == "suspended"
    assert h.calls == {"a": 1}


def test_a_suspend_past_its_deadline_expires_and_refuses_late_signals(h: Harness) -> None:
    @h.app.flow("timed", input=Empty)
    def timed(f: Any) -> Any:
        return f.suspend("go", timeout="1h")

    run = timed.run(input={})
    h.drain()
    state = run.state()
    assert state.deadline == h.clock() + __import__("datetime").timedelta(hours=1)
    assert state.wake_kind == "expire"
    h.clock.advance(3601)
    h.app.execute("timed", run.flow_id)
    assert run.state().status == "expired"
    with pytest.raises(FlowNotWaiting):
        h.app.signal_flow(run.flow_id, "go", 1)


def test_a_rejected_signal_does_not_extend_the_deadline(h: Harness) -> None:
    @h.app.flow("timed", input=Empty)
    def timed(f: Any) -> Any:
        return f.suspend("go", schema=Approval, timeout="1h")

    run = timed.run(input={})
    h.drain()
    deadline = run.state().deadline
    h.clock.advance(1800)
    # Refused at send; recorded without the check (as a signal buffered before the wait
    # would be), it is rejected when the suspend takes it.
    with pytest.raises(InvalidSignal):
        h.app.signal_flow(run.flow_id, "go", {"approved": "?"})
    h.app.store.record_signal(run.flow_id, "go", '{"approved": "?"}', None)
    h.app.resume(run.flow_id)
    h.drain()
    assert run.state().status == "suspended"
    assert run.state().signals[0].status == "rejected"
    assert run.state().deadline == deadline
