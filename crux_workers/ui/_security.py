"""Who may use the console: the token, the login cookie, CSRF, and the Host check.

- With a token, every page and API call needs it: an ``Authorization: Bearer`` header
  (scripts), or the session cookie the login form sets (browsers). The cookie holds an
  HMAC of the token, never the token, and is ``HttpOnly`` and ``SameSite=Strict``.
- Every POST made with a cookie carries the CSRF token (a form field or the
  ``X-CSRF-Token`` header) equal to the CSRF cookie (double submit, ``SameSite=Strict``);
  a call authenticated by the Bearer header needs none, since no browser sends it on
  its own.
- Without a token (loopback only), ``hosts`` pins the ``Host`` header, so a web page
  that rebinds its DNS name to 127.0.0.1 cannot read the console.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence

SESSION_COOKIE = "crux_ui_session"
CSRF_COOKIE = "crux_ui_csrf"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"

LOOPBACK_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    """Whether a bind address is a loopback one (only there may the console run without a token)."""
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def session_value(token: str) -> str:
    """What the session cookie holds for ``token``: a keyed hash, never the token itself."""
    return hmac.new(token.encode(), b"crux-ui-session-v1", hashlib.sha256).hexdigest()


def same(a: str | None, b: str | None) -> bool:
    """Constant-time equality of two secrets; False when either is missing or empty."""
    if not a or not b:
        return False
    return hmac.compare_digest(a.encode(), b.encode())


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer`` header, if that is what it is."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


def new_csrf() -> str:
    """A fresh CSRF token for the cookie and the forms."""
    return secrets.token_urlsafe(24)


def host_name(host_header: str | None) -> str:
    """The host part of a ``Host`` header (no port; IPv6 without brackets), lowercased."""
    host = (host_header or "").strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_allowed(host_header: str | None, hosts: Sequence[str] | None) -> bool:
    """Whether the request's ``Host`` is one the console answers to (any, when not pinned)."""
    if hosts is None:
        return True
    return host_name(host_header) in {h.lower() for h in hosts}
