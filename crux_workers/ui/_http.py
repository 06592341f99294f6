"""The console's HTTP plumbing: escaped JSON, error statuses, and the guard.

The guard refuses a request for an unknown Host, or without the token when one is set
(``_security`` has the rules); CSRF and read-only are checked where a form or a JSON
body is read (``_pages.Console.form`` and ``body``).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import (
    FlowAlreadyFinished,
    FlowNotFound,
    FlowNotRetryable,
    FlowNotWaiting,
    InvalidInput,
    StoreError,
)
from . import _security as sec
from ._format import safe

__all__ = [
    "AsgiEndpoint",
    "Guard",
    "Refused",
    "SafeJSONResponse",
    "api_error",
    "error_body",
    "problem",
    "route_path",
    "status_of",
]


# -- responses ------------------------------------------------------------------------------


class SafeJSONResponse(JSONResponse):
    """JSON with every non-ASCII, control and HTML-special character escaped.

    What the record holds comes from users and other services: escaped this way, a
    value cannot end a ``<script>`` block or reach a terminal as a control sequence.
    """

    def render(self, content: Any) -> bytes:
        """The body: ASCII JSON with ``<``, ``>`` and ``&`` as ``\\u`` escapes."""
        text = json.dumps(content, ensure_ascii=True, allow_nan=False, default=str)
        return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode()


def status_of(exc: Exception) -> int:
    """The HTTP status that fits an error of the record or of the request."""
    if isinstance(exc, FlowNotFound):
        return 404
    if isinstance(exc, FlowNotWaiting | FlowAlreadyFinished | FlowNotRetryable):
        return 409
    if isinstance(exc, InvalidInput):
        return 422
    if isinstance(exc, StoreError):
        return 503
    return 400


def error_body(exc: Exception) -> dict[str, Any]:
    """An error as the API returns it: its type, message and status (and field errors)."""
    body: dict[str, Any] = {
        "error": type(exc).__name__,
        "message": safe(str(exc)),
        "status": status_of(exc),
    }
    errors = getattr(exc, "errors", None)
    if isinstance(errors, list):
        body["errors"] = json.loads(json.dumps(errors, default=str))
    return body


def api_error(exc: Exception) -> Response:
    """An error as a JSON response with its status."""
    body = error_body(exc)
    return SafeJSONResponse(body, status_code=body["status"])


def problem(status: int, message: str) -> Response:
    return SafeJSONResponse(
        {"error": "Refused", "message": message, "status": status}, status_code=status
    )


# -- the guard: Host, token ----------------------------------------------------------------


def route_path(scope: Scope) -> str:
    """The request's path inside the console (without the prefix it is mounted at)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class Guard:
    """Refuses a request for an unknown Host, or without the token when one is set."""

    def __init__(self, app: ASGIApp, *, token: str | None, hosts: tuple[str, ...] | None) -> None:
        self.app = app
        self.token = token
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check, then pass the request on (or answer it)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        path = route_path(scope)
        if not sec.host_allowed(request.headers.get("host"), self.hosts):
            await problem(400, "unknown Host: open the console by its loopback address")(
                scope, receive, send
            )
            return
        scope.setdefault("state", {})
        scope["state"]["crux_auth"] = "none"
        if self.token is not None and not (path == "/login" or path.startswith("/static/")):
            given = sec.bearer(request.headers.get("authorization"))
            if sec.same(given, self.token):
                scope["state"]["crux_auth"] = "bearer"
            elif sec.same(request.cookies.get(sec.SESSION_COOKIE), sec.session_value(self.token)):
                scope["state"]["crux_auth"] = "cookie"
            else:
                response: Response
                if path.startswith("/api/") or path == "/metrics" or request.method != "GET":
                    response = problem(401, "a token is required: Authorization: Bearer TOKEN")
                else:
                    root = scope.get("root_path", "")
                    target = path + (f"?{request.url.query}" if request.url.query else "")
                    response = RedirectResponse(
                        f"{root}/login?{urlencode({'next': target})}", status_code=303
                    )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Refused(Exception):
    """A request the console refuses (CSRF, read-only), with its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class AsgiEndpoint:
    """An ASGI app as a route's endpoint (Starlette calls a plain function with a request)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on."""
        await self.app(scope, receive, send)
