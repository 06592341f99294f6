"""``crux-workers check`` and ``flows export`` against real Postgres.

Flows are suspended under tests/integration/check_v1.py (with the testing kit's
``FlowEnvironment`` on the test's database), then the real CLI, in a subprocess,
replays them against an unchanged, a renamed-step, a reordered and a retyped version.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from crux_workers.testing import FlowEnvironment, check_flows, check_history
from tests.integration import check_v1 as v1
from tests.workers import REPO

APPROVAL = {"approved": True, "by": "ada"}
FLOW_IDS = ["sync-approval", "sync-delivery", "async-approval", "async-delivery"]


@pytest.fixture
def record(pg_url: str) -> str:
    """The test's database, holding four suspended flows and a finished one."""
    with FlowEnvironment(store=pg_url) as env:
        for prefix, handle in (("sync", v1.order), ("async", v1.order_async)):
            env.start(handle, {"item": "book", "qty": 2}, flow_id=f"{prefix}-approval")
            env.start(handle, {"item": "pen"}, flow_id=f"{prefix}-delivery")
            env.signal(f"{prefix}-delivery", "approval", APPROVAL)
        done = env.start(v1.order, {"item": "cup"}, flow_id="finished")
        env.signal("finished", "approval", APPROVAL)
        env.signal("finished", "delivered", {})
        assert done.outcome() is not None
        assert {env.run(i).state().waiting_on for i in FLOW_IDS} == {"approval", "delivered"}
    return pg_url


def cli(pg_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRUX_")}
    env.update(CRUX_DATABASE_URL=pg_url, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "crux_workers", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def check_json(pg_url: str, module: str) -> tuple[int, dict[str, Any]]:
    done = cli(pg_url, "check", "--import", f"tests.integration.{module}", "--json")
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def by_flow(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    got: dict[str, list[dict[str, Any]]] = {}
    for p in report["problems"]:
        got.setdefault(p["flow_id"], []).append(p)
    return got


def test_unchanged_code_replays_cleanly(record: str) -> None:
    done = cli(record, "check", "--import", "tests.integration.check_v1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 flow(s) checked: all replay cleanly" in done.stdout


def test_renamed_step_fails_every_flow_at_its_position(record: str) -> None:
    status, report = check_json(record, "check_renamed")
    assert status == 1 and report["checked"] == 4
    problems = by_flow(report)
    assert set(problems) == set(FLOW_IDS)
    for flow_id, [p] in problems.items():
        assert p["kind"] == "checkpoint" and p["position"] == 1
        assert p["expected"] == "step 'charge'#0" and p["actual"] == "step 'bill'#0"
        assert p["flow_name"] == (
            "check-order" if flow_id.startswith("sync") else "check-order-async"
        )
    text = cli(record, "check", "--import", "tests.integration.check_renamed")
    assert text.returncode == 1
    assert "4 flow(s) checked: 4 would fail" in text.stdout
    assert "flow sync-approval (check-order) at position 1" in text.stdout


def test_reordered_steps_fail_at_position_zero(record: str) -> None:
    status, report = check_json(record, "check_reordered")
    assert status == 1
    for [p] in by_flow(report).values():
        assert (p["position"], p["expected"], p["actual"]) == (
            0,
            "step 'reserve'#0",
            "step 'charge'#0",
        )


def test_retyped_result_and_signal_schema(record: str) -> None:
    status, report = check_json(record, "check_retyped")
    assert status == 1
    problems = by_flow(report)
    for prefix in ("sync", "async"):
        # Waiting for approval: only the charge result is recorded, and no longer fits.
        [result] = problems[f"{prefix}-approval"]
        assert (result["kind"], result["position"], result["expected"]) == (
            "step-result",
            1,
            "Receipt",
        )
        assert '"order_id":"o-book"' in result["actual"]
        # Waiting for delivery: the recorded approval lacks the new required field too.
        kinds = [(p["kind"], p["position"]) for p in problems[f"{prefix}-delivery"]]
        assert kinds == [("step-result", 1), ("signal", 2)]
        assert "level" in problems[f"{prefix}-delivery"][1]["message"]


def test_export_then_check_history(record: str, tmp_path: Path) -> None:
    path = tmp_path / "delivery.json"
    done = cli(record, "flows", "export", "async-delivery", "-o", str(path))
    assert done.returncode == 0, done.stderr
    exported = json.loads(path.read_text())
    assert exported["name"] == "check-order-async" and exported["waiting_on"] == "delivered"
    assert [c["name"] for c in exported["checkpoints"]] == ["reserve", "charge", "approval"]
    assert exported["checkpoints"][2]["result"] == APPROVAL
    stdout = cli(record, "flows", "export", "sync-delivery")
    assert json.loads(stdout.stdout)["flow_id"] == "sync-delivery"
    (tmp_path / "sync.json").write_text(stdout.stdout)

    ok = cli(record, "check", "--import", "tests.integration.check_v1", "--history", str(path))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "1 flow(s) checked: all replay cleanly" in ok.stdout
    bad = cli(
        record,
        "check",
        "--import",
        "tests.integration.check_reordered",
        "--history",
        str(path),
        "--history",
        str(tmp_path / "sync.json"),
    )
    assert bad.returncode == 1 and "2 would fail" in bad.stdout
    # The same as library calls, in this process (v1 is imported here).
    assert check_history([path], [v1.order, v1.order_async]).ok
    assert check_flows([v1.order, v1.order_async], store=record).ok
    missing = check_flows([v1.order], store=record)
    assert {p.kind for p in missing.problems} == {"unknown-flow"}
    assert sorted(missing.failing) == ["async-approval", "async-delivery"]


def test_check_without_flows_or_with_a_bad_import(record: str) -> None:
    done = cli(record, "check", "--import", "tests.integration.no_such_module")
    assert done.returncode == 1 and "cannot import" in done.stderr
    nothing = cli(record, "check", "--name", "no-such-flow")
    assert nothing.returncode == 0 and "0 flow(s) checked" in nothing.stdout


def test_flow_environment_on_postgres(pg_url: str) -> None:
    """The kit's environment on a real record: timers, retries and expiry on virtual time."""
    from examples.onboarding import onboarding
    from examples.onboarding_async import onboarding as onboarding_async

    signup = {"email": "u@example.com", "name": "Henri", "goal": "shipping"}
    with FlowEnvironment(store=pg_url) as env:
        for handle in (onboarding, onboarding_async):
            expiring = env.start(handle, input=signup)
            verified = env.start(handle, input=signup)
            env.signal(verified.flow_id, "email-verified", {"verified_at": "now"})
            report = env.advance("6d")
            assert sorted(p.kind for p in report.fired) == ["expire", "sleep", "sleep", "sleep"]
            expired = expiring.outcome()
            assert expired is not None and expired.status == "expired"
            done = verified.outcome()
            assert done is not None and done.status == "completed"
            assert done.result["checkins"] == 3
