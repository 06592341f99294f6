"""The console's pure pieces: times, text, cursors, the schema form, the token checks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import BaseModel

from crux_workers.ui import _security as sec
from crux_workers.ui._format import (
    ago,
    countdown,
    decode_cursor,
    encode_cursor,
    error_line,
    preview,
    safe_lines,
    span,
)
from crux_workers.ui._forms import errors_by_field, fields_of, payload_of

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def test_ages_and_countdowns_read_like_a_person_would_say_them() -> None:
    assert ago(NOW - timedelta(seconds=0.4), NOW) == "just now"
    assert ago(NOW - timedelta(seconds=42), NOW) == "42s ago"
    assert ago(NOW - timedelta(minutes=3, seconds=5), NOW) == "3m 5s ago"
    assert ago(NOW - timedelta(hours=2, minutes=10), NOW) == "2h 10m ago"
    assert ago(NOW - timedelta(days=4), NOW) == "4d ago"
    assert ago(None, NOW) == "-"
    assert countdown(NOW + timedelta(minutes=59, seconds=30), NOW) == "in 59m"
    assert countdown(NOW - timedelta(seconds=90), NOW) == "overdue 1m 30s"
    assert span(NOW, NOW + timedelta(milliseconds=35)) == "35ms"
    assert span(NOW, NOW + timedelta(seconds=2.4)) == "2.4s"
    assert span(None, NOW) == "-"


def test_text_keeps_its_lines_and_loses_its_control_characters() -> None:
    assert safe_lines("Traceback:\n  File x\x1b[31m\n\tboom") == (
        "Traceback:\n  File x\\x1b[31m\n    boom"
    )
    assert preview({"a": "x" * 100}, 20) == '{"a": "xxxxxxxxxxxx…'
    assert preview("bell\x07") == "bell\\x07"
    line = error_line('{"type": "builtins.RuntimeError", "message": "refused\\nmore\\u001b"}')
    assert line == "RuntimeError: refused"
    assert error_line("not json\x1b") == "not json\\x1b"
    assert error_line(None) == ""


def test_a_cursor_round_trips_and_refuses_what_it_did_not_make() -> None:
    text = encode_cursor(NOW, "flow/1?<x>")
    assert decode_cursor(text) == (NOW, "flow/1?<x>")
    for bad in ("", "garbage", encode_cursor(NOW, "x")[:-3] + "!!", "W10"):
        with pytest.raises(ValueError):
            decode_cursor(bad)


class Choice(BaseModel):
    approved: bool
    by: str
    level: int
    score: float | None = None
    mode: str = "fast"
    tags: list[str] = []


def test_the_signal_form_has_a_field_per_property_typed_and_required() -> None:
    fields = fields_of(Choice.model_json_schema())
    assert fields is not None
    assert [(f.name, f.kind, f.required) for f in fields] == [
        ("approved", "boolean", True),
        ("by", "text", True),
        ("level", "integer", True),
        ("score", "number", False),
        ("mode", "text", False),
        ("tags", "json", False),
    ]
    assert fields_of({"type": "string"}) is None
    assert fields_of(None) is None
    payload, errors = payload_of(
        fields,
        {"field.approved": "on", "field.by": "dana", "field.level": "x", "field.tags": '["a"]'},
    )
    assert payload == {"approved": True, "by": "dana", "tags": ["a"]}
    assert errors == {"level": "must be a whole number"}
    payload, errors = payload_of(fields, {"field.level": "3", "field.score": "0.5"})
    assert payload == {"approved": False, "level": 3, "score": 0.5}
    assert errors == {}


def test_validation_errors_land_next_to_their_field() -> None:
    by_field, general = errors_by_field(
        [
            {"loc": ["by"], "msg": "Field required"},
            {"loc": ["tags", 0], "msg": "Input should be a valid string"},
            {"loc": [], "msg": "Input should be an object"},
        ]
    )
    assert by_field == {"by": "Field required", "tags": "0: Input should be a valid string"}
    assert general == ["Input should be an object"]


def test_tokens_hosts_and_bearer_headers() -> None:
    assert sec.bearer("Bearer abc") == "abc" and sec.bearer("bearer  abc ") == "abc"
    assert sec.bearer("Basic abc") is None and sec.bearer(None) is None
    assert sec.same("a", "a") and not sec.same("a", "b") and not sec.same("", "")
    assert sec.session_value("t") != "t" and sec.session_value("t") == sec.session_value("t")
    assert sec.host_name("127.0.0.1:8787") == "127.0.0.1"
    assert sec.host_name("[::1]:8787") == "::1"
    assert sec.host_allowed("localhost:8787", sec.LOOPBACK_HOSTS)
    assert not sec.host_allowed("evil.example", sec.LOOPBACK_HOSTS)
    assert sec.host_allowed("anything", None)
    assert sec.is_loopback("127.0.0.1") and sec.is_loopback("::1")
    assert not sec.is_loopback("0.0.0.0")
