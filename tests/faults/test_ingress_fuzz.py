"""Fuzzed messages on the signals queue: the ingress records or refuses each, and lives on."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, text

from crux_workers._wire import TIMESTAMP_HEADER, sign
from tests.support.fleet import FaultFleet
from tests.workers import Service

SECRET = "fuzz-secret-of-at-least-32-bytes-long"
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


def bodies(flow_id: str) -> st.SearchStrategy[tuple[str, bool]]:
    """A body, and whether it is a well-formed signal for the live flow."""
    good = st.builds(
        lambda payload: (
            json.dumps(
                {"flow_id": flow_id, "name": "item", "payload": payload, "key": uuid.uuid4().hex}
            ),
            True,
        ),
        json_values,
    )
    wrong_fields = st.builds(
        lambda fields: (json.dumps(fields), False),
        st.dictionaries(
            st.sampled_from(["flow_id", "name", "payload", "key", "v", "extra"]),
            json_values,
            max_size=5,
        ),
    )
    other = st.builds(lambda b: (b, False), st.text(max_size=60))
    return st.one_of(good, wrong_fields, other)


def envelope(body: str, signature: str | None, stamp: str = "") -> str:
    return json.dumps(
        {
            "body": body,
            "content-type": "application/json",
            "content-encoding": "utf-8",
            "headers": {"crux-signature": signature, TIMESTAMP_HEADER: stamp} if signature else {},
            "properties": {
                "delivery_tag": uuid.uuid4().hex,
                "delivery_info": {"exchange": "", "routing_key": "crux.signals"},
                "priority": 0,
            },
        }
    )


def counts(pg_url: str, flow_id: str) -> tuple[int, int, int]:
    """Signals recorded; messages refused; of those, payloads refused at send (the flow
    was waiting on "item" and the payload failed its schema: reason invalid_payload)."""
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            rejected = conn.execute(text("SELECT count(*) FROM crux_rejected_signals")).scalar()
            invalid = conn.execute(
                text("SELECT count(*) FROM crux_rejected_signals WHERE reason = 'invalid_payload'")
            ).scalar()
            recorded = conn.execute(
                text("SELECT count(*) FROM crux_signals WHERE flow_id = :f"), {"f": flow_id}
            ).scalar()
    finally:
        engine.dispose()
    return int(recorded or 0), int(rejected or 0), int(invalid or 0)


def test_fuzzed_signal_messages_are_each_recorded_or_refused(fleet: FaultFleet) -> None:
    fleet.worker(concurrency=1)
    ingress = Service(
        "ingress",
        {**fleet.env, "CRUX_SIGNAL_SECRET": SECRET},
        fleet.tmp,
        "ingress",
        "--import",
        "tests.faults.flows",
    ).wait_for("ingress: consuming")
    run = fleet.flows["fault-inbox"].run(input={})
    client = fleet.redis.client()
    sent = {"good": 0, "bad": 0, "garbage": 0}
    try:

        @settings(
            max_examples=150,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(
            body=bodies(run.flow_id),
            signing=st.sampled_from(["right", "wrong", "none"]),
            garbage=st.booleans(),
        )
        def publish(body: tuple[str, bool], signing: str, garbage: bool) -> None:
            text_, good = body
            if garbage and not good:
                client.lpush("crux.signals", text_)  # not even kombu's envelope
                sent["garbage"] += 1
                return
            stamp = str(int(time.time()))
            signature = {
                "right": sign(SECRET.encode(), text_.encode(), stamp),
                "wrong": sign(b"not-the-secret", text_.encode(), stamp),
                "none": None,
            }[signing]
            client.lpush("crux.signals", envelope(text_, signature, stamp))
            sent["good" if good and signing == "right" else "bad"] += 1

        publish()
        total = sum(sent.values())
        deadline = time.monotonic() + 120
        while True:
            recorded, rejected, _ = counts(fleet.pg_url, run.flow_id)
            if recorded + rejected >= total and client.llen("crux.signals") == 0:
                break
            assert time.monotonic() < deadline, (sent, recorded, rejected, ingress.tail())
            time.sleep(0.2)
        # Let a straggler (a miscount) show up before asserting exact numbers.
        time.sleep(1.0)
        recorded, rejected, invalid = counts(fleet.pg_url, run.flow_id)
        print(
            f"\n[faults] ingress fuzz: sent={total} good={sent['good']} bad={sent['bad']} "
            f"garbage={sent['garbage']} recorded={recorded} rejected={rejected} "
            f"invalid_payload={invalid} ingress_alive={ingress.proc.poll() is None}"
        )
        # A well-formed message whose payload fails the schema the flow waits with is
        # refused at send (docs/operations.md), else recorded and rejected when consumed.
        assert recorded + invalid == sent["good"]
        assert rejected - invalid == sent["bad"] + sent["garbage"]
        assert ingress.proc.poll() is None, ingress.tail()
        # The flow is unharmed: a final valid signal still ends it.
        fleet.app.signal_flow(run.flow_id, "item", {"n": 0, "tag": "stop"})
        outcome: Any = run.wait(timeout=60)
        assert outcome.status == "completed"
    finally:
        client.close()
        ingress.kill()
