"""Operating flows on real workers: retry after a fix, fork, signals checked at send, bulk retry."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from crux_workers import (
    FlowNotRetryable,
    FlowRun,
    ForkOrigin,
    InvalidInput,
    InvalidSignal,
)
from crux_workers._ingress import Ingress
from crux_workers._wire import encode
from tests.support.fleet import Fleet

from .test_cli import cli, cli_json
from .test_fleet import wait_status


class OpsFleet(Fleet):
    """The integration fleet with the operations flows (tests/integration/ops_flows.py)."""

    flows_module = "tests.integration.ops_flows"


@pytest.fixture
def ops(pg_url: str, redis_url: str, tmp_path: Path) -> Iterator[OpsFleet]:
    f = OpsFleet(pg_url, redis_url, tmp_path)
    try:
        yield f
    finally:
        f.close()


def wait_failed(run: FlowRun, timeout: float = 30) -> None:
    outcome = run.wait(timeout=timeout)
    assert outcome.status == "failed", outcome


def test_retry_after_fixing_a_failed_step_runs_only_that_step_again(
    ops: OpsFleet, tmp_path: Path
) -> None:
    ops.worker("w1")
    flag = tmp_path / "fixed"
    run = ops.flows["fixable"].run(input={"flag": str(flag)})
    wait_failed(run)
    failed = run.state()
    assert failed.error is not None and "not fixed yet" in failed.error.message
    assert [s.name for s in failed.steps] == ["prepare"]
    assert len(failed.step_errors) == 2  # both attempts of its Retry(attempts=2)

    flag.touch()  # the fix
    assert ops.app.retry_flow(run.flow_id) == "pending"
    outcome = run.wait(timeout=30)
    assert outcome.status == "completed"
    assert outcome.result == ["prepared x", "fixed", "x"]
    # prepare replayed from the record; the failed step ran once more (a fresh attempt 1).
    assert ops.effects.count(run.flow_id) == {"prepare": 1, "check-flag": 3, "finish": 1}
    done = run.state()
    assert done.retries == 1 and done.error is None and done.finished_at is not None
    assert [(s.name, s.attempts) for s in done.steps] == [
        ("prepare", 1),
        ("needs-fix", 1),
        ("finish", 1),
    ]
    assert len(done.step_errors) == 2  # the failures before the fix stay visible
    with pytest.raises(FlowNotRetryable):
        ops.app.retry_flow(run.flow_id)


def test_fork_at_a_suspend_takes_another_decision_and_at_a_step_another_input(
    ops: OpsFleet,
) -> None:
    ops.worker("w1")
    run = ops.flows["decide"].run(input={"flag": "-", "tag": "orig"})
    wait_status(run, "suspended")
    ops.app.signal_flow(run.flow_id, "decision", {"approve": True})
    assert run.wait(timeout=30).result == ["for orig", "approved", "orig"]

    # At the suspend: the step before it is copied, the fork waits for its own decision.
    other = ops.app.fork_flow(run.flow_id, at=1)
    wait_status(other, "suspended")
    state = other.state()
    assert state.forked_from == ForkOrigin(flow_id=run.flow_id, at=1)
    assert state.waiting_on == "decision" and state.signals == []
    ops.app.signal_flow(other.flow_id, "decision", {"approve": False, "note": "second look"})
    assert other.wait(timeout=30).result == ["for orig", "rejected", "orig"]
    assert ops.effects.count(other.flow_id) == {"act-rejected": 1}  # prepare was copied

    # Past the suspend, with a new input: the copied checkpoints keep their results
    # (the decision included), the steps after them see the new input.
    again = ops.app.fork_flow(run.flow_id, 2, {"flag": "-", "tag": "new"}, flow_id="fork-new")
    assert again.flow_id == "fork-new"
    assert again.wait(timeout=30).result == ["for orig", "approved", "new"]
    assert ops.effects.count("fork-new") == {"act-approved": 1}

    # The CLI: a fork at the first checkpoint with a new input, and `flows show` of it.
    env = ops.env
    got = cli_json(
        env,
        "flows",
        "fork",
        run.flow_id,
        "--at",
        "1",
        "--input",
        '{"flag": "-", "tag": "cli"}',
        "--id",
        "fork-cli",
        "--import",
        "tests.integration.ops_flows",
    )
    assert got == {"flow_id": "fork-cli", "forked_from": run.flow_id, "at": 1}
    wait_status(FlowRun(ops.app, "fork-cli"), "suspended")
    shown = cli(env, "flows", "show", "fork-cli")
    assert shown.returncode == 0, shown.stderr
    assert f"forked    from {run.flow_id} at checkpoint 1" in shown.stdout
    assert 'schema    {"properties":{"approve"' in shown.stdout
    refused = cli(env, "flows", "fork", run.flow_id, "--at", "1", "--input", '{"tag": 1}')
    assert refused.returncode == 1 and "not registered in this process" in refused.stderr

    # The original is untouched; bad fork points and inputs are refused.
    assert [s.name for s in run.state().steps] == ["prepare", "decision", "act"]
    assert ops.effects.count(run.flow_id) == {"prepare": 1, "act-approved": 1}
    with pytest.raises(InvalidInput):
        ops.app.fork_flow(run.flow_id, 4)
    with pytest.raises(InvalidInput):
        ops.app.fork_flow(run.flow_id, 1, {"tag": "no flag"})


def test_an_invalid_signal_is_refused_at_send_while_a_valid_one_resumes(ops: OpsFleet) -> None:
    ops.worker("w1")
    early = ops.flows["decide"].run(input={"flag": "-"})
    # Not waiting yet: kept (and validated when the suspend consumes it).
    assert not ops.app.signal_flow(early.flow_id, "decision", {"approve": True}).delivered
    assert early.wait(timeout=30).status == "completed"

    run = ops.flows["decide"].run(input={"flag": "-"})
    wait_status(run, "suspended")
    schema = run.state().waiting_schema
    assert schema is not None and schema["required"] == ["approve"]
    with pytest.raises(InvalidSignal) as err:
        ops.app.signal_flow(run.flow_id, "decision", {"approve": "perhaps"})
    assert err.value.errors == [  # type: ignore[attr-defined]
        {"loc": ["approve"], "msg": "Input should be of type boolean", "type": "type"}
    ]
    # Through the ingress: refused with the validation detail, nothing recorded.
    body, headers = encode(run.flow_id, "decision", {"note": "no approve"}, "k1", None)
    handled = Ingress(ops.app).handle(body, headers)
    assert handled.verdict == "rejected" and handled.detail.startswith("invalid_payload")
    refusal = ops.app.store.list_rejected(1)[0]
    assert (refusal.reason, refusal.flow_id) == ("invalid_payload", run.flow_id)
    assert '"loc": ["approve"]' in refusal.detail and "Field required" in refusal.detail
    assert run.state().signals == [] and run.state().status == "suspended"

    receipt = ops.app.signal_flow(run.flow_id, "decision", {"approve": "yes"})
    assert receipt.delivered and not receipt.duplicate
    assert run.wait(timeout=30).result == ["for x", "approved", "x"]
    assert run.state().waiting_schema is None


def _statuses(ops: OpsFleet, ids: list[str]) -> list[str]:
    return [ops.app.get_flow(i).status for i in ids]


def test_bulk_retry_resumes_every_failed_flow_of_a_name(ops: OpsFleet, tmp_path: Path) -> None:
    ops.worker("w1")
    flag = tmp_path / "fixed"
    runs = [ops.flows["fixable"].run(input={"flag": str(flag), "tag": str(i)}) for i in range(3)]
    waiter = ops.flows["decide"].run(input={"flag": "-"})
    for run in runs:
        wait_failed(run)
    wait_status(waiter, "suspended")
    ids = [r.flow_id for r in runs]
    env = ops.env

    waits = cli_json(env, "flows", "waiting")
    assert [(w["name"], w["kind"], w["on"], w["count"]) for w in waits] == [
        ("decide", "signal", "decision", 1)
    ]
    assert waits[0]["nearest_deadline"] is not None
    table = cli(env, "flows", "waiting")
    assert table.returncode == 0 and "signal decision" in table.stdout

    # Without --yes it asks; with no answer nothing is retried.
    asked = cli(env, "flows", "retry", "--name", "fixable")
    assert asked.returncode != 0 and "retry 3 failed flow(s)" in asked.stderr
    assert _statuses(ops, ids) == ["failed"] * 3

    flag.touch()
    got = cli_json(env, "flows", "retry", "--name", "fixable", "--yes")
    assert got["count"] == 3 and sorted(got["retried"]) == sorted(ids)
    deadline = time.monotonic() + 60
    while _statuses(ops, ids) != ["completed"] * 3:
        assert time.monotonic() < deadline, _statuses(ops, ids)
        time.sleep(0.1)
    for i, run in enumerate(runs):
        assert run.outcome().result == [f"prepared {i}", "fixed", str(i)]  # type: ignore[union-attr]
        assert ops.effects.count(run.flow_id)["prepare"] == 1
    assert waiter.state().status == "suspended"  # not failed: not retried
    assert ops.app.retry_flows(name="fixable") == []  # nothing failed is left


def test_retry_and_fork_refusals_from_the_cli(ops: OpsFleet) -> None:
    run = ops.flows["decide"].run(input={"flag": "-"}, flow_id="never-ran")
    env = ops.env
    refused = cli(env, "flows", "retry", run.flow_id)
    assert refused.returncode == 1 and "only a failed flow can be retried" in refused.stderr
    missing = cli(env, "flows", "fork", "no-such-flow", "--at", "0")
    assert missing.returncode == 1 and "no-such-flow" in missing.stderr
    past = cli(env, "flows", "fork", run.flow_id, "--at", "3")
    assert past.returncode == 1 and "fork at 0..0" in past.stderr
    nothing: Any = cli_json(env, "flows", "retry", "--name", "decide")
    assert nothing == {"retried": [], "count": 0}
