"""The async examples (examples/writer_async.py, examples/onboarding_async.py) on real workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from crux_workers import FlowNotWaiting
from crux_workers._store._types import FlowFilter
from tests.support.fleet import Fleet
from tests.workers import REPO

from .test_examples import ARTICLE, app_process, wait_state


@pytest.fixture(params=["prefork", "threads"])
def writer_fleet(fleet: Fleet, request: pytest.FixtureRequest) -> Iterator[Fleet]:
    fleet.worker("crux", imports="examples.writer_async", pool=request.param)
    # The sync example's planning service: plain Celery, reached by task name.
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "examples.writer:tasks",
            "worker",
            "-Q",
            "writer-tasks",
            "--concurrency",
            "1",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ],
        cwd=REPO,
        env=fleet.env,
        stdout=(fleet.tmp / "planner.log").open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield fleet
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)


def start(fleet: Fleet, caller: str) -> subprocess.CompletedProcess[str]:
    return app_process(
        fleet,
        "from examples.writer_async import start_article; "
        f"print(start_article({caller!r}, {ARTICLE!r}))",
    )


def wait_waiting(fleet: Fleet, flow_id: str, name: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while fleet.app.get_flow(flow_id).waiting_on != name:
        assert time.monotonic() < deadline, fleet.app.get_flow(flow_id)
        time.sleep(0.05)


def test_async_writer_plans_elsewhere_waits_for_approval_and_writes(writer_fleet: Fleet) -> None:
    fleet = writer_fleet
    refused = start(fleet, "mallory")
    assert refused.returncode != 0 and "NotAllowed" in refused.stderr
    assert fleet.app.store.list_flows(FlowFilter(name="writer-async")) == []

    started = start(fleet, "ada")
    assert started.returncode == 0, started.stderr
    flow_id = started.stdout.strip()
    wait_waiting(fleet, flow_id, "approval")
    approved = app_process(
        fleet,
        f"from examples.writer_async import approve; approve({flow_id!r}, 'eve', notes='ship it')",
    )
    assert approved.returncode == 0, approved.stderr
    state = wait_state(fleet, flow_id, "completed")
    assert state.result["status"] == "written"
    draft = state.result["draft"]
    assert draft["title"] == "Durable flows, explained for engineers"
    assert draft["body"].count("## ") == 3 and "(ship it)" in draft["body"]
    assert draft["key"] == f"{flow_id}:write:0"
    assert [(s.kind, s.name) for s in state.steps] == [
        ("task", "plan draft"),
        ("suspend", "approval"),
        ("step", "write"),
    ]

    rejected_id = start(fleet, "henri").stdout.strip()
    wait_waiting(fleet, rejected_id, "approval")
    app_process(
        fleet,
        f"from examples.writer_async import approve; "
        f"approve({rejected_id!r}, 'eve', approved=False, notes='off topic')",
    )
    state = wait_state(fleet, rejected_id, "completed")
    assert state.result == {"status": "rejected", "editor": "eve", "notes": "off topic"}


def test_async_onboarding_verifies_plans_and_checks_in_or_expires(fleet: Fleet) -> None:
    fleet.worker("crux", imports="examples.onboarding_async")
    fleet.beat()
    code = (
        "from examples.onboarding_async import onboarding; "
        "print(onboarding.run(input={{'email': 'u@example.com', 'name': 'Henri', "
        "'goal': 'shipping', 'verify_within': {within!r}, 'checkins': 2, "
        "'checkin_every': '1s'}}).flow_id)"
    )
    happy = app_process(fleet, code.format(within="1h")).stdout.strip()
    late = app_process(fleet, code.format(within="2s")).stdout.strip()
    wait_state(fleet, happy, "suspended")
    verified = app_process(
        fleet,
        "from crux_workers import signal_flow; "
        f"signal_flow({happy!r}, 'email-verified', {{'verified_at': '2026-11-21T10:00:00Z'}})",
    )
    assert verified.returncode == 0, verified.stderr
    state = wait_state(fleet, happy, "completed")
    assert state.result["checkins"] == 2
    assert state.result["plan"][0] == "day 1: one step towards shipping"
    kinds = [(s.kind, s.name) for s in state.steps]
    assert kinds[:3] == [
        ("step", "send-welcome"),
        ("suspend", "email-verified"),
        ("step", "first-week-plan"),
    ]
    assert kinds.count(("sleep", "until-checkin")) == 2 and kinds.count(("step", "checkin")) == 2
    checkins = [s for s in state.steps if s.name == "checkin"]
    assert [s.occurrence for s in checkins] == [0, 1]

    expired = wait_state(fleet, late, "expired")
    assert expired.waiting_on is None
    with pytest.raises(FlowNotWaiting):
        fleet.app.signal_flow(late, "email-verified", {"verified_at": "too late"})
