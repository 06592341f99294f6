"""The signal wire format: what the ingress accepts and why it refuses the rest."""

from __future__ import annotations

import json

import pytest

from crux_workers import SignalRejected
from crux_workers._wire import SIGNATURE_HEADER, decode, encode, sign

SECRET = b"k"


def reason(body: bytes | str | None, headers: dict[str, str] | None = None, **kw: object) -> str:
    with pytest.raises(SignalRejected) as info:
        decode(body, headers, secret=kw.get("secret"), max_bytes=int(kw.get("max_bytes", 4096)))  # type: ignore[arg-type]
    return str(info.value.reason)


def test_encode_then_decode_round_trips_with_and_without_a_signature() -> None:
    for secret in (None, SECRET):
        body, headers = encode("f-1", "approval", {"ok": True, "n": [1, 2]}, "k-1", secret)
        msg = decode(body, headers, secret=secret, max_bytes=4096)
        assert (msg.flow_id, msg.name, msg.payload, msg.key) == (
            "f-1",
            "approval",
            {"ok": True, "n": [1, 2]},
            "k-1",
        )
        assert (SIGNATURE_HEADER in headers) is (secret is not None)


def test_minimal_message_from_another_language_is_accepted() -> None:
    body = '{"flow_id": "f", "name": "go"}'
    msg = decode(body.encode(), {}, secret=None, max_bytes=4096)
    assert (msg.payload, msg.key) == (None, None)
    signed = {SIGNATURE_HEADER: sign(SECRET, body.encode())}
    assert decode(body, signed, secret=SECRET, max_bytes=4096).name == "go"


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
        ('{"flow_id": "f", "name": "n", "v": 2}', "bad_fields"),
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
    body = '{"flow_id": "f", "name": "n"}'
    assert reason(body, {}, secret=SECRET) == "unsigned"
    assert reason(body, {SIGNATURE_HEADER: sign(b"other", body.encode())}, secret=SECRET) == (
        "bad_signature"
    )
    tampered = body.replace('"n"', '"m"')
    good_for_original = {SIGNATURE_HEADER: sign(SECRET, body.encode())}
    assert reason(tampered, good_for_original, secret=SECRET) == "bad_signature"
    # Nothing is parsed before the signature is checked: garbage is "unsigned", not "not_json".
    assert reason("{nope", {}, secret=SECRET) == "unsigned"


def test_refusals_keep_what_could_be_read() -> None:
    with pytest.raises(SignalRejected) as info:
        decode('{"flow_id": "f", "name": "n", "oops": 1}', {}, secret=None, max_bytes=4096)
    assert (getattr(info.value, "flow_id"), getattr(info.value, "name")) == ("f", "n")  # noqa: B009
    assert "unknown field 'oops'" in info.value.detail


def test_free_text_is_made_storable() -> None:
    from crux_workers._json import safe_text

    assert safe_text("a\x00b\ud800c") == "a\\x00b\\ud800c"
    assert safe_text("plain, ünïcode ✓") == "plain, ünïcode ✓"
