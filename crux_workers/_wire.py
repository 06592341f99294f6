"""The signal wire format: what ``publish_signal`` sends and the ingress accepts.

A message body is a UTF-8 JSON object (see docs/signals.md)::

    {"v": 2, "flow_id": "order-42", "name": "approval", "payload": {"ok": true}, "key": "a-1"}

``payload`` is optional; ``key`` is optional unless signing is on; ``v`` (1 or 2) may
be given. Any other field is refused, so a typo is caught rather than ignored.

Signing (wire format v2). When a signing secret is set, a message carries two headers:
``crux-timestamp``, the publisher's Unix time in whole seconds, and ``crux-signature``,
``v2=<hex HMAC-SHA256(secret, "crux-signal-v2\\n" + timestamp + "\\n" + body bytes)>``.
The exact bytes are signed, so a publisher in any language can compute it. The
domain separator keeps a MAC made for anything else from passing as a signal; the
timestamp bounds how long a captured message can be replayed (``max_age``), and the
required ``key`` makes a replay inside that window a duplicate, recorded once. v1
signatures (``sha256=`` over the body alone) are refused: they never expire.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import _json
from .errors import SignalRejected

WIRE_VERSION = 2
SIGNATURE_HEADER = "crux-signature"
TIMESTAMP_HEADER = "crux-timestamp"
DEFAULT_MAX_AGE = 300.0
_DOMAIN = b"crux-signal-v2\n"
_SCHEME = "v2="
_V1_SCHEME = "sha256="
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_FIELDS = frozenset({"v", "flow_id", "name", "payload", "key"})
_VERSIONS = (1, 2)
_MAX_ID = 200
_MAX_LISTED = 5  # unknown fields named in a refusal; the rest are counted


@dataclass(frozen=True, slots=True)
class SignalMessage:
    """A decoded, checked signal message."""

    flow_id: str
    name: str
    payload: Any
    key: str | None


def signed_bytes(timestamp: str, body: bytes) -> bytes:
    """What the v2 signature covers: the domain separator, the timestamp and the body."""
    return _DOMAIN + timestamp.encode("ascii") + b"\n" + body


def sign(secret: bytes, body: bytes, timestamp: str) -> str:
    """The ``crux-signature`` header value for ``body`` sent at ``timestamp`` (v2)."""
    return _SCHEME + hmac.new(secret, signed_bytes(timestamp, body), hashlib.sha256).hexdigest()


def encode(
    flow_id: str,
    name: str,
    payload: Any,
    key: str | None,
    secret: bytes | None,
    *,
    now: float | None = None,
) -> tuple[str, dict[str, str]]:
    """The body and headers of a signal message (headers carry the signature, if any)."""
    fields: dict[str, Any] = {
        "v": WIRE_VERSION,
        "flow_id": flow_id,
        "name": name,
        "payload": payload,
    }
    if key is not None:
        fields["key"] = key
    body = _json.dumps(fields)
    if not secret:
        return body, {}
    stamp = str(int(time.time() if now is None else now))
    return body, {TIMESTAMP_HEADER: stamp, SIGNATURE_HEADER: sign(secret, body.encode(), stamp)}


def _reject(reason: str, detail: str, **known: Any) -> SignalRejected:
    return SignalRejected(f"{reason}: {detail}", reason=reason, detail=detail, **known)


def _check_signature(
    raw: bytes,
    headers: Mapping[str, Any],
    secrets: Sequence[bytes],
    max_age: float,
    now: float | None,
) -> str | None:
    """Raise for a missing or wrong signature; return why an authentic one is stale."""
    given = headers.get(SIGNATURE_HEADER)
    if not given:
        raise _reject("unsigned", f"no {SIGNATURE_HEADER} header and signing is required")
    if not isinstance(given, str) or not given.isascii():
        raise _reject("bad_signature", f"{SIGNATURE_HEADER} is not an ASCII string")
    if given.startswith(_V1_SCHEME):
        raise _reject(
            "bad_signature",
            "v1 signature (body only, replayable) refused: sign with v2 (docs/signals.md)",
        )
    if not given.startswith(_SCHEME):
        raise _reject("bad_signature", f"{SIGNATURE_HEADER} is not {_SCHEME}<hex>")
    stamp = headers.get(TIMESTAMP_HEADER)
    if stamp is None:
        raise _reject("unsigned", f"no {TIMESTAMP_HEADER} header and signing is required")
    if not isinstance(stamp, str) or not _TIMESTAMP.fullmatch(stamp):
        raise _reject("bad_signature", f"{TIMESTAMP_HEADER} must be Unix seconds (digits)")
    mac = given.encode("ascii")
    # Every secret is tried, so which one matched (current or previous) takes no less time.
    matches = [hmac.compare_digest(mac, sign(s, raw, stamp).encode("ascii")) for s in secrets]
    if not any(matches):
        raise _reject("bad_signature", f"{SIGNATURE_HEADER} does not match the message")
    age = (time.time() if now is None else now) - int(stamp)
    if abs(age) <= max_age:
        return None
    when = f"{age:.0f}s old" if age > 0 else f"{-age:.0f}s in the future"
    return f"signed {when}; accepted within {max_age:.0f}s either way"


def decode(
    body: bytes | str | None,
    headers: Mapping[str, Any] | None,
    *,
    secret: bytes | None,
    max_bytes: int,
    previous_secret: bytes | None = None,
    max_age: float = DEFAULT_MAX_AGE,
    now: float | None = None,
) -> SignalMessage:
    """Check and decode one message; ``SignalRejected`` (with a ``reason``) if refused.

    The order matters: size first (cheap), then the signature and its freshness over
    the raw bytes (nothing untrusted is parsed when signing is on), then JSON, then the
    fields. ``previous_secret`` is also accepted, for rotation; ``now`` is when the
    message arrived (default: the current time).
    """
    raw = body.encode() if isinstance(body, str) else (body or b"")
    if not isinstance(raw, bytes):
        raise _reject("bad_fields", f"body must be text, not {type(raw).__name__}")
    if len(raw) > max_bytes:
        raise _reject("too_large", f"{len(raw)} bytes, over the {max_bytes}-byte limit")
    stale = None
    if secret is not None:
        secrets = [secret] if previous_secret is None else [secret, previous_secret]
        given = headers if isinstance(headers, Mapping) else {}
        stale = _check_signature(raw, given, secrets, max_age, now)
    if stale is not None:
        # Authentic, so safe to read: the refusal names the flow, signal and key, which
        # lets an operator re-send a message that waited too long in a backlog.
        raise _reject("stale", stale, **_known(_loads_or_none(raw)))
    try:
        fields = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _reject("not_json", str(exc)[:200]) from None
    except RecursionError:
        raise _reject("not_json", "nested too deeply to decode") from None
    if not isinstance(fields, dict):
        raise _reject("bad_fields", f"expected a JSON object, got {type(fields).__name__}")
    flow_id, name, key = fields.get("flow_id"), fields.get("name"), fields.get("key")
    known = _known(fields)
    unknown = sorted(set(fields) - _FIELDS)
    problems = [f"unknown field {f[:40]!r}" for f in unknown[:_MAX_LISTED]]
    if len(unknown) > _MAX_LISTED:
        problems.append(f"and {len(unknown) - _MAX_LISTED} more unknown fields")
    version = fields.get("v", 1)
    if isinstance(version, bool) or version not in _VERSIONS:
        problems.append(f"unsupported version {str(version)[:20]!r} (this ingress speaks 1 and 2)")
    for field, value in (("flow_id", flow_id), ("name", name)):
        if not _is_id(value):
            problems.append(f"{field} must be a non-empty printable string of at most {_MAX_ID}")
    if key is not None and not _is_id(key):
        problems.append(f"key must be null or a non-empty printable string of at most {_MAX_ID}")
    elif key is None and secret is not None:
        problems.append("key is required on signed messages (it makes a replay a duplicate)")
    if problems:
        raise _reject("bad_fields", "; ".join(problems), **known)
    return SignalMessage(str(flow_id), str(name), fields.get("payload"), known["key"])


def _loads_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return None


def _known(fields: Any) -> dict[str, str | None]:
    """The fields worth keeping with a refusal, when they are strings."""
    if not isinstance(fields, dict):
        return {"flow_id": None, "name": None, "key": None}
    return {
        f: v if isinstance(v := fields.get(f), str) else None for f in ("flow_id", "name", "key")
    }


def _is_id(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= _MAX_ID and value.isprintable()
