"""``OpenAICompatible``: a ``Model`` for any server speaking ``/v1/chat/completions``.

httpx is an optional dependency (``pip install 'crux_workers[ai]'``) and is imported
only when a provider is built, so ``import crux_workers.ai`` works without it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field
from types import ModuleType
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

from ..errors import (
    ConfigurationError,
    ModelError,
    ModelHTTPError,
    ModelRequestRejected,
    ModelResponseError,
    ModelTimeout,
)
from ._generate import Message

# Statuses below 500 worth another attempt: request timeout, conflict, rate limit.
_RETRYABLE_4XX = frozenset({408, 409, 429})
_BODY_LIMIT = 1000
_DETAIL_LIMIT = 200
_RESERVED = frozenset({"model", "messages"})


def _import_httpx() -> ModuleType:
    try:
        import httpx
    except ImportError as exc:
        raise ConfigurationError(
            "OpenAICompatible needs httpx: pip install 'crux_workers[ai]'"
        ) from exc
    return httpx


def _chat_completions_url(base_url: str) -> str:
    """The endpoint for ``base_url``: ``…/v1/chat/completions``, adding ``/v1`` if absent.

    A trailing slash is ignored; a URL that already ends in ``/chat/completions`` is
    used as it is (for servers that mount the API under another version path).
    """
    parts = urlsplit(base_url)
    path = parts.path.rstrip("/")
    if not path.endswith("/chat/completions"):
        if not path.endswith("/v1"):
            path += "/v1"
        path += "/chat/completions"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


@dataclass(frozen=True, slots=True)
class OpenAICompatible:
    """A chat model behind an OpenAI-compatible ``POST /v1/chat/completions`` endpoint.

    ``base_url`` is the server root (``http://127.0.0.1:8080``) or its ``/v1`` URL; both
    give ``…/v1/chat/completions``. ``api_key`` is sent as a bearer token and never
    appears in reprs or error messages. ``timeout`` (seconds) bounds each network step
    (connecting, then waiting for each piece of the answer), not the whole call.
    ``temperature``, ``max_tokens`` and ``extra_body`` go into the request body;
    ``headers`` are added to the request.

    ``complete`` blocks; ``complete_async`` is the same call for async code (an
    ``httpx.AsyncClient``), so the provider is both a ``Model`` and an ``AsyncModel``.

    Errors: ``ModelTimeout`` and ``ModelError`` (unreachable server) are retryable;
    ``ModelHTTPError`` is retryable for 5xx, 408, 409 and 429, and other statuses raise
    ``ModelRequestRejected`` (a ``NonRetryableError``); a reply that is not a completion
    raises ``ModelResponseError`` (also non-retryable).
    """

    base_url: str
    model: str
    _: KW_ONLY
    api_key: str | None = field(default=None, repr=False)
    timeout: float = 30.0
    temperature: float | None = None
    max_tokens: int | None = None
    extra_body: Mapping[str, Any] | None = None
    headers: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        parts = urlsplit(self.base_url) if isinstance(self.base_url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigurationError(
                f"OpenAICompatible base_url must be an http(s) URL, got {self._shown_base()}"
            )
        if self.api_key is not None and not (
            isinstance(self.api_key, str) and self.api_key.isascii() and self.api_key.isprintable()
        ):
            # Checked here because an HTTP client's error about a bad header value may
            # quote the value.
            raise ConfigurationError("OpenAICompatible api_key must be printable ASCII text")
        if not isinstance(self.model, str) or not self.model:
            raise ConfigurationError("OpenAICompatible model must be a non-empty string")
        if isinstance(self.timeout, bool) or not (
            isinstance(self.timeout, int | float) and self.timeout > 0
        ):
            raise ConfigurationError(
                f"OpenAICompatible timeout must be a positive number, got {self.timeout!r}"
            )
        clash = _RESERVED & set(self.extra_body or ())
        if clash:
            raise ConfigurationError(
                f"OpenAICompatible extra_body may not set {', '.join(sorted(clash))}: "
                "pass model= and the prompt instead"
            )
        # Fail where the provider is configured, not inside a step where the error would
        # only be retried.
        _import_httpx()

    @property
    def url(self) -> str:
        """The chat-completions endpoint requests are posted to."""
        return _chat_completions_url(self.base_url)

    def complete(self, messages: list[Message]) -> str:
        """POST ``messages`` and return the first choice's message content."""
        httpx = _import_httpx()
        body, headers = self._request(messages)
        # A client per call: a model call takes seconds, so pooling saves little, and a
        # short-lived client is safe across threads and Celery's forked worker processes.
        try:
            with httpx.Client(timeout=self.timeout, follow_redirects=False) as client:
                response = client.post(self.url, json=body, headers=headers)
        except httpx.RequestError as exc:
            raise self._request_error(httpx, exc) from exc
        return self._answer(response)

    async def complete_async(self, messages: list[Message]) -> str:
        """``complete`` without blocking the event loop: the same request and errors."""
        httpx = _import_httpx()
        body, headers = self._request(messages)
        # A client per call, as for complete: an AsyncClient is bound to the loop it
        # first runs on, and a provider may be shared by several loops and processes.
        try:
            async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=False) as client:
                response = await client.post(self.url, json=body, headers=headers)
        except httpx.RequestError as exc:
            raise self._request_error(httpx, exc) from exc
        return self._answer(response)

    def _request(self, messages: list[Message]) -> tuple[dict[str, Any], dict[str, str]]:
        """The JSON body and the headers of a chat-completions request."""
        body: dict[str, Any] = dict(self.extra_body or {})
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        body["model"] = self.model
        body["messages"] = messages
        headers = {"Accept": "application/json", **(self.headers or {})}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return body, headers

    def _request_error(self, httpx: ModuleType, exc: Exception) -> ModelError:
        """The typed error for an httpx ``RequestError`` (sync and async clients alike)."""
        if isinstance(exc, httpx.TimeoutException):
            return ModelTimeout(
                f"model server at {self._shown_url()} did not answer within "
                f"{self.timeout:g}s ({type(exc).__name__})",
                url=self._shown_url(),
                timeout=self.timeout,
            )
        if isinstance(exc, httpx.TransportError):
            return ModelError(
                f"could not reach model server at {self._shown_url()}: "
                f"{type(exc).__name__}: {self._redact(str(exc))}",
                url=self._shown_url(),
            )
        return ModelResponseError(
            f"unreadable answer from model server at {self._shown_url()}: "
            f"{type(exc).__name__}: {self._redact(str(exc))}",
            url=self._shown_url(),
        )

    def _answer(self, response: Any) -> str:
        """The completion text of a read ``httpx.Response``, or the typed error."""
        if not 200 <= response.status_code < 300:
            self._raise_http_error(response.status_code, response.reason_phrase, response.text)
        try:
            data = response.json()
        except ValueError:
            snippet = self._redact(response.text)[:_BODY_LIMIT]
            raise ModelResponseError(
                f"model server at {self._shown_url()} answered HTTP {response.status_code} "
                f"with a body that is not JSON: {snippet[:_DETAIL_LIMIT]!r}",
                status=response.status_code,
                body=snippet,
            ) from None
        return self._completion_text(data)

    def _raise_http_error(self, status: int, reason: str, text: str) -> NoReturn:
        redacted = self._redact(text)
        body = redacted[:_BODY_LIMIT]
        detail = _error_detail(redacted) or body[:_DETAIL_LIMIT] or "(empty body)"
        retryable = status >= 500 or status in _RETRYABLE_4XX
        cls = ModelHTTPError if retryable else ModelRequestRejected
        raise cls(
            f"model server at {self._shown_url()} answered HTTP {status} {reason}: {detail}",
            status=status,
            body=body,
        )

    def _completion_text(self, data: Any) -> str:
        where = f"model server at {self._shown_url()}"
        if not isinstance(data, dict):
            raise ModelResponseError(f"{where} answered JSON {type(data).__name__}, not an object")
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices:
            detail = _error_message(data.get("error"))
            raise ModelResponseError(
                f"{where} answered without choices"
                + (f": {self._redact(detail)}" if detail else "")
            )
        first = choices[0]
        message = first.get("message") if isinstance(first, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str):
            finish = first.get("finish_reason") if isinstance(first, dict) else None
            raise ModelResponseError(
                f"{where} answered a first choice without text content (finish_reason={finish!r})"
            )
        return content

    def _redact(self, text: str) -> str:
        # Some servers echo request headers back in error pages.
        return text.replace(self.api_key, "[redacted]") if self.api_key else text

    def _shown_url(self) -> str:
        return _without_secrets(self.url)

    def _shown_base(self) -> str:
        if not isinstance(self.base_url, str):
            return type(self.base_url).__name__
        return repr(_without_secrets(self.base_url))


def _without_secrets(url: str) -> str:
    """``url`` without user info and query string, either of which may hold a key."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _error_detail(body: str) -> str | None:
    """The message of an OpenAI-style ``{"error": {"message": ...}}`` body, if it is one."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return _error_message(data.get("error")) if isinstance(data, dict) else None


def _error_message(error: Any) -> str | None:
    """The text of an ``error`` member: a string, or an object with a ``message``."""
    if isinstance(error, dict):
        error = error.get("message")
    if isinstance(error, str) and error:
        return error[:_DETAIL_LIMIT]
    return None
