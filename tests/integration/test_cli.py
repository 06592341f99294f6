"""`crux-workers flows ...` and friends, as an operator runs them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from sqlalchemy import create_engine, text

from tests.servers import free_port
from tests.support.fleet import Fleet
from tests.workers import REPO

from .test_fleet import SIGNUP, wait_status


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "crux_workers", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def cli_json(env: dict[str, str], *args: str) -> Any:
    done = cli(env, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_flows_list_show_signal_cancel_purge(fleet: Fleet) -> None:
    fleet.worker("w1")
    waiting = fleet.flows["onboarding"].run(input=SIGNUP, flow_id="cli-waiting")
    doomed = fleet.flows["onboarding"].run(input=SIGNUP, flow_id="cli-doomed")
    wait_status(waiting, "suspended")
    wait_status(doomed, "suspended")
    env = fleet.env

    listed = cli_json(env, "flows", "list", "--waiting-on", "email-verified")
    assert {f["flow_id"] for f in listed} == {"cli-waiting", "cli-doomed"}
    assert cli_json(env, "flows", "list", "--status", "completed") == []
    table = cli(env, "flows", "list", "--name", "onboarding")
    assert table.returncode == 0
    assert table.stdout.splitlines()[0].split()[:3] == ["ID", "NAME", "STATUS"]
    assert "cli-waiting" in table.stdout and "suspended" in table.stdout

    shown = cli(env, "flows", "show", "cli-waiting")
    assert shown.returncode == 0, shown.stderr
    assert "send-welcome" in shown.stdout
    assert "waiting   email-verified" in shown.stdout
    assert "wake      expire at" in shown.stdout

    sent = cli(env, "flows", "signal", "cli-waiting", "email-verified", '{"verified_at": "now"}')
    assert sent.returncode == 0, sent.stderr
    assert waiting.wait(timeout=30).status == "completed"
    shown = cli(env, "flows", "show", "cli-waiting")
    assert "first-week-plan" in shown.stdout and "consumed" in shown.stdout
    detail = cli_json(env, "flows", "show", "cli-waiting")
    assert [s["name"] for s in detail["steps"]] == [
        "send-welcome",
        "email-verified",
        "first-week-plan",
        "schedule-checkins",
    ]

    cancelled = cli_json(env, "flows", "cancel", "cli-doomed", "--reason", "test over")
    assert cancelled == {"flow_id": "cli-doomed", "status": "cancelled"}
    assert doomed.state().cancel_reason == "test over"

    # Nothing finished a day ago; then everything finished before "now + a little".
    assert cli_json(env, "flows", "purge", "--finished-before", "1d")["purged"] == 0
    engine = create_engine(fleet.pg_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE crux_flows SET finished_at = finished_at - interval '2 days'"))
    engine.dispose()
    assert cli_json(env, "flows", "purge", "--finished-before", "1d")["purged"] == 2
    assert cli_json(env, "flows", "list") == []


def test_cli_errors_are_one_clear_line_and_a_nonzero_exit(fleet: Fleet) -> None:
    env = fleet.env
    unknown = cli(env, "flows", "show", "nope")
    assert unknown.returncode == 1
    assert "no flow 'nope'" in unknown.stderr and "Traceback" not in unknown.stderr

    run = fleet.flows["onboarding"].run(input=SIGNUP, flow_id="cli-bad-json")
    bad_json = cli(env, "flows", "signal", run.flow_id, "email-verified", "{oops")
    assert bad_json.returncode == 2
    assert "not valid JSON" in bad_json.stderr

    bad_age = cli(env, "flows", "purge", "--finished-before", "soon")
    assert bad_age.returncode == 2 and "soon" in bad_age.stderr

    port = free_port()
    down = {**env, "CRUX_DATABASE_URL": f"postgresql+psycopg://crux:hunter2@127.0.0.1:{port}/x"}
    unreachable = cli(down, "flows", "list")
    assert unreachable.returncode == 1
    assert f"127.0.0.1:{port}" in unreachable.stderr
    assert "hunter2" not in unreachable.stderr + unreachable.stdout
    assert "Traceback" not in unreachable.stderr

    # A broker that is down: the signal is still recorded, and the warning names the
    # broker without its password.
    fleet.worker("w1")
    wait_status(run, "suspended")
    broker_port = free_port()
    broker_down = {**env, "CRUX_REDIS_URL": f"redis://:hunter2@127.0.0.1:{broker_port}/0"}
    sent = cli(
        broker_down, "flows", "signal", run.flow_id, "email-verified", '{"verified_at": "x"}'
    )
    assert sent.returncode == 0, sent.stderr
    assert "recorded as #" in sent.stdout
    assert f"127.0.0.1:{broker_port}" in sent.stderr and "sweeper" in sent.stderr
    assert "hunter2" not in sent.stdout + sent.stderr


def test_the_ingress_waits_for_a_broker_that_is_down(fleet: Fleet) -> None:
    from tests.workers import Service

    port = free_port()
    env = {**fleet.env, "CRUX_REDIS_URL": f"redis://:hunter2@127.0.0.1:{port}/0"}
    ingress = Service(
        "ingress-down", env, fleet.tmp, "ingress", "--import", "tests.integration.flows"
    )
    try:
        ingress.wait_for(f"broker redis://:***@127.0.0.1:{port}/0 unavailable", timeout=60)
        ingress.wait_for("retrying in 1.0s", timeout=60)  # still alive, backing off
        assert ingress.proc.poll() is None
    finally:
        ingress.kill()
    assert "hunter2" not in ingress.log.read_text(errors="replace")


def test_help_reads_well() -> None:
    for args in ([], ["flows"], ["flows", "list"], ["ingress"], ["dev"], ["worker"]):
        done = cli({"PATH": "/usr/bin:/bin"}, *args, "--help")
        assert done.returncode == 0, done.stderr
        assert "Usage:" in done.stdout


def test_embedded_default_cli_records_without_running(tmp_path: Any) -> None:
    db = tmp_path / "crux.db"
    env = {"PATH": "/usr/bin:/bin", "CRUX_DATABASE_URL": f"sqlite:///{db}"}
    assert cli_json(env, "flows", "list") == []
    start = time.monotonic()
    missing = cli(env, "flows", "signal", "nope", "x", "1")
    assert missing.returncode == 1 and "no flow 'nope'" in missing.stderr
    assert time.monotonic() - start < 60


def test_dev_runs_worker_beat_and_ingress_together_and_stops_them_all(fleet: Fleet) -> None:
    import signal as signals

    from crux_workers import Crux, Settings
    from tests.workers import Service

    dev = Service("dev", fleet.env, fleet.tmp, "dev", "--import", "tests.integration.flows")
    try:
        dev.wait_for("ingress: consuming", timeout=60).wait_for("ready.", timeout=60)
        run = fleet.flows["onboarding"].run(input=SIGNUP)
        wait_status(run, "suspended")
        publisher = Crux(Settings(redis_url=fleet.redis_url))
        try:
            publisher.publish_signal(run.flow_id, "email-verified", {"verified_at": "now"})
        finally:
            publisher.close()
        assert run.wait(timeout=60).status == "completed"
    finally:
        code = dev.kill(signals.SIGTERM)
    assert code == 0, dev.tail()
    assert "beat: Starting" in dev.log.read_text(errors="replace")
