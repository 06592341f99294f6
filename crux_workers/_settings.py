"""The one settings model: read from ``CRUX_*`` environment variables or passed in."""

from __future__ import annotations

import os
import re
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import (
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from ._durations import parse_duration
from .errors import ConfigurationError

Seconds = Annotated[float, BeforeValidator(lambda v: parse_duration(v, what="setting"))]

ENV_PREFIX = "CRUX_"

# -- secrets: what is refused at start, and what never reaches a message ------------------

MIN_SECRET_BYTES = 32
# Values shipped as examples in this repository or commonly pasted from docs. Any value
# holding "change-me"/"changeme" is refused as well.
KNOWN_PLACEHOLDERS = frozenset(
    {
        "change-me-to-a-long-random-string",
        "replace-me-with-a-long-random-string",
        "0123456789abcdef0123456789abcdef",
        "00000000000000000000000000000000",
        "secretsecretsecretsecretsecretsecret",
    }
)
_URL_FIELDS = ("database_url", "redis_url", "broker_url")
_MASK = "***"


class Settings(BaseSettings):
    """Configuration of one crux_workers app.

    With ``database_url`` unset the app runs on the *embedded default*: a SQLite
    record under ``.crux/`` and flows executed on threads of the calling process,
    no servers needed. With a Postgres URL and a Redis URL it runs on Celery.
    """

    # hide_input_in_errors: pydantic would print the offending input (a URL with its
    # password, the signal secret) in every validation error.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, hide_input_in_errors=True
    )

    database_url: str | None = Field(
        default=None,
        description="postgresql+psycopg://... or sqlite:///...; unset: embedded SQLite",
    )
    redis_url: str | None = Field(default=None, description="step cache (and default broker)")
    broker_url: str | None = Field(default=None, description="Celery broker; default redis_url")
    redis_prefix: str = Field(default="crux", min_length=1, description="prefix of cache keys")
    queue: str = Field(default="crux", min_length=1, description="queue of flow tasks")
    lease_ttl: Seconds = Field(default=30.0, description="an executor's lease, renewed while alive")
    visibility_timeout: Seconds = Field(
        default=3600.0, description="Redis broker redelivery of unacknowledged messages"
    )
    broker_options: dict[str, Any] = Field(
        default_factory=dict,
        description="extra kombu transport options (JSON), e.g. unacked_restore_interval",
    )
    sweep_interval: Seconds = Field(default=5.0, description="how often beat runs the sweeper")
    redrive_after: Seconds = Field(
        default=30.0, description="re-publish a due flow nobody claimed after this long"
    )
    countdown_limit: Seconds = Field(
        default=60.0, description="longest wait sent as a Celery countdown (beyond: sweeper only)"
    )
    task_resend_after: Seconds = Field(
        default=300.0, description="send a run_task child again if no outcome came by then"
    )
    signal_queue: str = Field(
        default="crux.signals", min_length=1, description="queue the ingress consumes"
    )
    signal_secret: SecretStr | None = Field(
        default=None, description="HMAC-SHA256 key: when set, unsigned signal messages are refused"
    )
    signal_max_bytes: int = Field(
        default=256 * 1024, ge=1024, description="largest published signal message accepted"
    )
    max_value_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="largest stored value: flow input, step result, signal payload, child result",
    )
    max_lapses: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="park a flow failed once this many executions in a row died without progress",
    )
    # -- signing and envelope limits (docs/signals.md) ---------------------------------
    signal_secret_previous: SecretStr | None = Field(
        default=None, description="for rotation: a second key the ingress also accepts"
    )
    signal_max_age: Seconds = Field(
        default=300.0,
        description="signed messages are accepted this long around their timestamp",
    )
    worker_max_message_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=64 * 1024,
        description="largest task message body a worker decodes (compressed ones: refused)",
    )
    retention: Seconds | None = Field(
        default=None,
        description="beat purges flows finished longer ago than this (e.g. 30d); unset: keep",
    )
    retention_interval: Seconds = Field(
        default=3600.0, description="how often beat runs the retention purge"
    )
    metrics_port: int | None = Field(
        default=None, ge=1, le=65535, description="a worker serves its counters here (/metrics)"
    )
    metrics_host: str = Field(default="127.0.0.1", description="address of the worker's metrics")
    embedded_threads: int = Field(default=4, ge=1, le=64, description="embedded executor threads")
    auto_migrate: bool = Field(default=True, description="bring the schema to head on first use")
    # -- remote control and health (docs/security.md) ------------------------------------
    remote_control: Literal["off", "inspect", "full"] = Field(
        default="inspect",
        description="Celery remote control: inspect (the default: celery inspect and "
        "Flower can read, no broker client can shut a worker down or change it), full "
        "(every command, e.g. Flower's pool and shutdown buttons), off (no mailbox at all)",
    )
    health_file: str | None = Field(
        default=None,
        description="file a worker touches every few seconds while it consumes; read by "
        "`crux-workers health`",
    )

    @field_validator("remote_control", mode="before")
    @classmethod
    def _remote_control(cls, value: Any) -> Any:
        # Booleans as earlier releases took them: true was every command, false none.
        if isinstance(value, bool):
            return "full" if value else "off"
        if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
            return "full"
        if isinstance(value, str) and value.strip().lower() in ("false", "0", "no"):
            return "off"
        return value

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigurationError(f"invalid crux_workers settings: {describe(exc)}") from None

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.database_url is not None and not self.database_url.startswith(
            ("postgresql", "sqlite")
        ):
            raise ValueError("database_url must be a postgresql+psycopg:// or sqlite:/// URL")
        for name in _URL_FIELDS:
            password = _url_password(getattr(self, name))
            if password is not None and _is_placeholder(password):
                raise ValueError(f"{name} holds a placeholder password; set the real one")
        if self.signal_secret is not None:
            _check_secret(self.signal_secret.get_secret_value())
        if self.signal_secret_previous is not None:
            if self.signal_secret is None:
                raise ValueError("signal_secret_previous needs signal_secret")
            _check_secret(self.signal_secret_previous.get_secret_value())
        return self

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            if name in _URL_FIELDS and isinstance(value, str):
                yield name, redact(value)
            elif name == "broker_options":
                yield name, _redact_mapping(value)
            else:
                yield name, value

    @property
    def fleet_ready(self) -> bool:
        """True when both a broker and a shared database are configured (a worker's needs)."""
        return self.effective_broker_url is not None and self.database_url is not None

    @property
    def embedded(self) -> bool:
        """True when no broker is configured: flows run on local threads."""
        return self.effective_broker_url is None

    @property
    def effective_broker_url(self) -> str | None:
        """The broker URL in use: ``broker_url``, else ``redis_url``."""
        return self.broker_url or self.redis_url

    @property
    def effective_database_url(self) -> str:
        """The database URL in use; the embedded SQLite file when none is set."""
        return self.database_url or "sqlite:///.crux/crux.db"

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Read ``CRUX_*`` variables; unknown ``CRUX_*`` names are refused, not ignored."""
        known = {ENV_PREFIX + name.upper() for name in cls.model_fields}
        unknown = sorted(k for k in os.environ if k.startswith(ENV_PREFIX) and k not in known)
        if unknown:
            raise ConfigurationError(
                f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        try:
            return cls(**overrides)
        except SettingsError as exc:
            # Raised while decoding a variable (e.g. JSON); its text names the field only.
            raise ConfigurationError(f"invalid crux_workers settings: {exc}") from None


def describe(exc: ValidationError) -> str:
    """A validation error as ``field: message`` parts, never with the input values."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False):
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def _check_secret(value: str) -> None:
    if not value:
        raise ValueError("signal_secret must not be empty (unset it to turn signing off)")
    if _is_placeholder(value):
        raise ValueError(
            "signal_secret is a placeholder; generate one, e.g. `openssl rand -hex 32`"
        )
    if len(value.encode()) < MIN_SECRET_BYTES:
        raise ValueError(
            f"signal_secret is shorter than {MIN_SECRET_BYTES} bytes; generate one, "
            "e.g. `openssl rand -hex 32`"
        )


def _is_placeholder(value: str) -> bool:
    folded = value.strip().lower()
    squashed = re.sub(r"[^a-z0-9]", "", folded)
    return folded in KNOWN_PLACEHOLDERS or "changeme" in squashed or "replaceme" in squashed


def _url_password(url: str | None) -> str | None:
    if not url or "://" not in url:
        return None
    try:
        password = urlsplit(url).password
    except ValueError:
        return None
    return unquote(password) if password else None


# A query (or fragment, or key=value DSN) parameter whose name says it holds a secret.
_SECRET_NAME = re.compile(r"pass|pwd|secret|token|key|auth|credential|signature|^sig$")
_PARAM = re.compile(r"(?P<name>[^&;#?=\s]+)=(?P<value>[^&;#\s]*)")


def _secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(re.sub(r"[^a-z]", "", unquote(name).lower())))


def _redact_params(text: str) -> str:
    def mask(match: re.Match[str]) -> str:
        name = match.group("name")
        return f"{name}={_MASK}" if _secret_name(name) else match.group(0)

    return _PARAM.sub(mask, text)


def redact(url: str | None) -> str:
    """The URL with every secret in it masked, for messages and logs.

    The password of the userinfo (``user:***@``; a userinfo without ``:`` may be a
    token and is masked whole) and every query or fragment parameter whose name says
    it holds a secret (``password``, ``pass``, ``pwd``, ``secret``, ``token``, ``key``,
    ``sslpassword``, ``auth``...). Text that is not a URL gets the parameter rule.
    """
    if not url:
        return "<unset>"
    scheme, sep, rest = url.partition("://")
    if not sep:
        return _redact_params(url)
    end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=-1)
    netloc, tail = (rest, "") if end < 0 else (rest[:end], rest[end:])
    userinfo, at, host = netloc.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:{_MASK}@{host}" if colon else f"{_MASK}@{host}"
    return f"{scheme}://{netloc}{_redact_params(tail)}"


def _redact_mapping(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _MASK if isinstance(k, str) and _secret_name(k) else _redact_mapping(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_redact_mapping(v) for v in value]
    if isinstance(value, str) and "://" in value:
        return redact(value)
    return value
