"""The signal wire format: what the ingress accepts and why it refuses the rest."""

from __future__ import annotations

import hashlib
import hmac
import json
import time

import pytest

from crux_workers import SignalRejected
from crux_workers._wire import SIGNATURE_HEADER, TIMESTAMP_HEADER, decode, encode, sign

SECRET = b"k"
NOW = 1_800_000_000.0


def signed(body: str, secret: bytes = SECRET, at: float = NOW) -> dict[str, str]:
    stamp = str(int(at))
    return {TIMESTAMP_HEADER: stamp, SIGNATURE_HEADER: sign(secret, body.encode(), stamp)}


def reason(body: bytes | str | None, headers: dict[str, str] | None = None, **kw: object) -> str:
    with pytest.raises(SignalRejected) as info:
        decode(
            body,
            headers,
            secret=kw.get("secret"),  # type: ignore[arg-type]
            previous_secret=kw.get("previous"),  # type: ignore[arg-type]
            max_bytes=int(kw.get("max_bytes", 4096)),  # type: ignore[call-overload]
            max_age=300,
            now=NOW,
        )
    return str(info.value.reason)


def test_encode_then_decode_round_trips_with_and_without_a_signature() -> None:
    for secret in (None, SECRET):
        body, headers = encode("f-1", "approval", {"ok": True, "n": [1, 2]}, "k-1", secret)
        msg = decode(body, headers, secret=secret, max_bytes=4096)  # now: the current time
        assert (msg.flow_id, msg.name, msg.payload, msg.key) == (
            "f-1",
            "approval",
            {"ok": True, "n": [1, 2]},
            "k-1",
        )
        assert (SIGNATURE_HEADER in headers) is (secret is not None)
        assert (TIMESTAMP_HEADER in headers) is (secret is not None)
        assert json.loads(body)["v"] == 2


def test_minimal_message_from_another_language_is_accepted() -> None:
    body = '{"flow_id": "f", "name": "go"}'
    msg = decode(body.encode(), {}, secret=None, max_bytes=4096)
    assert (msg.payload, msg.key) == (None, None)
    keyed = '{"flow_id": "f", "name": "go", "key": "k-1"}'
    assert decode(keyed, signed(keyed), secret=SECRET, max_bytes=4096, now=NOW).name == "go"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("{nope", "not_json"),
        (b"\xff\xfe", "not_json"),
        ("[1, 2]", "bad_fields"),
        ('{"flow_id": "f"}', "bad_fields"),
        ('{"flow_id": "", "name": "n"}', "bad_fields"),
        ('{"flow_id": "f", "name": 7}', "bad_fields"),
        ('{"flow_id": "f", "name": "n", "key": ""}', "bad_fields"),
        ('{"flow_id": "f", "name": "n", "extra": 1}', "bad_fields"),
        ('{"flow_id": "f", "name": "n", "v": 3}', "bad_fields"),
        ('{"flow_id": "f", "name": "n", "v": true}', "bad_fields"),
        ('{"flow_id": "' + "x" * 201 + '", "name": "n"}', "bad_fields"),
        (None, "not_json"),
    ],
)
def test_malformed_messages_are_refused_with_a_reason(body: str | bytes, expected: str) -> None:
    assert reason(body) == expected


def test_size_is_checked_before_anything_is_parsed() -> None:
    big = json.dumps({"flow_id": "f", "name": "n", "payload": "x" * 5000})
    assert reason(big, max_bytes=4096) == "too_large"


def test_signing_refuses_unsigned_and_wrongly_signed_messages() -> None:
    body = '{"flow_id": "f", "name": "n", "key": "k"}'
    assert reason(body, {}, secret=SECRET) == "unsigned"
    assert reason(body, signed(body, secret=b"other"), secret=SECRET) == "bad_signature"
    tampered = body.replace('"n"', '"m"')
    assert reason(tampered, signed(body), secret=SECRET) == "bad_signature"
    # The timestamp is signed too: moving it breaks the signature.
    moved = {**signed(body), TIMESTAMP_HEADER: str(int(NOW) + 1)}
    assert reason(body, moved, secret=SECRET) == "bad_signature"
    no_stamp = {SIGNATURE_HEADER: signed(body)[SIGNATURE_HEADER]}
    assert reason(body, no_stamp, secret=SECRET) == "unsigned"
    for stamp in ("-5", "1.5", "", "9" * 13, " 1800000000"):
        assert reason(body, {**signed(body), TIMESTAMP_HEADER: stamp}, secret=SECRET) == (
            "bad_signature"
        )
    assert reason(body, {**signed(body), SIGNATURE_HEADER: "v2=é"}, secret=SECRET) == (
        "bad_signature"
    )
    # Nothing is parsed before the signature is checked: garbage is "unsigned", not "not_json".
    assert reason("{nope", {}, secret=SECRET) == "unsigned"


def test_a_v1_body_only_signature_is_refused_when_signing_is_on() -> None:
    body = '{"flow_id": "f", "name": "n", "key": "k"}'
    v1 = "sha256=" + hmac.new(SECRET, body.encode(), hashlib.sha256).hexdigest()
    with pytest.raises(SignalRejected) as info:
        decode(body, {SIGNATURE_HEADER: v1}, secret=SECRET, max_bytes=4096, now=NOW)
    assert info.value.reason == "bad_signature"
    assert "v1" in info.value.detail


def test_the_mac_covers_a_domain_separator_the_timestamp_and_the_body() -> None:
    body = b'{"flow_id": "f", "name": "n", "key": "k"}'
    mac = hmac.new(SECRET, b"crux-signal-v2\n1800000000\n" + body, hashlib.sha256).hexdigest()
    assert sign(SECRET, body, "1800000000") == "v2=" + mac
    # A MAC of the bare body (what v1 signed, or any other use of the key) does not pass.
    bare = hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    headers = {TIMESTAMP_HEADER: "1800000000", SIGNATURE_HEADER: "v2=" + bare}
    assert reason(body, headers, secret=SECRET) == "bad_signature"


def test_a_signed_message_is_accepted_only_within_its_freshness_window() -> None:
    body = '{"flow_id": "f", "name": "n", "key": "k"}'
    for skew in (-299, 0, 299):  # clock skew either way, within the window
        decode(body, signed(body, at=NOW + skew), secret=SECRET, max_bytes=4096, now=NOW)
    assert reason(body, signed(body, at=NOW - 301), secret=SECRET) == "stale"
    assert reason(body, signed(body, at=NOW + 301), secret=SECRET) == "stale"
    # A stale message is authentic: its refusal names what it was for, to re-send it.
    with pytest.raises(SignalRejected) as info:
        decode(body, signed(body, at=NOW - 900), secret=SECRET, max_bytes=4096, now=NOW)
    assert (getattr(info.value, "flow_id"), getattr(info.value, "key")) == ("f", "k")  # noqa: B009
    assert "900s old" in info.value.detail


def test_a_signed_message_needs_a_key() -> None:
    body = '{"flow_id": "f", "name": "n"}'
    with pytest.raises(SignalRejected) as info:
        decode(body, signed(body), secret=SECRET, max_bytes=4096, now=NOW)
    assert info.value.reason == "bad_fields"
    assert "key is required" in info.value.detail


def test_during_rotation_both_secrets_are_accepted_and_no_other() -> None:
    body = '{"flow_id": "f", "name": "n", "key": "k"}'
    new, old = b"new-secret", b"old-secret"
    for secret in (new, old):
        msg = decode(
            body, signed(body, secret), secret=new, previous_secret=old, max_bytes=4096, now=NOW
        )
        assert msg.key == "k"
    assert reason(body, signed(body, b"third"), secret=new, previous=old) == "bad_signature"
    # Once the previous secret is dropped, messages signed with it are refused.
    assert reason(body, signed(body, old), secret=new) == "bad_signature"


def test_encode_signs_with_the_current_time() -> None:
    body, headers = encode("f", "n", None, "k", SECRET)
    assert abs(int(headers[TIMESTAMP_HEADER]) - time.time()) < 60
    assert headers[SIGNATURE_HEADER] == sign(SECRET, body.encode(), headers[TIMESTAMP_HEADER])


def test_refusals_keep_what_could_be_read() -> None:
    with pytest.raises(SignalRejected) as info:
        decode('{"flow_id": "f", "name": "n", "oops": 1}', {}, secret=None, max_bytes=4096)
    assert (getattr(info.value, "flow_id"), getattr(info.value, "name")) == ("f", "n")  # noqa: B009
    assert "unknown field 'oops'" in info.value.detail


def test_a_refusal_detail_stays_short_whatever_the_message() -> None:
    fields = {f"\x1b[{i}m" + "x" * 300: i for i in range(200)}
    fields.update({"flow_id": "f", "name": "n"})
    with pytest.raises(SignalRejected) as info:
        decode(json.dumps(fields), {}, secret=None, max_bytes=1 << 20)
    assert len(info.value.detail) < 500
    assert "195 more unknown fields" in info.value.detail


def test_free_text_is_made_storable() -> None:
    from crux_workers._json import safe_text

    assert safe_text("a\x00b\ud800c") == "a\\x00b\\ud800c"
    assert safe_text("plain, ünïcode ✓") == "plain, ünïcode ✓"
