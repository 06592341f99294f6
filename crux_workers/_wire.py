"""The signal wire format: what ``publish_signal`` sends and the ingress accepts.

A message body is a UTF-8 JSON object (see docs/signals.md)::

    {"flow_id": "order-42", "name": "approval", "payload": {"ok": true}, "key": "appr-1"}

``payload`` and ``key`` are optional; ``"v": 1`` may be given. Any other field is
refused, so a typo is caught rather than ignored. When a signing secret is set, the
``crux-signature`` header carries ``sha256=<hex HMAC-SHA256(secret, body bytes)>``:
the exact bytes are signed, so a publisher in any language can compute it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import _json
from .errors import SignalRejected

SIGNATURE_HEADER = "crux-signature"
_SCHEME = "sha256="
_FIELDS = frozenset({"v", "flow_id", "name", "payload", "key"})
_MAX_ID = 200


@dataclass(frozen=True, slots=True)
class SignalMessage:
    """A decoded, checked signal message."""

    flow_id: str
    name: str
    payload: Any
    key: str | None


def sign(secret: bytes, body: bytes) -> str:
    """The ``crux-signature`` header value for ``body``."""
    return _SCHEME + hmac.new(secret, body, hashlib.sha256).hexdigest()


def encode(
    flow_id: str, name: str, payload: Any, key: str | None, secret: bytes | None
) -> tuple[str, dict[str, str]]:
    """The body and headers of a signal message (headers carry the signature, if any)."""
    fields: dict[str, Any] = {"v": 1, "flow_id": flow_id, "name": name, "payload": payload}
    if key is not None:
        fields["key"] = key
    body = _json.dumps(fields)
    headers = {SIGNATURE_HEADER: sign(secret, body.encode())} if secret else {}
    return body, headers


def _reject(reason: str, detail: str, **known: Any) -> SignalRejected:
    return SignalRejected(f"{reason}: {detail}", reason=reason, detail=detail, **known)


def decode(
    body: bytes | str | None,
    headers: Mapping[str, Any] | None,
    *,
    secret: bytes | None,
    max_bytes: int,
) -> SignalMessage:
    """Check and decode one message; ``SignalRejected`` (with a ``reason``) if refused.

    The order matters: size first (cheap), then the signature over the raw bytes
    (nothing untrusted is parsed when signing is on), then JSON, then the fields.
    """
    raw = body.encode() if isinstance(body, str) else (body or b"")
    if len(raw) > max_bytes:
        raise _reject("too_large", f"{len(raw)} bytes, over the {max_bytes}-byte limit")
    if secret is not None:
        given = (headers or {}).get(SIGNATURE_HEADER)
        if not given:
            raise _reject("unsigned", f"no {SIGNATURE_HEADER} header and signing is required")
        if not isinstance(given, str) or not hmac.compare_digest(given, sign(secret, raw)):
            raise _reject("bad_signature", f"{SIGNATURE_HEADER} does not match the body")
    try:
        fields = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _reject("not_json", str(exc)) from None
    except RecursionError:
        raise _reject("not_json", "nested too deeply to decode") from None
    if not isinstance(fields, dict):
        raise _reject("bad_fields", f"expected a JSON object, got {type(fields).__name__}")
    flow_id, name, key = fields.get("flow_id"), fields.get("name"), fields.get("key")
    known = {
        "flow_id": flow_id if isinstance(flow_id, str) else None,
        "name": name if isinstance(name, str) else None,
        "key": key if isinstance(key, str) else None,
    }
    problems = [f"unknown field {f!r}" for f in sorted(set(fields) - _FIELDS)]
    if fields.get("v", 1) != 1:
        problems.append(f"unsupported version {fields['v']!r} (this ingress speaks v1)")
    for field, value in (("flow_id", flow_id), ("name", name)):
        if not _is_id(value):
            problems.append(f"{field} must be a non-empty printable string of at most {_MAX_ID}")
    if key is not None and not _is_id(key):
        problems.append(f"key must be null or a non-empty printable string of at most {_MAX_ID}")
    if problems:
        raise _reject("bad_fields", "; ".join(problems), **known)
    return SignalMessage(str(flow_id), str(name), fields.get("payload"), known["key"])


def _is_id(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= _MAX_ID and value.isprintable()
