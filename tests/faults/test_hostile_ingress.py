"""Hostile messages against a real ingress and a real worker (issue 11: 3, 4, 6 and 9).

Each test publishes what an attacker with plain broker access can publish, straight onto
the Redis lists, and checks what the processes and the record make of it.
"""

from __future__ import annotations

import base64
import bz2
import hashlib
import hmac
import json
import signal
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from crux_workers import Crux, Settings
from tests.support.fleet import FaultFleet
from tests.support.report import report
from tests.workers import REPO, Service

SECRET = "hostile-tests-secret-of-32-bytes-or-more"
MB = 1024 * 1024
RSS_BOUND_MB = 200  # generous: an idle ingress or worker main process takes well under 100
BOMB_MB = 300  # what the compressed bodies inflate to


# -- helpers ---------------------------------------------------------------------------


def drained(client: Any, queue: str | None = "crux", within: float = 15.0) -> bool:
    """Whether the queue and the unacked set empty out (bounded): the flow's outcome is
    recorded a moment before its task message is acknowledged."""
    deadline = time.monotonic() + within
    while True:
        if (queue is None or client.llen(queue) == 0) and client.hlen("unacked") == 0:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def start_ingress(fleet: FaultFleet, **env: str) -> Service:
    return fleet.service("ingress", "ingress", "--import", "tests.faults.flows", env=env).wait_for(
        "ingress: consuming"
    )


def raw_envelope(
    body: Any,
    headers: Any = None,
    *,
    queue: str = "crux.signals",
    **properties: Any,
) -> str:
    """A kombu envelope on a Redis list, with whatever body and headers an attacker likes."""
    return json.dumps(
        {
            "body": body,
            "content-type": "application/json",
            "content-encoding": "utf-8",
            "headers": {} if headers is None else headers,
            "properties": {
                "delivery_tag": uuid.uuid4().hex,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
                **properties,
            },
        }
    )


def item(flow_id: str, n: int, *, tag: str = "ok", key: str | None = None) -> str:
    fields: dict[str, Any] = {"flow_id": flow_id, "name": "item", "payload": {"n": n, "tag": tag}}
    fields["key"] = key or f"item-{n}-{uuid.uuid4().hex[:8]}"
    return json.dumps(fields)


def v2_headers(body: str, secret: str = SECRET, at: float | None = None) -> dict[str, str]:
    """The signature headers of docs/signals.md, computed here from the spec, not the code."""
    stamp = str(int(time.time() if at is None else at))
    signed = b"crux-signal-v2\n" + stamp.encode() + b"\n" + body.encode()
    mac = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return {"crux-timestamp": stamp, "crux-signature": "v2=" + mac}


def deflate_bomb(megabytes: int) -> bytes:
    """A zlib body of about a thousandth of ``megabytes`` that inflates to that many MB."""
    c = zlib.compressobj(9)
    chunk = bytes(MB)
    return b"".join(c.compress(chunk) for _ in range(megabytes)) + c.flush()


def bzip2_bomb(megabytes: int) -> bytes:
    """A bzip2 body of a few hundred bytes that inflates to ``megabytes`` MB."""
    c = bz2.BZ2Compressor(9)
    chunk = bytes(MB)
    return b"".join(c.compress(chunk) for _ in range(megabytes)) + c.flush()


def peak_rss_mb(pid: int) -> float:
    """The peak resident set size of a live process (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def wait_until(
    check: Callable[[], Any],
    what: str,
    timeout: float = 45,
    logs: Service | None = None,
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s\n{logs.tail() if logs else ''}")
        time.sleep(0.1)


def signals(fleet: FaultFleet, flow_id: str) -> list[tuple[str, str]]:
    rows = fleet.query(
        "SELECT key, payload FROM crux_signals WHERE flow_id = %s ORDER BY id", [flow_id]
    )
    return [(k, p) for k, p in rows]


def refusals(fleet: FaultFleet) -> list[tuple[str, str, str, str | None, str | None]]:
    rows = fleet.query(
        "SELECT reason, detail, raw, flow_id, name FROM crux_rejected_signals ORDER BY id"
    )
    return [tuple(r) for r in rows]  # type: ignore[misc]


@pytest.fixture
def client(fleet: FaultFleet) -> Iterator[Any]:
    c = redis.Redis.from_url(fleet.redis_url)
    try:
        yield c
    finally:
        c.close()


# -- 3. one malformed envelope must not stop the ingress --------------------------------


def test_each_malformed_envelope_is_refused_and_acked_and_the_next_signal_recorded(
    fleet: FaultFleet, client: Any
) -> None:
    ingress = start_ingress(fleet)
    run = fleet.flows["fault-inbox"].run(input={})
    good_body = item(run.flow_id, 0)
    garbage = {
        "object body": raw_envelope({"flow_id": run.flow_id, "name": "item"}),
        "number body": raw_envelope(42),
        "list body": raw_envelope([1, 2, 3]),
        "unknown compression": raw_envelope(good_body, {"compression": "application/x-nope"}),
        "zlib compression": raw_envelope(
            base64.b64encode(zlib.compress(good_body.encode())).decode(),
            {"compression": "application/x-gzip"},
            body_encoding="base64",
        ),
        "unknown body_encoding": raw_envelope(good_body, body_encoding="rot13"),
        "headers a list": raw_envelope(good_body, ["compression"]),
        "body not utf-8": raw_envelope("\ud800 lone surrogate"),
    }
    # Each piece of garbage is followed by a valid signal: with prefetch 1, a message
    # left unacknowledged would hold back everything after it.
    for n, bad in enumerate(garbage.values(), start=1):
        client.lpush("crux.signals", bad)
        client.lpush("crux.signals", raw_envelope(item(run.flow_id, n)))
    wait_until(
        lambda: len(signals(fleet, run.flow_id)) == len(garbage),
        "valid signals after garbage recorded",
        logs=ingress,
    )
    wait_until(lambda: len(refusals(fleet)) == len(garbage), "garbage refused")
    time.sleep(0.5)  # a straggler (a double recording) would show now
    reasons = [r[0] for r in refusals(fleet)]
    assert len(reasons) == len(garbage), reasons
    assert sorted(reasons) == sorted(
        ["bad_envelope"] * 5 + ["compressed", "compressed", "undecodable"]
    ), reasons
    assert [json.loads(p)["n"] for _, p in signals(fleet, run.flow_id)] == list(
        range(1, len(garbage) + 1)
    )
    # Acknowledged, all of them: nothing waits in the queue or among the unacked.
    assert client.llen("crux.signals") == 0
    assert drained(client, queue=None), "a message stayed unacknowledged"
    assert ingress.proc.poll() is None, ingress.tail()


# -- 4. decompression bombs ---------------------------------------------------------------


def test_a_compression_bomb_is_refused_by_the_ingress_before_it_is_inflated(
    fleet: FaultFleet, client: Any, request: pytest.FixtureRequest
) -> None:
    ingress = start_ingress(fleet)
    run = fleet.flows["fault-inbox"].run(input={})
    bomb = deflate_bomb(BOMB_MB)
    before = peak_rss_mb(ingress.proc.pid)
    client.lpush(
        "crux.signals",
        raw_envelope(
            base64.b64encode(bomb).decode(),
            {"compression": "application/x-gzip"},
            body_encoding="base64",
        ),
    )
    client.lpush("crux.signals", raw_envelope(item(run.flow_id, 1)))
    wait_until(
        lambda: ingress.proc.poll() is not None or len(signals(fleet, run.flow_id)) == 1,
        "the signal after the bomb",
        timeout=60,
    )
    alive = ingress.proc.poll() is None
    peak = peak_rss_mb(ingress.proc.pid) if alive else float("nan")
    report(
        request,
        "ingress bomb",
        bomb_kb=len(bomb) // 1024,
        inflates_to_mb=BOMB_MB,
        rss_before_mb=round(before),
        peak_rss_mb=round(peak),
        alive=alive,
    )
    assert alive, ingress.tail()
    assert peak < RSS_BOUND_MB
    assert [r[0] for r in refusals(fleet)] == ["compressed"]
    assert len(refusals(fleet)[0][2]) < 1200  # a prefix, the size and the digest
    assert client.llen("crux.signals") == 0


def celery_envelope(body: str, headers: dict[str, Any], **properties: Any) -> str:
    """A task message as Celery's protocol 2 lays it on the Redis list of queue ``crux``."""
    task_id = str(uuid.uuid4())
    return raw_envelope(
        body,
        {"lang": "py", "task": "crux.sweep", "id": task_id, "root_id": task_id, **headers},
        queue="crux",
        correlation_id=task_id,
        reply_to=str(uuid.uuid4()),
        **properties,
    )


def test_a_compression_bomb_is_refused_by_a_worker_before_it_is_inflated(
    fleet: FaultFleet, client: Any, request: pytest.FixtureRequest
) -> None:
    worker = fleet.worker(concurrency=1)
    before = peak_rss_mb(worker.proc.pid)
    bomb = bzip2_bomb(BOMB_MB)
    client.lpush(
        "crux",
        celery_envelope(
            base64.b64encode(bomb).decode(),
            {"compression": "application/x-bz2"},
            body_encoding="base64",
        ),
    )
    # Work sent after the bomb still gets done by the same worker.
    run = fleet.flows["fault-inbox"].run(input={})
    fleet.app.signal_flow(run.flow_id, "item", {"n": 1, "tag": "stop"})
    outcome = run.wait(timeout=90)
    alive = worker.proc.poll() is None
    peak = peak_rss_mb(worker.proc.pid) if alive else float("nan")
    report(
        request,
        "worker bomb",
        bomb_bytes=len(bomb),
        inflates_to_mb=BOMB_MB,
        rss_before_mb=round(before),
        peak_rss_mb=round(peak),
        alive=alive,
    )
    assert alive, worker.tail()
    assert outcome.status == "completed"
    assert peak < RSS_BOUND_MB
    assert "refusing a task message before decoding it (compressed" in worker.log.read_text()
    assert drained(client), "a message stayed queued or unacknowledged"


def test_a_compression_bomb_broadcast_to_remote_control_is_not_inflated(
    fleet: FaultFleet, client: Any, request: pytest.FixtureRequest
) -> None:
    # Remote control is off by default; a deployment that turns it on (Flower, celery
    # inspect) must still not inflate what arrives on its broadcast channel.
    fleet.env = {**fleet.env, "CRUX_REMOTE_CONTROL": "true"}
    worker = fleet.worker(concurrency=1)
    before = peak_rss_mb(worker.proc.pid)
    topic = "/0.celery.pidbox"  # kombu's fanout topic for the exchange, db 0
    bomb = bzip2_bomb(BOMB_MB)
    message = json.loads(
        celery_envelope(
            base64.b64encode(bomb).decode(),
            {"compression": "application/x-bz2"},
            body_encoding="base64",
        )
    )
    message["properties"]["delivery_info"] = {"exchange": "celery.pidbox", "routing_key": ""}
    assert client.publish(topic, json.dumps(message)) >= 1  # the worker is listening
    # The worker still works, and did not inflate the bomb.
    run = fleet.flows["fault-inbox"].run(input={})
    fleet.app.signal_flow(run.flow_id, "item", {"n": 1, "tag": "stop"})
    outcome = run.wait(timeout=90)
    time.sleep(1.0)  # the broadcast is handled in the same loop; let it land
    alive = worker.proc.poll() is None
    peak = peak_rss_mb(worker.proc.pid) if alive else float("nan")
    report(
        request,
        "worker remote-control bomb",
        rss_before_mb=round(before),
        peak_rss_mb=round(peak),
        alive=alive,
    )
    assert alive, worker.tail()
    assert outcome.status == "completed"
    assert peak < RSS_BOUND_MB


def test_a_worker_refuses_an_oversized_task_message_before_decoding_it(
    fleet: FaultFleet, client: Any
) -> None:
    fleet.env["CRUX_WORKER_MAX_MESSAGE_BYTES"] = str(64 * 1024)
    worker = fleet.worker(concurrency=1)
    args = json.dumps([[], {}, {"callbacks": None, "errbacks": None, "chain": None}])
    padded = args[:-1] + ', "pad": "' + "x" * (256 * 1024) + '"}'
    client.lpush("crux", celery_envelope(padded, {}))
    run = fleet.flows["fault-inbox"].run(input={})
    fleet.app.signal_flow(run.flow_id, "item", {"n": 1, "tag": "stop"})
    assert run.wait(timeout=60).status == "completed"
    assert worker.proc.poll() is None, worker.tail()
    assert "refusing a task message before decoding it (too_large" in worker.log.read_text()
    assert drained(client), "a message stayed queued or unacknowledged"


# -- 6. replay of signed messages ------------------------------------------------------------


def test_a_captured_signed_message_is_a_duplicate_in_its_window_and_refused_after(
    fleet: FaultFleet, client: Any
) -> None:
    max_age = 8
    ingress = start_ingress(fleet, CRUX_SIGNAL_SECRET=SECRET, CRUX_SIGNAL_MAX_AGE=f"{max_age}s")
    run = fleet.flows["fault-inbox"].run(input={})
    # The attacker captures a message a real publisher sent (here: from a side queue).
    publisher = Crux(
        Settings(redis_url=fleet.redis_url, signal_secret=SECRET, signal_queue="captured")
    )
    try:
        sent_at = time.time()
        publisher.publish_signal(run.flow_id, "item", {"n": 1, "tag": "real"}, key="real-1")
    finally:
        publisher.close()
    captured = client.rpop("captured")
    assert captured is not None

    def deliver_then_flush(raw: bytes | str, marker: int) -> None:
        """Deliver ``raw``, then a fresh valid message; wait until that one is recorded."""
        client.lpush("crux.signals", raw)
        body = item(run.flow_id, marker, key=f"marker-{marker}")
        client.lpush("crux.signals", raw_envelope(body, v2_headers(body)))
        wait_until(
            lambda: any(k == f"marker-{marker}" for k, _ in signals(fleet, run.flow_id)),
            f"marker {marker}",
            logs=ingress,
        )

    deliver_then_flush(captured, 100)  # the genuine delivery
    deliver_then_flush(captured, 101)  # replayed within the window: the key makes it a no-op
    assert [k for k, _ in signals(fleet, run.flow_id)].count("real-1") == 1
    assert refusals(fleet) == []

    time.sleep(max(0.0, sent_at + max_age + 1.5 - time.time()))
    deliver_then_flush(captured, 102)  # replayed after the window: refused
    assert [k for k, _ in signals(fleet, run.flow_id)].count("real-1") == 1
    assert [(r[0], r[3], r[4]) for r in refusals(fleet)] == [("stale", run.flow_id, "item")]

    # Signed, but with no key (a replay would not be a duplicate), or a v1 body-only MAC.
    keyless = json.dumps({"flow_id": run.flow_id, "name": "item", "payload": {"n": 7, "tag": "x"}})
    client.lpush("crux.signals", raw_envelope(keyless, v2_headers(keyless)))
    v1_body = item(run.flow_id, 8, key="v1-8")
    v1 = "sha256=" + hmac.new(SECRET.encode(), v1_body.encode(), hashlib.sha256).hexdigest()
    client.lpush("crux.signals", raw_envelope(v1_body, {"crux-signature": v1}))
    wait_until(lambda: len(refusals(fleet)) == 3, "keyless and v1 refused")
    assert [(r[0], "key is required" in r[1]) for r in refusals(fleet)[1:]] == [
        ("bad_fields", True),
        ("bad_signature", False),
    ]
    assert "v1" in refusals(fleet)[2][1]
    assert {k for k, _ in signals(fleet, run.flow_id)} == {
        "real-1",
        "marker-100",
        "marker-101",
        "marker-102",
    }
    assert ingress.proc.poll() is None, ingress.tail()


def test_during_rotation_the_ingress_accepts_the_previous_secret_too(
    fleet: FaultFleet, client: Any
) -> None:
    start_ingress(
        fleet,
        CRUX_SIGNAL_SECRET="the-new-secret-of-32-bytes-or-more",
        CRUX_SIGNAL_SECRET_PREVIOUS="the-old-secret-of-32-bytes-or-more",
    )
    run = fleet.flows["fault-inbox"].run(input={})
    for n, secret in enumerate(
        ["the-new-secret-of-32-bytes-or-more", "the-old-secret-of-32-bytes-or-more", "not-a-secret"]
    ):
        body = item(run.flow_id, n, key=f"rot-{n}")
        client.lpush("crux.signals", raw_envelope(body, v2_headers(body, secret)))
    wait_until(lambda: len(refusals(fleet)) == 1, "the third refused")
    wait_until(lambda: len(signals(fleet, run.flow_id)) == 2, "the first two recorded")
    assert [k for k, _ in signals(fleet, run.flow_id)] == ["rot-0", "rot-1"]
    assert [r[0] for r in refusals(fleet)] == ["bad_signature"]


# -- 9. refused messages are bounded, and reach terminals escaped ------------------------------

HOSTILE = "\x1b]0;owned terminal title\x07\x1b[2J\r\x9b31m\u202egnp.exe\u2066"


def test_refusals_are_bounded_and_every_cli_cell_is_escaped(fleet: FaultFleet, client: Any) -> None:
    start_ingress(fleet)
    huge = HOSTILE + "A" * (64 * 1024)  # not JSON: refused with the body kept (a prefix)
    escapes = json.dumps({"flow_id": HOSTILE, "name": HOSTILE, "key": "k"})  # not printable
    fields: dict[str, Any] = {f"{HOSTILE}-{i}-" + "y" * 500: i for i in range(100)}
    many = json.dumps({"flow_id": "f", "name": "n", **fields})  # a detail that would be huge
    for body in (huge, escapes, many):
        client.lpush("crux.signals", raw_envelope(body))
    wait_until(lambda: len(refusals(fleet)) == 3, "three refusals")
    rows = refusals(fleet)
    assert [r[0] for r in rows] == ["not_json", "bad_fields", "bad_fields"]
    for _reason, detail, raw, _flow, _name in rows:
        assert len(raw) <= 1024 + 120, len(raw)
        assert len(detail) <= 500, len(detail)
    size = len(huge.encode())
    assert f"[{size} bytes, sha256 {hashlib.sha256(huge.encode()).hexdigest()}]" in rows[0][2]
    assert rows[1][3] == HOSTILE  # kept as it came, for --json; escaped on a terminal

    env = fleet.env
    shown = subprocess.run(
        [sys.executable, "-m", "crux_workers", "flows", "rejected"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert "bad_fields" in out and "not_json" in out
    lines = out.splitlines()
    assert len(lines) == 4  # a header and one line per refusal: no raw newline got through
    for bad in ("\x1b", "\x07", "\r", "\x9b", "\u202e", "\u2066"):
        assert bad not in out, repr(bad)
    assert "\\x1b]0;owned terminal title\\x07" in out

    as_json = subprocess.run(
        [sys.executable, "-m", "crux_workers", "flows", "rejected", "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert as_json.returncode == 0, as_json.stderr
    assert "\x1b" not in as_json.stdout
    parsed = json.loads(as_json.stdout)
    assert {r["flow_id"] for r in parsed} >= {HOSTILE}


# -- the ingress and its broker: an outage ridden out, SIGTERM obeyed ----------------------


def _stop_in(ingress: Service) -> tuple[int, float]:
    """SIGTERM the ingress; its exit code and how long it took to exit."""
    t0 = time.monotonic()
    code = ingress.kill(signal.SIGTERM)
    return code, time.monotonic() - t0


def test_the_ingress_rides_out_a_broker_outage_and_stops_promptly_on_sigterm(
    fleet: FaultFleet, client: Any, request: pytest.FixtureRequest
) -> None:
    ingress = start_ingress(fleet)
    run = fleet.flows["fault-inbox"].run(input={})
    try:
        fleet.redis.stop()
        time.sleep(2.0)  # the ingress finds its broker gone and backs off
        assert ingress.proc.poll() is None, ingress.tail()
        fleet.redis.start()  # same port, empty
        # It reconnects by itself: a message published after the outage is recorded.
        body = item(run.flow_id, 1, key="after-outage")
        client.lpush("crux.signals", raw_envelope(body))
        wait_until(lambda: signals(fleet, run.flow_id), "recorded after the outage", logs=ingress)
        assert [k for k, _ in signals(fleet, run.flow_id)] == ["after-outage"]
        up_code, up_s = _stop_in(ingress)

        # And with its broker gone, SIGTERM still ends it: no wait on a dead connection.
        second = start_ingress(fleet)
        fleet.redis.stop()
        time.sleep(2.0)
        assert second.proc.poll() is None, second.tail()
        down_code, down_s = _stop_in(second)
    finally:
        if fleet.redis.pid is None:
            fleet.redis.start()
    report(
        request,
        "ingress sigterm",
        broker_up_exit=up_code,
        broker_up_s=round(up_s, 2),
        broker_down_exit=down_code,
        broker_down_s=round(down_s, 2),
    )
    assert (up_code, down_code) == (0, 0), ingress.tail() + second.tail()
    assert up_s < 10 and down_s < 10, (up_s, down_s)
