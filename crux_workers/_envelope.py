"""Broker envelopes, checked before kombu decodes them.

kombu turns a raw envelope (on Redis: the JSON item popped from the queue's list) into a
message in the channel's ``Message`` class, and that constructor already decodes the
``body_encoding`` and inflates a body that carries a ``compression`` header, before any
consumer code or size check runs: a few hundred KB of zlib or bzip2 become hundreds of MB.

``guard_channel`` gives a channel a ``Message`` class that looks at the raw envelope
first. An envelope that is compressed, larger than the limit, or whose body is not a
string is built with an empty body and a ``refusal``; it still goes through the
channel's acknowledgement bookkeeping, so the consumer can record or log it and take it
off the queue. Nothing of it is decoded.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

# body_encoding values kombu's virtual transports decode (anything else raises in kombu).
_ENCODINGS = frozenset({"base64", "utf-8"})


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why an envelope was refused before decoding, and a bounded trace of it."""

    reason: str  # "compressed", "too_large" or "bad_envelope"
    detail: str
    raw: str  # a bounded prefix of the raw body, as it was on the wire (see ``kept``)


def kept(raw: bytes | str | None, limit: int = 1024) -> str:
    """What is kept of a refused body: a prefix of at most ``limit`` bytes, its size and digest.

    The digest lets an operator match the refusal with what a publisher logged, without
    the store keeping what a sender chose to send in full.
    """
    if raw is None:
        return ""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    if not data:
        return ""
    text = data[:limit].decode("utf-8", "replace")
    cut = " …" if len(data) > limit else ""
    return f"{text}{cut}\n[{len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}]"


def problem(payload: Any, max_body: int) -> Refusal | None:
    """The reason to refuse a raw envelope before decoding it, or None when it may be.

    ``max_body`` bounds the body as it sits in the envelope (base64 text included), so
    a limit of N bytes lets a base64 body of N decoded bytes through.
    """
    if not isinstance(payload, dict) or not isinstance(payload.get("properties"), dict):
        return None  # kombu cannot build a message from it at all, and says so itself
    headers = payload.get("headers")
    body = payload.get("body")
    encoding = payload["properties"].get("body_encoding")
    raw = kept(body if isinstance(body, str) else None)
    if headers is not None and not isinstance(headers, dict):
        return Refusal("bad_envelope", f"headers must be an object, not {_kind(headers)}", raw)
    if headers and "compression" in headers:
        what = str(headers["compression"])[:60]
        return Refusal(
            "compressed",
            f"compressed messages are refused before decoding (compression {what!r})",
            raw,
        )
    if body is not None and not isinstance(body, str):
        return Refusal("bad_envelope", f"body must be a string, not {_kind(body)}", kept(None))
    if encoding is not None and (
        not isinstance(encoding, str) or encoding.lower() not in _ENCODINGS
    ):
        return Refusal("bad_envelope", f"unknown body_encoding {str(encoding)[:60]!r}", raw)
    allowed = max_body * 4 // 3 + 4 if encoding == "base64" else max_body
    if body and len(body) > allowed:
        return Refusal(
            "too_large",
            f"{len(body)} characters in the envelope, over the {max_body}-byte limit",
            raw,
        )
    return None


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", bool: "a boolean"}.get(type(value), "a number")


def guard_channel(channel: Any, max_body: int) -> None:
    """Make ``channel`` check every raw envelope (``problem``) before kombu decodes it.

    Works with kombu's virtual transports (Redis among them), which build each received
    message with ``channel.Message(payload, channel=...)``; other transports are left
    as they are.
    """
    base = getattr(channel, "Message", None)
    if base is None or getattr(base, "_crux_guarded", False):
        return

    class GuardedMessage(base):  # type: ignore[misc, valid-type]
        _crux_guarded = True

        def __init__(self, payload: Any, channel: Any = None, **kwargs: Any) -> None:
            refusal = problem(payload, max_body)
            if refusal is None:
                super().__init__(payload, channel=channel, **kwargs)
                self.refusal = None
                return
            given = payload.get("headers")
            headers = (
                {k: v for k, v in given.items() if k != "compression"}
                if isinstance(given, dict)
                else {}
            )
            properties = {k: v for k, v in payload["properties"].items() if k != "body_encoding"}
            empty = {**payload, "body": None, "headers": headers, "properties": properties}
            super().__init__(empty, channel=channel, **kwargs)
            # What a crash before the acknowledgement puts back is the original item: it
            # is refused again, still without being decoded.
            self._raw = payload
            self.refusal = refusal

    GuardedMessage.__name__ = GuardedMessage.__qualname__ = f"Guarded{base.__name__}"
    channel.Message = GuardedMessage


def guard_connection(conn: Any, max_body: int) -> None:
    """Guard every channel of ``conn``: its default one, and each it creates from now on.

    A worker reads more than its task queue on one connection (remote control, when on,
    has its own channel): none of them may inflate what a broker client sent.
    """
    transport = conn.transport
    if not getattr(transport, "_crux_guarded", False):
        create = transport.create_channel

        def create_channel(connection: Any) -> Any:
            channel = create(connection)
            guard_channel(channel, max_body)
            return channel

        transport.create_channel = create_channel
        transport._crux_guarded = True
    for channel in list(getattr(transport, "channels", None) or ()):
        guard_channel(channel, max_body)
    guard_channel(conn.default_channel, max_body)
