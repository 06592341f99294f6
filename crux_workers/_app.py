"""``Crux``: the app, a composition root over a registry, a client, a runtime and a transport.

Nothing connects at construction. The record, the step cache and the transport are
opened on first use; the transport is chosen once, from the settings, in
``Crux.transport``: no other module asks "embedded or Celery?".
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from ._client import Client, off_loop
from ._engine import Advance, Engine
from ._flow import FlowHandle, FlowRun
from ._ids import check_id
from ._models import FlowState, SignalReceipt, WaitGroup
from ._registry import FlowDef, FlowRegistry, Handler
from ._runtime import Runtime, SweepReport
from ._settings import Settings, redact
from ._store._roles import CruxStore, StepCache
from ._transport import (
    Dispatcher,
    DispatchingTransport,
    EmbeddedTransport,
    RecordOnlyTransport,
    Transport,
)
from .errors import ConfigurationError, InvalidInput, StoreError

if TYPE_CHECKING:
    from celery import Celery

    from ._tasks import CeleryTransport

M = TypeVar("M", bound=BaseModel)

__all__ = ["Crux", "SweepReport", "check_id", "default_app", "flow", "set_default_app"]


class Crux:
    """An explicit crux_workers app. ``@flow`` and friends use a default one from env.

    ``store``, ``cache`` and ``transport`` may be given (tests, the testing kit, the
    CLI); by default they follow the settings. ``dispatcher`` replaces only how
    executions are requested (children and signals still follow the settings);
    ``record_only=True`` requests none (a short-lived process on the embedded default).
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        store: CruxStore | None = None,
        cache: StepCache | None = None,
        transport: Transport | None = None,
        dispatcher: Dispatcher | None = None,
        record_only: bool = False,
        **overrides: Any,
    ) -> None:
        if settings is not None and overrides:
            raise ConfigurationError("pass either settings or keyword overrides, not both")
        if transport is not None and (dispatcher is not None or record_only):
            raise ConfigurationError("pass a transport, or a dispatcher, not both")
        self._settings = settings or Settings.from_env(**overrides)
        self.registry = FlowRegistry()
        self._store = store
        self._cache = cache
        self._transport = transport
        self._dispatcher = dispatcher
        self._record_only = record_only
        self._lock = threading.RLock()
        self.client = Client(self)
        self.runtime = Runtime(self, self.registry, self.client)

    # -- services (opened on first use) ----------------------------------------------

    @property
    def settings(self) -> Settings:
        """The app's settings."""
        return self._settings

    @property
    def store(self) -> CruxStore:
        """The durable record; its schema is brought to head on first use."""
        if self._store is None:
            with self._lock:
                if self._store is None:
                    self._store = self._open_store()
        return self._store

    def _open_store(self) -> CruxStore:
        s = self.settings
        if not s.embedded and s.database_url is None:
            raise ConfigurationError(
                "a broker is configured but CRUX_DATABASE_URL is not: this app "
                "can publish_signal, but recording or running flows needs the "
                "shared database"
            )
        from ._store._migrate import ensure_schema
        from ._store._sql import SqlStore

        store = SqlStore(s.effective_database_url)
        if s.auto_migrate:
            try:
                ensure_schema(store.engine)
            except Exception as exc:
                store.close()
                raise StoreError(
                    f"cannot prepare the record at {redact(store.url)}: {exc}"
                ) from exc
        return store

    @property
    def cache(self) -> StepCache:
        """The step cache: Redis when configured, else in process memory."""
        if self._cache is None:
            with self._lock:
                if self._cache is None:
                    from ._store._cache import MemoryStepCache, RedisStepCache

                    url = self.settings.redis_url
                    self._cache = (
                        RedisStepCache(url, self.settings.redis_prefix)
                        if url
                        else MemoryStepCache()
                    )
        return self._cache

    @property
    def transport(self) -> Transport:
        """How work leaves this process: chosen once, here, from the settings."""
        if self._transport is None:
            with self._lock:
                if self._transport is None:
                    self._transport = self._choose_transport()
        return self._transport

    def _choose_transport(self) -> Transport:
        s = self.settings
        base: Transport
        if s.embedded:
            kind = RecordOnlyTransport if self._record_only else EmbeddedTransport
            base = kind(self.runtime, s.embedded_threads, s.sweep_interval)
        else:
            from ._tasks import CeleryTransport

            base = CeleryTransport(s, self.runtime, self.registry)
        if self._dispatcher is not None:
            return DispatchingTransport(self._dispatcher, base)
        return base

    def _celery_transport(self) -> CeleryTransport:
        from ._tasks import CeleryTransport

        transport = self.transport
        if isinstance(transport, DispatchingTransport):
            transport = transport.base
        if not isinstance(transport, CeleryTransport):
            raise ConfigurationError(
                "no broker configured: set CRUX_REDIS_URL or CRUX_BROKER_URL "
                "(and CRUX_DATABASE_URL) to run on Celery"
            )
        return transport

    @property
    def celery(self) -> Celery:
        """The Celery app behind the fleet (needs a broker URL)."""
        return self._celery_transport().celery

    def flow_task(self, defn: FlowDef) -> Any:
        """The Celery task that starts and resumes ``defn`` (needs a broker URL)."""
        return self._celery_transport().flow_task(defn)

    @property
    def engine(self) -> Engine:
        """The execution engine."""
        return self.runtime.engine

    # -- definitions -------------------------------------------------------------------

    def flow(
        self, name: str, *, input: type[M], queue: str | None = None
    ) -> Callable[[Handler], FlowHandle[M]]:
        """Decorator: define a flow called ``name`` whose input is validated by ``input``."""
        # Checked before decorating, so a bad name fails where the decorator is written.
        FlowRegistry.check_definition(name, input)

        def decorate(fn: Handler) -> FlowHandle[M]:
            return FlowHandle(self, self.registry.define(name, fn, input, queue))

        return decorate

    def flow_defs(self) -> list[FlowDef]:
        """Every flow registered on this app."""
        return self.registry.all()

    def lookup(self, name: str) -> FlowDef:
        """The registered flow called ``name``; ``UnknownFlow`` if none."""
        return self.registry.lookup(name)

    # -- client calls ---------------------------------------------------------------------

    def signal_flow(
        self, flow_id: str, name: str, payload: Any = None, *, key: str | None = None
    ) -> SignalReceipt:
        """Record a signal durably, then wake the flow if it is waiting for it."""
        return self.client.signal_flow(flow_id, name, payload, key=key)

    def publish_signal(
        self, flow_id: str, name: str, payload: Any = None, *, key: str | None = None
    ) -> str:
        """Publish a signal message for the ingress; needs only the broker. Returns its key."""
        return self.client.publish_signal(flow_id, name, payload, key=key)

    def cancel_flow(self, flow_id: str, reason: str = "") -> str:
        """Cancel a flow: "cancelled" at once, or "cancelling" at its next step boundary."""
        return self.client.cancel_flow(flow_id, reason)

    def resume(self, flow_id: str) -> str:
        """Ask for a suspended flow to be replayed now; returns its flow name."""
        return self.client.resume(flow_id)

    def get_flow(self, flow_id: str) -> FlowState:
        """Everything the record holds about a flow."""
        return self.client.get_flow(flow_id)

    # -- operations (the CLI and the console call these) -----------------------------

    def retry_flow(self, flow_id: str) -> str:
        """Resume a failed flow from its last checkpoint; returns "pending"."""
        return self.client.retry_flow(flow_id)

    def retry_flows(
        self, *, status: str = "failed", name: str | None = None, limit: int = 1000
    ) -> list[str]:
        """Retry every flow matching the filter; returns the ids retried."""
        return self.client.retry_flows(status=status, name=name, limit=limit)

    def fork_flow(
        self,
        source_id: str,
        /,
        at: int,
        input: Any = None,
        *,
        flow_id: str | None = None,
    ) -> FlowRun:
        """A new flow whose first ``at`` checkpoints are copied from ``source_id``.

        The copied checkpoints are not run again; the fork runs on from there, with
        ``input`` in place of the source's input when given (validated by the flow's
        input model, which must then be registered in this process). The source is
        untouched; ``get_flow(new).forked_from`` says where the fork came from.
        """
        model = None
        if input is not None:
            row = self.store.get_flow(source_id, details=False)
            defn = self.registry.get(row.name)
            if defn is None:
                raise InvalidInput(
                    f"flow {row.name!r} is not registered in this process, so a replaced "
                    "input cannot be validated; fork from a process that imports the flow, "
                    "or fork without --input",
                    flow=row.name,
                )
            model = FlowHandle(self, defn).validate_input(input)
        return FlowRun(self, self.client.fork_flow(source_id, at, input=model, flow_id=flow_id))

    def waiting(self, *, name: str | None = None) -> list[WaitGroup]:
        """Suspended flows grouped by what they wait on (signal, sleep, poll, task, retry)."""
        return self.client.waiting(name=name)

    def purge_finished(self, before: datetime) -> int:
        """Delete flows that finished before ``before`` (every row of theirs), and refused
        ingress messages received before it; returns the number of flows."""
        purged = self.store.purge_finished(before)
        self.store.purge_rejected(before)
        return purged

    async def retry_flow_async(self, flow_id: str) -> str:
        """``retry_flow`` for async code (the console)."""
        return await off_loop(self.retry_flow, flow_id)

    async def fork_flow_async(
        self, source_id: str, /, at: int, input: Any = None, *, flow_id: str | None = None
    ) -> FlowRun:
        """``fork_flow`` for async code."""
        return await off_loop(self.fork_flow, source_id, at, input, flow_id=flow_id)

    async def waiting_async(self, *, name: str | None = None) -> list[WaitGroup]:
        """``waiting`` for async code."""
        return await off_loop(self.waiting, name=name)

    async def signal_flow_async(
        self, flow_id: str, name: str, payload: Any = None, *, key: str | None = None
    ) -> SignalReceipt:
        """``signal_flow`` for async code (the event loop stays free)."""
        return await self.client.signal_flow_async(flow_id, name, payload, key=key)

    async def cancel_flow_async(self, flow_id: str, reason: str = "") -> str:
        """``cancel_flow`` for async code."""
        return await self.client.cancel_flow_async(flow_id, reason)

    async def get_flow_async(self, flow_id: str) -> FlowState:
        """``get_flow`` for async code."""
        return await self.client.get_flow_async(flow_id)

    # -- worker calls ---------------------------------------------------------------------

    def execute(self, flow_name: str, flow_id: Any) -> Advance | None:
        """The body of a start/resume task: advance the flow, re-ask if it must wait."""
        return self.runtime.execute(flow_name, flow_id)

    def sweep(self) -> SweepReport:
        """One sweep: expire overdue flows, re-publish due and stalled ones."""
        return self.runtime.sweep()

    def complete_task(
        self,
        task_id: str,
        *,
        result: Any = None,
        error: BaseException | None = None,
        remote_failure: bool = False,
    ) -> bool:
        """Record a child task's outcome (the first one counts) and wake its flow."""
        return self.runtime.complete_task(
            task_id, result=result, error=error, remote_failure=remote_failure
        )

    def close(self) -> None:
        """Stop the embedded executors and release connections."""
        with self._lock:
            if self._transport is not None:
                self._transport.close()
                self._transport = None
            if self._store is not None:
                self._store.close()
            close_cache = getattr(self._cache, "close", None)
            if close_cache is not None:
                close_cache()


_default: Crux | None = None
_default_lock = threading.Lock()


def default_app() -> Crux:
    """The app ``@flow``, ``signal_flow`` and the CLI use: configured from ``CRUX_*``."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Crux()
    return _default


def set_default_app(app: Crux | None) -> None:
    """Replace the default app (tests, or apps built from code rather than env)."""
    global _default
    with _default_lock:
        _default = app


def flow(
    name: str, *, input: type[M], queue: str | None = None
) -> Callable[[Handler], FlowHandle[M]]:
    """Define a flow on the default app (configured from ``CRUX_*`` variables)."""
    return default_app().flow(name, input=input, queue=queue)
