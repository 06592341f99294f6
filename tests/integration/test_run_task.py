"""run_task across worker boundaries: a crux worker and another service's plain Celery worker."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support.fleet import Fleet
from tests.workers import REPO


class ChildWorker:
    """`celery -A tests.integration.children worker -Q children`: no crux_workers in sight."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.log = log_dir / "children.log"
        self._file = self.log.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tests.integration.children:app",
                "worker",
                "-Q",
                "children",
                "--pool",
                "prefork",
                "--concurrency",
                "1",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "--loglevel",
                "INFO",
            ],
            cwd=REPO,
            env=env,
            stdout=self._file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while b"ready." not in self.log.read_bytes():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=20)
        self._file.close()


@pytest.fixture
def children(fleet: Fleet) -> Iterator[ChildWorker]:
    w = ChildWorker(fleet.env, fleet.tmp)
    yield w
    w.kill()


def test_a_child_task_on_another_services_worker_resumes_the_flow(
    fleet: Fleet, children: ChildWorker
) -> None:
    fleet.worker("w1")
    run = fleet.flows["delegating"].run(input={"topic": "durability"})
    outcome = run.wait(timeout=60)
    assert outcome.status == "completed", run.state()
    assert outcome.result == {"plan": ["intro to durability", "durability in depth"]}
    steps = run.state().steps
    assert [(s.kind, s.name) for s in steps] == [("task", "plan"), ("step", "write")]
    # A stray resume after the fact changes nothing and sends nothing.
    assert fleet.effects.count(run.flow_id) == {"child-plan-1": 1, "write": 1}


def test_a_failing_child_is_retried_with_the_steps_policy(
    fleet: Fleet, children: ChildWorker
) -> None:
    fleet.worker("w1")
    run = fleet.flows["delegating"].run(input={"topic": "x", "fail_times": 1})
    outcome = run.wait(timeout=60)
    assert outcome.status == "completed", run.state()
    state = run.state()
    assert [e.type for e in state.step_errors] == ["crux_workers.errors.TaskFailed"]
    assert state.steps[0].attempts == 2
    assert fleet.effects.count(run.flow_id) == {"child-plan-1": 1, "child-plan-2": 1, "write": 1}


def test_a_child_whose_result_message_is_lost_is_recovered_by_the_sweeper(
    fleet: Fleet, children: ChildWorker
) -> None:
    # No crux worker yet: the start message waits; then one starts the flow and sends.
    w1 = fleet.worker("w1")
    fleet.beat()
    run = fleet.flows["delegating"].run(
        input={"topic": "y", "resend_after": "3s", "child_delay": 2.0}
    )
    # The flow suspends before the child is published: wait for the send itself, then
    # stop the only crux worker while the child still runs (it takes 2 s).
    deadline = time.monotonic() + 30
    while b"child task 'plan' sent" not in w1.log.read_bytes():
        assert time.monotonic() < deadline, w1.tail()
        time.sleep(0.02)
    w1.kill()
    fleet.effects.wait_for("child-plan-1")
    # The child ran; its result message sits on the flow queue. Lose it.
    client = redis.Redis.from_url(fleet.redis_url)
    deadline = time.monotonic() + 20
    # (Beat's sweeps share the queue: wait for the child's result itself.)
    while not any(b"crux.task_done" in m for m in client.lrange("crux", 0, -1)):
        assert time.monotonic() < deadline, "the child's result never reached the queue"
        time.sleep(0.05)
    client.delete("crux")
    client.close()
    assert run.state().status == "suspended"
    fleet.worker("w2")
    outcome = run.wait(timeout=60)
    assert outcome.status == "completed", run.state()
    # The child ran again (at least once, like a step); the flow's steps ran once each.
    assert fleet.effects.count(run.flow_id) == {"child-plan-1": 2, "write": 1}
