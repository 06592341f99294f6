"""run_task on the in-memory record: sent once, resumed by its outcome, retried, resent."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from pydantic import BaseModel

from crux_workers import Crux, NonRetryableError, Retry, Settings
from tests.support.harness import Harness


class Empty(BaseModel):
    pass


class Sent:
    """Captures the children the engine sends, instead of a broker."""

    def __init__(self, h: Harness) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        h.app.runtime.send_child = self.send  # type: ignore[method-assign]

    def send(self, task_id: str, call: str, child: Any) -> None:
        import json

        self.calls.append((task_id, json.loads(call)))


def define(h: Harness, **options: Any) -> Any:
    @h.app.flow("writer", input=Empty)
    def writer(f: Any) -> Any:
        h.calls["before"] += 1
        plan = f.run_task("plan", "svc.plan", "topic", words=300, **options)
        h.calls["after"] += 1
        return f.step("write", lambda: {"plan": plan})

    return writer


def test_the_child_is_sent_once_and_its_result_resumes_the_flow(h: Harness) -> None:
    sent = Sent(h)
    run = define(h).run(input={})
    h.drain()
    assert len(sent.calls) == 1
    task_id, call = sent.calls[0]
    assert re.fullmatch(rf"crux:{run.flow_id}:0:1:[0-9a-f]{{32}}", task_id), task_id
    assert call == {"task": "svc.plan", "args": ["topic"], "kwargs": {"words": 300}, "options": {}}
    state = run.state()
    assert (state.status, state.waiting_on, state.wake_kind) == ("suspended", "task:plan", "task")

    # A stray resume (or a redelivered message) replays but never sends again.
    h.app.resume(run.flow_id)
    h.drain()
    assert len(sent.calls) == 1 and run.state().status == "suspended"

    assert h.app.complete_task(task_id, result=["intro", "body"])
    h.drain()
    outcome = run.outcome()
    assert outcome is not None and outcome.status == "completed"
    assert outcome.result == {"plan": ["intro", "body"]}
    steps = run.state().steps
    assert (steps[0].kind, steps[0].name, steps[0].result) == ("task", "plan", ["intro", "body"])
    # A second outcome for the same child (it was resent and ran twice) changes nothing.
    assert not h.app.complete_task(task_id, result="late")
    assert not h.app.complete_task("crux:nope:0:1", result=1)
    # The predictable part alone (what anyone who knows the flow id could send) is refused.
    assert not h.app.complete_task(f"crux:{run.flow_id}:0:1", result=1)
    assert not h.app.complete_task("not-ours", result=1)
    assert len(sent.calls) == 1


def test_a_failed_child_follows_the_retry_policy(h: Harness) -> None:
    sent = Sent(h)
    run = define(h, retry=Retry(attempts=3, backoff="fixed", initial=5, jitter=False)).run(input={})
    h.drain()
    h.app.complete_task(sent.calls[0][0], error=RuntimeError("planner down"))
    h.drain()
    state = run.state()
    assert (state.status, state.wake_kind) == ("suspended", "retry")
    assert [e.message for e in state.step_errors] == ["planner down"]
    h.tick(5)
    first, second = (t for t, _ in sent.calls)
    assert first.startswith(f"crux:{run.flow_id}:0:1:") and second.startswith(
        f"crux:{run.flow_id}:0:2:"
    )
    # The first attempt's outcome arriving late is ignored: only attempt 2 counts now.
    assert not h.app.complete_task(sent.calls[0][0], result="stale")
    h.app.complete_task(sent.calls[1][0], result="plan B")
    h.drain()
    outcome = run.outcome()
    assert outcome is not None and outcome.result == {"plan": "plan B"}
    assert run.state().steps[0].attempts == 2


def test_a_non_retryable_child_error_fails_the_flow(h: Harness) -> None:
    sent = Sent(h)
    run = define(h, retry=Retry(attempts=5)).run(input={})
    h.drain()
    h.app.complete_task(sent.calls[0][0], error=NonRetryableError("no such topic"))
    h.drain()
    outcome = run.outcome()
    assert outcome is not None and outcome.status == "failed"
    assert outcome.error is not None and outcome.error.message == "no such topic"
    assert len(sent.calls) == 1


def test_a_child_whose_outcome_is_lost_is_sent_again_by_the_sweeper(h: Harness) -> None:
    sent = Sent(h)
    run = define(h, resend_after="10m").run(input={})
    h.drain()
    h.tick(300)
    assert len(sent.calls) == 1
    h.tick(301)
    # The resend keeps the id (and its secret) of the attempt it repeats.
    assert len(sent.calls) == 2 and sent.calls[0][0] == sent.calls[1][0]
    assert sent.calls[0][0].startswith(f"crux:{run.flow_id}:0:1:")
    h.app.complete_task(sent.calls[1][0], result="second time lucky")
    h.drain()
    outcome = run.outcome()
    assert outcome is not None and outcome.status == "completed"


def test_arguments_that_are_not_json_fail_the_flow_with_a_clear_error(h: Harness) -> None:
    Sent(h)

    @h.app.flow("bad-args", input=Empty)
    def bad_args(f: Any) -> Any:
        return f.run_task("plan", "svc.plan", object())

    run = bad_args.run(input={})
    h.drain()
    outcome = run.outcome()
    assert outcome is not None and outcome.status == "failed"
    assert outcome.error is not None and "must be JSON-able" in outcome.error.message


def test_task_objects_and_signatures_carry_their_routing() -> None:
    from crux_workers._values import task_call as _task_call

    celery = Celery("svc", set_as_current=False)

    @celery.task(name="svc.render", queue="gpu", shared=False)  # type: ignore[untyped-decorator]
    def render(page: int, dpi: int = 72) -> str:
        return f"{page}@{dpi}"

    name, call, child = _task_call("s", render, (1,), {"dpi": 300})
    assert (name, child) == ("svc.render", render)
    assert '"options":{"queue":"gpu"}' in call
    sig = render.s(2).set(queue="big-gpu", countdown=5)
    name, call, child = _task_call("s", sig, (), {"dpi": 600})
    assert name == "svc.render" and child is None
    assert call == (
        '{"task":"svc.render","args":[2],"kwargs":{"dpi":600},"options":{"queue":"big-gpu"}}'
    )
    with pytest.raises(Exception, match="must be a Celery task"):
        _task_call("s", 42, (), {})


def test_on_the_embedded_default_the_child_runs_on_a_local_thread(tmp_path: Path) -> None:
    celery = Celery("svc", set_as_current=False)

    @celery.task(name="svc.double", shared=False)  # type: ignore[untyped-decorator]
    def double(n: int) -> int:
        return n * 2

    app = Crux(Settings(database_url=f"sqlite:///{tmp_path / 'e.db'}"))
    try:

        @app.flow("doubler", input=Empty)
        def doubler(f: Any) -> Any:
            return f.run_task("double", double, 21)

        outcome = doubler.run(input={}).wait(timeout=30)
        assert outcome.status == "completed" and outcome.result == 42
    finally:
        app.close()
