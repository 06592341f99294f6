"""Raw broker envelopes checked before kombu decodes them, and what the CLI prints."""

from __future__ import annotations

import hashlib
import json
import zlib
from typing import Any

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue

from crux_workers._cli_flows import safe, table
from crux_workers._envelope import guard_channel, kept, problem


def envelope(body: Any = "{}", headers: Any = None, **properties: Any) -> dict[str, Any]:
    return {
        "body": body,
        "headers": {} if headers is None else headers,
        "properties": {"delivery_tag": "t", "delivery_info": {}, **properties},
    }


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (envelope({"flow_id": "f"}), "bad_envelope"),
        (envelope(5), "bad_envelope"),
        (envelope([1]), "bad_envelope"),
        (envelope(headers=["compression"]), "bad_envelope"),
        (envelope(headers={"compression": "application/x-gzip"}), "compressed"),
        (envelope(headers={"compression": "no-such-thing"}), "compressed"),
        (envelope(body_encoding="rot13"), "bad_envelope"),
        (envelope(body_encoding=7), "bad_envelope"),
        (envelope("x" * 2000), "too_large"),
        (envelope("x" * 2800, body_encoding="base64"), "too_large"),
    ],
)
def test_hostile_envelopes_are_refused_before_decoding(payload: Any, reason: str) -> None:
    refusal = problem(payload, 1024)
    assert refusal is not None and refusal.reason == reason


@pytest.mark.parametrize(
    "payload",
    [
        envelope(),
        envelope(None),
        envelope("x" * 1024),
        envelope("x" * 1300, body_encoding="base64"),
        envelope(body_encoding="utf-8"),
        {"body": "{}", "properties": {"delivery_tag": "t"}},  # no headers at all
        "not an envelope",  # kombu refuses it itself, undecoded
        {"body": "{}"},
    ],
)
def test_ordinary_envelopes_pass(payload: Any) -> None:
    assert problem(payload, 1024) is None


def test_what_is_kept_of_a_body_is_a_bounded_prefix_with_size_and_digest() -> None:
    body = "é" * 5000
    data = body.encode()
    got = kept(body)
    assert got.startswith("é" * 512)
    assert got.endswith(f"[{len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}]")
    assert len(got) < 1024 + 100
    assert (
        kept(b"\xff\xfe")
        == "\ufffd\ufffd\n[2 bytes, sha256 " + hashlib.sha256(b"\xff\xfe").hexdigest() + "]"
    )
    assert kept(None) == kept("") == ""


def test_a_guarded_channel_never_inflates_a_compressed_message() -> None:
    """kombu's in-memory transport is virtual, like Redis: same Message construction."""
    exchange = Exchange("x", type="direct")
    queue = Queue("q", exchange, routing_key="q")
    got: list[Any] = []
    with Connection("memory://") as conn:
        channel = conn.channel()
        guard_channel(channel, 64 * 1024)
        guard_channel(channel, 64 * 1024)  # idempotent: one wrapper, not two
        producer = Producer(conn.channel(), exchange)
        producer.publish({"a": 1}, routing_key="q", declare=[queue], compression="zlib")
        producer.publish({"b": 2}, routing_key="q", declare=[queue])
        with Consumer(channel, [queue], on_message=got.append):
            for _ in range(2):
                conn.drain_events(timeout=2)
        assert type(got[0]).__name__.startswith("Guarded")
        assert got[0].refusal.reason == "compressed"
        assert got[0].body is None
        assert "compression" not in got[0].headers
        assert got[1].refusal is None
        assert json.loads(got[1].body) == {"b": 2}
        # The compressed body is still what the channel would restore, undecoded.
        assert zlib.decompress(got[0].channel.decode_body(got[0]._raw["body"], "base64")) == (
            b'{"a": 1}'
        )
        for message in got:
            message.ack()


def test_every_cli_cell_is_escaped() -> None:
    hostile = "\x1b]0;title\x07\r\n\x9b31m\u202eabc\u2066\x7f\x00\ud800"
    out = safe(hostile)
    assert out.isprintable()
    assert out == "\\x1b]0;title\\x07\\x0d\\x0a\\x9b31m\\u202eabc\\u2066\\x7f\\x00\\ud800"
    assert safe("plain, ünïcode ✓ and spaces") == "plain, ünïcode ✓ and spaces"
    assert safe(out) == out
    printed = table(["ID", "NOTE\x1b"], [["1", hostile]])
    assert all(line.isprintable() for line in printed.splitlines())
    assert len(printed.splitlines()) == 2
