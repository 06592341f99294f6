"""A careless caller on a real Postgres: names, errors and values the record cannot hold.

Each test drives executions in this process against the fault cluster, with a queue in
place of the broker, so it can count how often an execution was asked for and how often
a step's side effect ran: "retried forever" shows up as a number, not as a hung test.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from crux_workers import Crux, FlowContext, InvalidInput, Retry, Settings, ValueTooLarge
from crux_workers._store._cache import MemoryStepCache
from crux_workers._store._sql import SqlStore
from crux_workers.errors import InvalidDuration
from tests.servers import PostgresServer


class Empty(BaseModel):
    pass


class Blob(BaseModel):
    data: Any = None


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


class Queue:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, float | None]] = []

    def enqueue(
        self, flow_name: str, flow_id: str, countdown: float | None = None, *, start: bool = False
    ) -> None:
        self.sent.append((flow_name, flow_id, countdown))

    def close(self) -> None:
        pass


class Rig:
    """An app on the fault cluster whose executions run only when the test says so."""

    def __init__(self, url: str) -> None:
        self.clock = Clock()
        self.store = SqlStore(url, clock=self.clock)
        self.queue = Queue()
        self.app = Crux(
            Settings(database_url=url, lease_ttl=5, max_value_bytes=4096),
            store=self.store,
            cache=MemoryStepCache(),
            dispatcher=self.queue,
        )
        self.effects: Counter[str] = Counter()

    def drain(self, limit: int = 50) -> int:
        """Run what was asked for, delayed requests included; returns how many ran."""
        ran = 0
        while self.queue.sent and ran < limit:
            name, flow_id, countdown = self.queue.sent.pop(0)
            if countdown:
                self.clock.now += timedelta(seconds=countdown)
            self.app.execute(name, flow_id)
            ran += 1
        return ran

    def later(self, seconds: float) -> None:
        self.clock.now += timedelta(seconds=seconds)
        self.app.sweep()


@pytest.fixture
def rig(fault_pg: PostgresServer, fault_db: str) -> Iterator[Rig]:
    r = Rig(fault_pg.url(fault_db))
    try:
        yield r
    finally:
        r.app.close()


def test_a_step_name_with_nul_fails_the_flow_before_the_step_runs(rig: Rig) -> None:
    @rig.app.flow("nul-step", input=Empty)
    def nul_step(f: FlowContext[Empty]) -> Any:
        return f.step("charge\x00card", lambda: rig.effects.update(["charge"]))

    run = nul_step.run(input={})
    ran = rig.drain()
    state = run.state()
    assert state.status == "failed"
    assert rig.effects["charge"] == 0, "the side effect ran although its name cannot be stored"
    assert state.error is not None and state.error.type.endswith("InvalidInput")
    assert ran == 1, f"{ran} executions: a data error was retried as if the record were down"


def test_an_error_message_with_a_lone_surrogate_follows_the_retry_policy(rig: Rig) -> None:
    @rig.app.flow("surrogate-error", input=Empty)
    def surrogate(f: FlowContext[Empty]) -> Any:
        def flaky() -> None:
            rig.effects["attempt"] += 1
            raise ValueError("upstream said \ud800\x00 and hung up")

        return f.step(
            "call", flaky, retry=Retry(attempts=3, backoff="fixed", initial="1s", jitter=False)
        )

    run = surrogate.run(input={})
    for _ in range(6):
        rig.drain()
        rig.later(2)
    rig.drain()
    state = run.state()
    assert rig.effects["attempt"] == 3, rig.effects
    assert state.status == "failed"
    assert state.error is not None and "hung up" in state.error.message
    assert "\\ud800" in state.error.message and "\\x00" in state.error.message


def test_a_step_result_over_the_limit_fails_the_flow_with_a_clear_error(rig: Rig) -> None:
    @rig.app.flow("big-result", input=Empty)
    def big(f: FlowContext[Empty]) -> Any:
        return f.step("fetch", lambda: "x" * 10_000)

    run = big.run(input={})
    rig.drain()
    state = run.state()
    assert state.status == "failed" and state.steps == []
    assert state.error is not None and state.error.type.endswith("ValueTooLarge")
    assert "CRUX_MAX_VALUE_BYTES" in state.error.message


def test_input_and_signal_payloads_over_the_limit_are_refused_and_nothing_is_recorded(
    rig: Rig,
) -> None:
    @rig.app.flow("waits", input=Blob)
    def waits(f: FlowContext[Blob]) -> Any:
        return f.suspend("go")

    with pytest.raises(ValueTooLarge):
        waits.run(input={"data": "x" * 10_000}, flow_id="too-big")
    with pytest.raises(Exception, match="no flow"):
        rig.app.get_flow("too-big")

    run = waits.run(input={"data": 1})
    rig.drain()
    with pytest.raises(ValueTooLarge):
        rig.app.signal_flow(run.flow_id, "go", {"blob": "y" * 10_000})
    assert run.state().signals == []
    assert run.state().status == "suspended"


def test_input_nested_too_deep_is_refused_at_run_not_at_start(rig: Rig) -> None:
    @rig.app.flow("deep", input=Blob)
    def deep(f: FlowContext[Blob]) -> Any:
        return 1

    nested: Any = 0
    for _ in range(200):
        nested = [nested]
    with pytest.raises(InvalidInput, match="nested"):
        deep.run(input={"data": nested}, flow_id="deep-1")
    with pytest.raises(Exception, match="no flow"):
        rig.app.get_flow("deep-1")


def test_a_child_result_over_the_limit_fails_the_child_not_the_record(rig: Rig) -> None:
    sent: list[str] = []

    def send(task_id: str, call: str, child: Any) -> None:
        sent.append(task_id)

    rig.app.runtime.send_child = send  # type: ignore[method-assign]

    @rig.app.flow("child", input=Empty)
    def child(f: FlowContext[Empty]) -> Any:
        return f.run_task("make", "other.make", retry=Retry(attempts=3))

    run = child.run(input={})
    rig.drain()
    assert len(sent) == 1
    assert rig.app.complete_task(sent[0], result="z" * 10_000)
    rig.drain()
    state = run.state()
    assert state.status == "failed", "an oversized result is not worth sending again"
    assert len(sent) == 1
    assert state.error is not None and "CRUX_MAX_VALUE_BYTES" in state.error.message


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda f: f.suspend("approval", timeout=0), "must be positive"),
        (lambda f: f.sleep("nap", "99999999999999999999d"), "longest timer"),
        (lambda f: f.wait_until("ok", lambda: False, every="1s", timeout=0), "must be positive"),
    ],
    ids=["suspend-timeout-0", "sleep-overflow", "wait-until-timeout-0"],
)
def test_durations_that_mean_nothing_or_overflow_fail_the_flow_clearly(
    rig: Rig, call: Any, expected: str
) -> None:
    @rig.app.flow("durations", input=Empty)
    def durations(f: FlowContext[Empty]) -> Any:
        return call(f)

    run = durations.run(input={})
    rig.drain()
    state = run.state()
    assert state.status == "failed", state.status
    assert state.error is not None and state.error.type.endswith("InvalidDuration")
    assert expected in state.error.message
    # The record holds nothing a claim or a sweep could choke on afterwards.
    rig.later(1)
    assert rig.drain() == 0


def test_durations_are_bounded_where_they_are_parsed() -> None:
    from crux_workers._durations import parse_duration

    with pytest.raises(InvalidDuration):
        parse_duration("99999999999999999999d")
    with pytest.raises(InvalidDuration):
        parse_duration(float("inf"))
    assert parse_duration("3650d") == 3650 * 86400


@pytest.mark.parametrize(
    "payload",
    ["1" * 5000, "[" * 300 + "]" * 300, "{not json"],
    ids=["5000-digit-integer", "nested-300-deep", "not-json"],
)
def test_the_cli_refuses_unusable_json_with_exit_code_2_not_a_traceback(
    payload: str, tmp_path: Any
) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("CRUX_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    done = subprocess.run(
        [sys.executable, "-m", "crux_workers", "flows", "signal", "some-flow", "go", payload],
        cwd=tmp_path,  # the embedded default's record lands here
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr and "not valid JSON" in done.stderr
    assert len(done.stderr) < 2000, "the whole argument was echoed back"
