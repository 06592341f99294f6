"""The one settings model: read from ``CRUX_*`` environment variables or passed in."""

from __future__ import annotations

import os
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ._durations import parse_duration
from .errors import ConfigurationError

Seconds = Annotated[float, BeforeValidator(lambda v: parse_duration(v, what="setting"))]

ENV_PREFIX = "CRUX_"


class Settings(BaseSettings):
    """Configuration of one crux_workers app.

    With ``database_url`` unset the app runs on the *embedded default*: a SQLite
    record under ``.crux/`` and flows executed on threads of the calling process,
    no servers needed. With a Postgres URL and a Redis URL it runs on Celery.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

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
    embedded_threads: int = Field(default=4, ge=1, le=64, description="embedded executor threads")
    auto_migrate: bool = Field(default=True, description="bring the schema to head on first use")

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.database_url is not None and not self.database_url.startswith(
            ("postgresql", "sqlite")
        ):
            raise ValueError("database_url must be a postgresql+psycopg:// or sqlite:/// URL")
        if self.signal_secret is not None and not self.signal_secret.get_secret_value():
            raise ValueError("signal_secret must not be empty (unset it to turn signing off)")
        if self.signal_secret_previous is not None and (
            self.signal_secret is None or not self.signal_secret_previous.get_secret_value()
        ):
            raise ValueError("signal_secret_previous needs signal_secret, and must not be empty")
        return self

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
        except ValidationError as exc:
            raise ConfigurationError(f"invalid crux_workers settings: {exc}") from exc


def redact(url: str | None) -> str:
    """The URL with its password replaced, for messages and logs."""
    if not url:
        return "<unset>"
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]
