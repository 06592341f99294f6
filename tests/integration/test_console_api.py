"""The console's JSON API and its guard, over HTTP (Starlette's test client).

The app is the embedded default on a SQLite record in the test's tmp dir: its flows
run on local threads, which is all these tests need (the browser tests use a fleet).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from click.testing import CliRunner

from crux_workers import Crux, FlowHandle, Settings
from crux_workers.cli import main
from crux_workers.ui import create_app
from crux_workers.ui._security import CSRF_COOKIE, SESSION_COOKIE
from tests.integration import console_flows
from tests.servers import free_port
from tests.workers import REPO

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

TOKEN = "s3cret-token-for-tests-0123456789"
HOSTILE = "<script>alert(1)</script>\x1b[2J\u202e"


class Env:
    def __init__(self, tmp: Path) -> None:
        self.app = Crux(Settings(database_url=f"sqlite:///{tmp}/console.db", sweep_interval=0.2))
        self.flows: dict[str, FlowHandle[Any]] = {
            h.name: self.app.flow(h.name, input=h.input_model)(h.fn)
            for h in (console_flows.approval, console_flows.payment, console_flows.memo)
        }

    def client(self, **options: Any) -> TestClient:
        base = options.pop("base_url", "http://127.0.0.1")
        return TestClient(create_app(self.app, **options), base_url=base)

    def suspended(self, order: str = "A-1", flow_id: str | None = None) -> str:
        run = self.flows["approval"].run(input={"order": order}, flow_id=flow_id)
        self.wait(run.flow_id, "suspended")
        return run.flow_id

    def wait(self, flow_id: str, status: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.app.get_flow(flow_id).status != status:
            assert time.monotonic() < deadline, self.app.get_flow(flow_id)
            time.sleep(0.05)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    try:
        yield e
    finally:
        e.app.close()


def csrf(client: TestClient) -> dict[str, str]:
    """Visit a page (which sets the CSRF cookie) and return the header that carries it."""
    assert client.get("/flows").status_code == 200
    return {"X-CSRF-Token": client.cookies[CSRF_COOKIE]}


def test_flows_come_newest_first_in_keyset_pages_with_filters_and_counts(env: Env) -> None:
    ids = [env.flows["payment"].run(input={"order": f"P-{i}"}).flow_id for i in range(5)]
    waiting = env.suspended()
    for flow_id in ids:
        env.wait(flow_id, "completed")
    c = env.client()
    seen: list[str] = []
    after = None
    for _ in range(10):
        got = c.get("/api/flows", params={"limit": 2, **({"after": after} if after else {})})
        assert got.status_code == 200
        body = got.json()
        seen += [f["flow_id"] for f in body["flows"]]
        after = body["next"]
        if after is None:
            break
    assert seen == [waiting, *reversed(ids)]
    assert body["counts"] == {"completed": 5, "suspended": 1}
    only = c.get("/api/flows", params={"status": "suspended", "waiting_on": "approval"}).json()
    assert [(f["flow_id"], f["waiting_on"]) for f in only["flows"]] == [(waiting, "approval")]
    assert only["flows"][0]["deadline"] is not None
    assert (
        c.get("/api/flows", params={"name": "payment", "limit": 500}).json()["flows"].__len__() == 5
    )
    assert c.get("/api/flows", params={"q": ids[0][:8]}).json()["flows"][0]["flow_id"] == ids[0]
    assert c.get("/api/flows", params={"since": "1h"}).json()["flows"].__len__() == 6
    for bad in ({"status": "asleep"}, {"after": "garbage"}, {"limit": "0"}, {"since": "soon"}):
        got = c.get("/api/flows", params=bad)
        assert got.status_code == 422, bad
        assert got.json()["error"] == "InvalidInput"
    # The page shows the same, and an exact id in the search box opens the flow.
    page = c.get("/flows", params={"status": "suspended"})
    assert page.status_code == 200 and waiting in page.text and ids[0] not in page.text
    jump = c.get("/flows", params={"q": waiting}, follow_redirects=False)
    assert jump.status_code == 303 and jump.headers["location"] == f"/flows/{waiting}"


def test_a_flow_reads_whole_and_errors_have_the_status_that_fits(env: Env) -> None:
    flow_id = env.suspended("A-7")
    c = env.client()
    state = c.get(f"/api/flows/{flow_id}").json()
    assert (state["status"], state["waiting_on"], state["input"]["order"]) == (
        "suspended",
        "approval",
        "A-7",
    )
    assert [s["name"] for s in state["steps"]] == ["reserve"]
    missing = c.get("/api/flows/no-such-flow")
    assert missing.status_code == 404
    assert missing.json() == {
        "error": "FlowNotFound",
        "message": missing.json()["message"],
        "status": 404,
    }
    assert c.get("/flows/no-such-flow").status_code == 404
    headers = csrf(c)
    finished = env.flows["payment"].run(input={"order": "P"}).flow_id
    env.wait(finished, "completed")
    got = c.post(f"/api/flows/{finished}/signal", json={"name": "x", "payload": 1}, headers=headers)
    assert (got.status_code, got.json()["error"]) == (409, "FlowNotWaiting")
    got = c.post(f"/api/flows/{finished}/cancel", json={"reason": "late"}, headers=headers)
    assert (got.status_code, got.json()["error"]) == (409, "FlowAlreadyFinished")
    got = c.post(f"/api/flows/{flow_id}/signal", json={"payload": 1}, headers=headers)
    assert got.status_code == 422
    got = c.post(
        f"/api/flows/{flow_id}/signal",
        content=b"{nope",
        headers={**headers, "content-type": "application/json"},
    )
    assert (got.status_code, got.json()["error"]) == (422, "InvalidInput")
    assert env.app.get_flow(flow_id).signals == []


def test_a_signal_and_a_cancel_through_the_api(env: Env) -> None:
    flow_id, other = env.suspended("A-1"), env.suspended("A-2")
    c = env.client()
    headers = csrf(c)
    got = c.post(
        f"/api/flows/{flow_id}/signal",
        json={"name": "approval", "payload": {"approved": True, "by": "api"}, "key": "k1"},
        headers=headers,
    )
    assert got.status_code == 200
    assert got.json()["flow_id"] == flow_id and got.json()["duplicate"] is False
    env.wait(flow_id, "completed")
    assert c.get(f"/api/flows/{flow_id}").json()["result"] == {"order": "A-1", "approved": True}
    got = c.post(f"/api/flows/{other}/cancel", json={"reason": "duplicate"}, headers=headers)
    assert got.json() == {"flow_id": other, "status": "cancelled"}
    assert env.app.get_flow(other).cancel_reason == "duplicate"


def test_every_post_needs_the_csrf_token_unless_it_carries_the_bearer_token(env: Env) -> None:
    flow_id = env.suspended()
    c = env.client()
    c.get("/flows")
    for path, body in (
        (f"/api/flows/{flow_id}/cancel", {"reason": "x"}),
        ("/api/purge", {"finished_before": "1ms"}),
    ):
        got = c.post(path, json=body)
        assert got.status_code == 403, path
        got = c.post(path, json=body, headers={"X-CSRF-Token": "forged"})
        assert got.status_code == 403, path
    for form in ({"reason": "x"}, {"reason": "x", "csrf": "forged"}):
        got = c.post(f"/flows/{flow_id}/cancel", data=form)
        assert got.status_code == 403
        assert "CSRF" in got.text
    assert env.app.get_flow(flow_id).status == "suspended"
    # The form with the page's token goes through.
    page = c.get(f"/flows/{flow_id}")
    token = c.cookies[CSRF_COOKIE]
    assert f'name="csrf" value="{token}"' in page.text
    got = c.post(
        f"/flows/{flow_id}/cancel", data={"reason": "x", "csrf": token}, follow_redirects=False
    )
    assert got.status_code == 303
    assert env.app.get_flow(flow_id).status == "cancelled"
    # A script with the Bearer token needs no CSRF token: no browser sends that header.
    other = env.suspended("A-2")
    t = env.client(token=TOKEN)
    got = t.post(
        f"/api/flows/{other}/cancel",
        json={"reason": "y"},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert got.status_code == 200


def test_with_a_token_every_page_and_call_needs_it(env: Env) -> None:
    flow_id = env.suspended()
    c = env.client(token=TOKEN, base_url="http://console.example")
    for path in ("/api/flows", f"/api/flows/{flow_id}", "/api/fleet", "/api/rejected"):
        assert c.get(path).status_code == 401, path
        assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
        assert c.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200, path
    got = c.get(f"/flows/{flow_id}", follow_redirects=False)
    assert got.status_code == 303 and got.headers["location"].startswith("/login?next=")
    assert c.post(f"/flows/{flow_id}/cancel", data={"reason": "x"}).status_code == 401
    assert c.get("/static/console.css").status_code == 200
    login = c.get("/login")
    assert login.status_code == 200 and 'type="password"' in login.text
    assert c.post("/login", data={"token": "wrong"}).status_code == 401
    assert SESSION_COOKIE not in c.cookies
    got = c.post(f"/login?next=/flows/{flow_id}", data={"token": TOKEN}, follow_redirects=False)
    assert got.status_code == 303 and got.headers["location"] == f"/flows/{flow_id}"
    assert TOKEN not in c.cookies[SESSION_COOKIE]  # an HMAC of it, never the token
    page = c.get(f"/flows/{flow_id}")
    assert page.status_code == 200 and "Sign out" in page.text
    # Login never sends anyone off-site.
    got = c.post("/login?next=//evil.example/x", data={"token": TOKEN}, follow_redirects=False)
    assert got.headers["location"] == "/flows"


def test_without_a_token_only_the_pinned_hosts_are_answered(env: Env) -> None:
    c = env.client(hosts=("127.0.0.1", "localhost"), base_url="http://rebound.example")
    assert c.get("/api/flows").status_code == 400
    assert c.get("/flows").status_code == 400
    ok = env.client(hosts=("127.0.0.1", "localhost"), base_url="http://localhost:8787")
    assert ok.get("/api/flows").status_code == 200


def test_read_only_hides_every_action_and_refuses_them(env: Env) -> None:
    flow_id = env.suspended()
    c = env.client(read_only=True)
    page = c.get(f"/flows/{flow_id}")
    assert page.status_code == 200
    for marker in ("signal-form", "cancel-form", '<form method="post"', "Purge"):
        assert marker not in page.text
    assert "read-only" in page.text
    assert "Purge" not in c.get("/fleet").text
    token = c.cookies[CSRF_COOKIE]
    headers = {"X-CSRF-Token": token}
    for path, body in (
        (f"/api/flows/{flow_id}/signal", {"name": "approval", "payload": {}}),
        (f"/api/flows/{flow_id}/cancel", {"reason": "x"}),
        (f"/api/flows/{flow_id}/retry", {}),
        (f"/api/flows/{flow_id}/fork", {"at": 0}),
        ("/api/purge", {"finished_before": "1ms"}),
    ):
        got = c.post(path, json=body, headers=headers)
        assert got.status_code == 403, path
        assert "read-only" in got.json()["message"]
    got = c.post(f"/flows/{flow_id}/cancel", data={"reason": "x", "csrf": token})
    assert got.status_code == 403
    assert c.get("/bulk?action=cancel&status=suspended").status_code == 403
    assert env.app.get_flow(flow_id).status == "suspended"


def test_hostile_text_is_escaped_in_pages_and_json(env: Env) -> None:
    flow_id = env.suspended(order=HOSTILE, flow_id=f"id-{HOSTILE}")
    url_id = quote(flow_id, safe="")
    env.app.store.record_rejected(
        "bad_json", f"detail {HOSTILE}", f"raw {HOSTILE}", flow_id=HOSTILE, name=HOSTILE
    )
    c = env.client()
    search = f"/flows?q={quote(HOSTILE, safe='')}&jump=0"
    for path in ("/flows", f"/flows/{url_id}", "/rejected", search):
        page = c.get(path)
        assert page.status_code == 200, path
        assert "<script>alert" not in page.text, path
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text, path
        assert "\x1b" not in page.text and "\u202e" not in page.text, path
    assert "\\x1b[2J" in c.get(f"/flows/{url_id}").text  # shown, as an escape
    for path in ("/api/flows", f"/api/flows/{url_id}", "/api/rejected"):
        got = c.get(path)
        raw = got.content.decode("ascii")  # every non-ASCII character escaped
        assert "<" not in raw and ">" not in raw and "\x1b" not in raw, path
    # ... and decodes back to the very text.
    assert c.get("/api/flows").json()["flows"][0]["flow_id"] == flow_id
    assert c.get(f"/api/flows/{url_id}").json()["input"]["order"] == HOSTILE
    assert c.get("/api/rejected").json()["rejected"][0]["name"] == HOSTILE


def test_purge_fleet_and_refused_messages(env: Env) -> None:
    done = env.flows["payment"].run(input={"order": "P"}).flow_id
    env.wait(done, "completed")
    waiting = env.suspended()
    env.app.store.record_rejected("unknown_flow", "no flow x", '{"flow_id": "x"}', flow_id="x")
    c = env.client()
    fleet = c.get("/api/fleet").json()
    assert fleet["counts"] == {"completed": 1, "suspended": 1}
    assert fleet["embedded"] is True and fleet["queues"] == []
    assert fleet["due"] == 0
    rejected = c.get("/api/rejected").json()["rejected"]
    assert [(r["reason"], r["flow_id"]) for r in rejected] == [("unknown_flow", "x")]
    assert "no flow x" in c.get("/rejected").text
    headers = csrf(c)
    got = c.post("/api/purge", json={"finished_before": "soon"}, headers=headers)
    assert got.status_code == 422
    got = c.post("/api/purge", json={"finished_before": "1ms"}, headers=headers)
    assert got.status_code == 200 and got.json()["purged"] == 1
    assert c.get(f"/api/flows/{done}").status_code == 404
    assert c.get(f"/api/flows/{waiting}").status_code == 200
    got = c.post(
        "/purge",
        data={"finished_before": "1ms", "csrf": headers["X-CSRF-Token"]},
        follow_redirects=False,
    )
    assert got.status_code == 303 and "purged" in got.headers["location"]


def test_bulk_cancel_by_filter_shows_the_count_before_it_acts(env: Env) -> None:
    ids = [env.suspended(f"B-{i}") for i in range(3)]
    done = env.flows["payment"].run(input={"order": "P"}).flow_id
    env.wait(done, "completed")
    c = env.client()
    page = c.get("/bulk", params={"action": "cancel", "name": "approval"})
    assert page.status_code == 200
    assert '<b id="bulk-count">3</b>' in page.text
    assert all(env.app.get_flow(i).status == "suspended" for i in ids)  # nothing done yet
    token = c.cookies[CSRF_COOKIE]
    got = c.post(
        "/bulk",
        data={
            "action": "cancel",
            "name": "approval",
            "confirm": "yes",
            "reason": "bulk",
            "csrf": token,
        },
        follow_redirects=False,
    )
    assert got.status_code == 303
    assert "Cancelled 3 flow(s)" in c.get(got.headers["location"]).text
    assert [env.app.get_flow(i).status for i in ids] == ["cancelled"] * 3
    assert env.app.get_flow(done).status == "completed"


def test_a_signal_is_checked_at_send_against_the_schema_the_flow_waits_with(env: Env) -> None:
    flow_id = env.suspended()
    c = env.client()
    headers = csrf(c)
    got = c.post(
        f"/api/flows/{flow_id}/signal",
        json={"name": "approval", "payload": {"approved": "maybe"}},
        headers=headers,
    )
    assert got.status_code == 422
    body = got.json()
    assert body["error"] == "InvalidSignal"
    assert {tuple(e["loc"]) for e in body["errors"]} == {("approved",), ("by",)}
    assert env.app.get_flow(flow_id).signals == []  # nothing recorded
    # The page's form: a field per property, the same errors next to their fields.
    page = c.get(f"/flows/{flow_id}")
    for field in ("field.approved", "field.by", "field.note"):
        assert f'name="{field}"' in page.text
    token = c.cookies[CSRF_COOKIE]
    got = c.post(
        f"/flows/{flow_id}/signal",
        data={"csrf": token, "name": "approval", "field.by": "", "field.note": "n<b>"},
    )
    assert got.status_code == 422
    assert 'data-field="by"' in got.text and "Field required" in got.text
    assert 'value="n&lt;b&gt;"' in got.text  # what was typed stays, escaped
    got = c.post(
        f"/flows/{flow_id}/signal",
        data={"csrf": token, "name": "approval", "field.approved": "on", "field.by": "ops"},
        follow_redirects=False,
    )
    assert got.status_code == 303 and "done=signal" in got.headers["location"]
    env.wait(flow_id, "completed")
    assert env.app.get_flow(flow_id).result == {"order": "A-1", "approved": True}


def test_without_a_recorded_schema_the_signal_form_takes_json(env: Env) -> None:
    run = env.flows["memo"].run(input={"order": "M-1"})
    env.wait(run.flow_id, "suspended")
    c = env.client()
    page = c.get(f"/flows/{run.flow_id}")
    assert 'name="payload"' in page.text and "field." not in page.text
    token = c.cookies[CSRF_COOKIE]
    got = c.post(
        f"/flows/{run.flow_id}/signal",
        data={"csrf": token, "name": "memo", "payload": '{"x": nope}'},
    )
    assert got.status_code == 422
    assert "not valid JSON" in got.text
    assert "{&#34;x&#34;: nope}" in got.text  # what was typed stays in the box
    assert env.app.get_flow(run.flow_id).signals == []
    got = c.post(
        f"/flows/{run.flow_id}/signal",
        data={"csrf": token, "name": "memo", "payload": '{"x": [1, 2]}'},
        follow_redirects=False,
    )
    assert got.status_code == 303
    env.wait(run.flow_id, "completed")
    assert env.app.get_flow(run.flow_id).result == {"x": [1, 2]}


def test_retry_fork_and_waiting_through_the_api(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fix = tmp_path / "fixed"
    monkeypatch.setenv("CRUXTEST_CONSOLE_FIX", str(fix))
    failed = env.flows["payment"].run(input={"order": "P-1", "amount": 7}).flow_id
    env.wait(failed, "failed")
    waiting = env.suspended()
    c = env.client()
    headers = csrf(c)
    groups = c.get("/api/waiting").json()["groups"]
    assert [(g["name"], g["kind"], g["on"], g["count"]) for g in groups] == [
        ("approval", "signal", "approval", 1)
    ]
    assert groups[0]["nearest_deadline"] is not None
    assert "approval" in c.get("/waiting").text
    got = c.post(f"/api/flows/{waiting}/retry", json={}, headers=headers)
    assert (got.status_code, got.json()["error"]) == (409, "FlowNotRetryable")
    assert c.post("/api/flows/nope/retry", json={}, headers=headers).status_code == 404
    fix.touch()  # the fix is deployed
    got = c.post(f"/api/flows/{failed}/retry", json={}, headers=headers)
    assert got.json() == {"flow_id": failed, "status": "pending"}
    env.wait(failed, "completed")
    assert env.app.get_flow(failed).result == {"charged": 7}
    got = c.post(
        f"/api/flows/{failed}/fork", json={"at": 1, "input": {"amount": 1}}, headers=headers
    )
    assert (got.status_code, got.json()["error"]) == (422, "InvalidInput")  # order is required
    got = c.post(f"/api/flows/{failed}/fork", json={"at": "1"}, headers=headers)
    assert got.status_code == 422
    got = c.post(
        f"/api/flows/{failed}/fork",
        json={"at": 1, "input": {"order": "P-1", "amount": 3}},
        headers=headers,
    )
    assert got.status_code == 200
    fork = got.json()["flow_id"]
    assert fork != failed and got.json()["forked_from"] == failed
    env.wait(fork, "completed")
    state = c.get(f"/api/flows/{fork}").json()
    assert state["forked_from"] == {"flow_id": failed, "at": 1}
    assert state["result"] == {"charged": 3}
    assert "forked from" in c.get(f"/flows/{fork}").text


def test_bulk_retry_by_filter_retries_only_the_failed(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fix = tmp_path / "fixed"
    monkeypatch.setenv("CRUXTEST_CONSOLE_FIX", str(fix))
    failed = [env.flows["payment"].run(input={"order": f"P-{i}"}).flow_id for i in range(2)]
    for flow_id in failed:
        env.wait(flow_id, "failed")
    waiting = env.suspended()
    c = env.client()
    page = c.get("/bulk", params={"action": "retry"})
    assert '<b id="bulk-count">2</b>' in page.text
    fix.touch()
    got = c.post(
        "/bulk",
        data={"action": "retry", "confirm": "yes", "csrf": c.cookies[CSRF_COOKIE]},
        follow_redirects=False,
    )
    assert "Retried 2 flow(s)" in c.get(got.headers["location"]).text
    for flow_id in failed:
        env.wait(flow_id, "completed")
    assert env.app.get_flow(waiting).status == "suspended"


def test_the_cli_serves_the_console_on_the_embedded_default_without_running_flows(
    tmp_path: Path,
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRUX")}
    env.update(PYTHONPATH=str(REPO), CRUX_DATABASE_URL=f"sqlite:///{tmp_path}/ui.db")
    seed = Crux(Settings(database_url=f"sqlite:///{tmp_path}/ui.db"), record_only=True)
    handle = seed.flow("payment", input=console_flows.Order)(console_flows.payment)
    flow_id = handle.run(input={"order": "cli"}).flow_id
    seed.close()
    cmd = [sys.executable, "-m", "crux_workers", "ui", "--port", str(port)]
    cmd += ["--import", "tests.integration.console_flows"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                got = httpx.get(f"http://127.0.0.1:{port}/api/flows/{flow_id}", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "crux-workers ui did not answer in 30s"
                time.sleep(0.2)
        assert got.status_code == 200
        # Record-only: the console serves the record but never runs the pending flow.
        time.sleep(1.5)
        assert httpx.get(f"http://127.0.0.1:{port}/api/flows/{flow_id}").json()["status"] == (
            "pending"
        )
        assert "payment" in httpx.get(f"http://127.0.0.1:{port}/flows").text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)


def test_metrics_are_served_behind_the_same_guard(env: Env) -> None:
    env.suspended()
    got = env.client().get("/metrics")
    assert got.status_code == 200
    assert "crux_flows" in got.text and 'status="suspended"' in got.text
    guarded = env.client(token=TOKEN)
    assert guarded.get("/metrics").status_code == 401
    ok = guarded.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200


def test_the_cli_refuses_to_serve_off_loopback_without_a_token() -> None:
    runner = CliRunner()
    got = runner.invoke(main, ["ui", "--host", "0.0.0.0"], env={"CRUX_UI_TOKEN": None})
    assert got.exit_code != 0
    assert "without a token" in got.output
    got = runner.invoke(main, ["ui", "--host", "0.0.0.0", "--token", "short"])
    assert got.exit_code != 0 and "at least 16" in got.output
