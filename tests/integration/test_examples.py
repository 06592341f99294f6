"""The seed's examples (examples/writer.py, examples/onboarding.py) end to end on real workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from crux_workers import FlowNotWaiting, FlowState
from crux_workers._store._types import FlowFilter
from tests.support.fleet import Fleet
from tests.workers import REPO

ARTICLE = {"topic": "durable flows", "publication": "crux-weekly"}


def app_process(fleet: Fleet, code: str) -> subprocess.CompletedProcess[str]:
    """Run the example app's own public functions, as the app's web process would."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=fleet.env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def wait_state(fleet: Fleet, flow_id: str, status: str, timeout: float = 60) -> FlowState:
    deadline = time.monotonic() + timeout
    while (state := fleet.app.get_flow(flow_id)).status != status:
        assert not state.finished or status == state.status, state
        assert time.monotonic() < deadline, f"still {state.status}, expected {status}"
        time.sleep(0.05)
    return state


@pytest.fixture
def writer_fleet(fleet: Fleet) -> Iterator[Fleet]:
    fleet.worker("crux", imports="examples.writer")
    # The planning service is plain Celery on its own queue: no crux_workers there.
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
        f"from examples.writer import start_article; print(start_article({caller!r}, {ARTICLE!r}))",
    )


def test_writer_plans_on_another_worker_waits_for_approval_and_writes(
    writer_fleet: Fleet,
) -> None:
    fleet = writer_fleet
    started = start(fleet, "ada")
    assert started.returncode == 0, started.stderr
    flow_id = started.stdout.strip()
    state = wait_state(fleet, flow_id, "suspended")
    deadline = time.monotonic() + 60
    while state.waiting_on != "approval":
        assert time.monotonic() < deadline, state
        time.sleep(0.05)
        state = fleet.app.get_flow(flow_id)
    approved = app_process(
        fleet, f"from examples.writer import approve; approve({flow_id!r}, 'eve', notes='ship it')"
    )
    assert approved.returncode == 0, approved.stderr
    state = wait_state(fleet, flow_id, "completed")
    assert state.result["status"] == "written"
    assert state.result["draft"]["title"] == "Durable flows, explained for engineers"
    assert [(s.kind, s.name) for s in state.steps] == [
        ("task", "plan draft"),
        ("suspend", "approval"),
        ("step", "write"),
    ]


def test_writer_rejection_and_access_check(writer_fleet: Fleet) -> None:
    fleet = writer_fleet
    refused = start(fleet, "mallory")
    assert refused.returncode != 0 and "NotAllowed" in refused.stderr
    assert fleet.app.store.list_flows(FlowFilter(name="writer")) == []

    flow_id = start(fleet, "henri").stdout.strip()
    deadline = time.monotonic() + 60
    while fleet.app.get_flow(flow_id).waiting_on != "approval":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    rejected = app_process(
        fleet,
        f"from examples.writer import approve; "
        f"approve({flow_id!r}, 'eve', approved=False, notes='off topic')",
    )
    assert rejected.returncode == 0, rejected.stderr
    state = wait_state(fleet, flow_id, "completed")
    assert state.result == {"status": "rejected", "editor": "eve", "notes": "off topic"}
    assert "write" not in [s.name for s in state.steps]


def test_onboarding_verifies_plans_and_checks_in_or_expires(fleet: Fleet) -> None:
    fleet.worker("crux", imports="examples.onboarding")
    fleet.beat()
    code = (
        "from examples.onboarding import onboarding; "
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
    kinds = [(s.kind, s.name) for s in state.steps]
    assert kinds[:3] == [
        ("step", "send-welcome"),
        ("suspend", "email-verified"),
        ("step", "first-week-plan"),
    ]
    assert kinds.count(("sleep", "until-checkin")) == 2 and kinds.count(("step", "checkin")) == 2

    expired = wait_state(fleet, late, "expired")
    assert expired.waiting_on is None
    with pytest.raises(FlowNotWaiting):
        fleet.app.signal_flow(late, "email-verified", {"verified_at": "too late"})
