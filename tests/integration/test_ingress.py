"""Signals from other services: publish_signal, the ingress consumer, the wire format."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

import redis
from sqlalchemy import create_engine, text

from crux_workers import Crux, Settings
from crux_workers._wire import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from tests.support.fleet import Fleet
from tests.workers import REPO, Service

from .test_fleet import SIGNUP, wait_status

SECRET = "s3cret-for-tests-at-least-32-bytes-long"
VERIFIED = {"verified_at": "2026-11-21T10:00:00Z"}


def start_ingress(fleet: Fleet, **env: str) -> Service:
    return fleet.service(
        "ingress", "ingress", "--import", "tests.integration.flows", env=env
    ).wait_for("ingress: consuming")


def envelope(body: str | bytes, headers: dict[str, Any] | None = None) -> str:
    """kombu's envelope on a Redis list, as docs/signals.md describes it for raw publishers."""
    return json.dumps(
        {
            "body": body.decode() if isinstance(body, bytes) else body,
            "content-type": "application/json",
            "content-encoding": "utf-8",
            "headers": headers or {},
            "properties": {
                "delivery_tag": f"t-{time.monotonic_ns()}",
                "delivery_info": {"exchange": "", "routing_key": "crux.signals"},
                "priority": 0,
            },
        }
    )


def rejected(pg_url: str) -> list[tuple[str, str | None]]:
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT reason, flow_id FROM crux_rejected_signals ORDER BY id")
            ).all()
    finally:
        engine.dispose()
    return [(r[0], r[1]) for r in rows]


def wait_until(check: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_publish_signal_from_a_broker_only_service_resumes_the_flow(fleet: Fleet) -> None:
    fleet.worker("w1")
    ingress = start_ingress(fleet)
    run = fleet.flows["onboarding"].run(input=SIGNUP)
    wait_status(run, "suspended")
    # The publisher has the broker and nothing else: no database, no flow code.
    publisher = Crux(Settings(redis_url=fleet.redis_url))
    try:
        key = publisher.publish_signal(run.flow_id, "email-verified", VERIFIED)
        publisher.publish_signal(run.flow_id, "email-verified", VERIFIED, key=key)
    finally:
        publisher.close()
    outcome = run.wait(timeout=30)
    assert outcome.status == "completed"
    signals = run.state().signals
    assert [(s.key, s.status) for s in signals] == [(key, "consumed")]
    assert key.startswith("pub-")
    assert ingress.proc.poll() is None
    assert rejected(fleet.pg_url) == []


def test_a_shell_publisher_with_redis_cli_and_hmac_resumes_the_flow(fleet: Fleet) -> None:
    fleet.worker("w1")
    start_ingress(fleet, CRUX_SIGNAL_SECRET=SECRET)
    run = fleet.flows["onboarding"].run(input=SIGNUP)
    wait_status(run, "suspended")
    env = {"PATH": "/usr/bin:/bin", "CRUX_SIGNAL_SECRET": SECRET}
    for _ in range(2):  # the same key twice: recorded once
        subprocess.run(
            [
                "bash",
                str(REPO / "scripts" / "publish_signal.sh"),
                fleet.redis_url,
                run.flow_id,
                "email-verified",
                json.dumps(VERIFIED),
                "from-shell-1",
            ],
            env=env,
            check=True,
            capture_output=True,
        )
    assert run.wait(timeout=30).status == "completed"
    assert [(s.key, s.status) for s in run.state().signals] == [("from-shell-1", "consumed")]
    assert rejected(fleet.pg_url) == []


def test_bad_messages_are_recorded_as_rejected_and_never_stop_the_consumer(fleet: Fleet) -> None:
    fleet.worker("w1")
    ingress = start_ingress(fleet, CRUX_SIGNAL_SECRET=SECRET, CRUX_SIGNAL_MAX_BYTES="2048")
    run = fleet.flows["onboarding"].run(input=SIGNUP)
    wait_status(run, "suspended")
    done = fleet.flows["pair"].run(input={"n": 2})
    fleet.app.signal_flow(done.flow_id, "n", 1)
    fleet.app.signal_flow(done.flow_id, "n", 2)
    assert done.wait(timeout=30).status == "completed"

    def signed(fields: dict[str, Any] | str) -> str:
        body = fields if isinstance(fields, str) else json.dumps(fields)
        stamp = str(int(time.time()))
        return envelope(
            body,
            {
                TIMESTAMP_HEADER: stamp,
                SIGNATURE_HEADER: sign(SECRET.encode(), body.encode(), stamp),
            },
        )

    good = {"flow_id": run.flow_id, "name": "email-verified", "payload": VERIFIED, "key": "ok"}
    bad = [
        signed("{not json"),
        signed("\x00 NUL bytes cannot go into Postgres text \x00"),
        signed({"flow_id": run.flow_id}),
        signed({"flow_id": run.flow_id, "name": "email-verified", "colour": "blue"}),
        signed({"flow_id": "no-such-flow", "name": "email-verified", "key": "k1"}),
        signed({"flow_id": done.flow_id, "name": "n", "payload": 3, "key": "k2"}),
        signed({"flow_id": run.flow_id, "name": "email-verified", "payload": "x" * 4000}),
        envelope(json.dumps(good)),
        envelope(json.dumps(good), {"crux-signature": "sha256=" + "0" * 64}),
        "this is not even a kombu envelope",
    ]
    client = redis.Redis.from_url(fleet.redis_url)
    try:
        for raw in bad:
            client.lpush("crux.signals", raw)
        client.lpush("crux.signals", signed(good))
        assert run.wait(timeout=30).status == "completed"
        wait_until(lambda: len(rejected(fleet.pg_url)) == len(bad))
        assert client.llen("crux.signals") == 0
    finally:
        client.close()
    reasons = sorted(r for r, _ in rejected(fleet.pg_url))
    assert reasons == sorted(
        [
            "not_json",
            "not_json",
            "bad_fields",
            "bad_fields",
            "unknown_flow",
            "flow_finished",
            "too_large",
            "unsigned",
            "bad_signature",
            "undecodable",
        ]
    )
    assert ("unknown_flow", "no-such-flow") in rejected(fleet.pg_url)
    assert ingress.proc.poll() is None, ingress.tail()
