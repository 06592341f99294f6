"""Crux: one app = settings + record + step cache + dispatcher (+ Celery when fleeted)."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from . import _json, _wire
from ._engine import Advance, Engine, FlowDef, Handler, error_json
from ._models import ErrorInfo, FlowState, SignalReceipt, SignalState, StepState
from ._settings import Settings, redact
from ._store._cache import MemoryStepCache, RedisStepCache
from ._store._migrate import ensure_schema
from ._store._sql import SqlStore
from ._store._types import CruxStore, FlowRow, StepCache
from .errors import (
    ConfigurationError,
    DuplicateFlowName,
    InvalidInput,
    NonRetryableError,
    StoreError,
    TaskFailed,
    UnknownFlow,
)

if TYPE_CHECKING:
    from celery import Celery

    from ._dispatch import Dispatcher
    from ._flow import FlowHandle

log = logging.getLogger("crux_workers")
M = TypeVar("M", bound=BaseModel)

_MAX_KEY = 200
_SWEEP_LIMIT = 500
_SWEEP_BATCHES = 20


@dataclass(frozen=True, slots=True)
class SweepReport:
    """What one sweep did."""

    tick: int
    skipped: bool = False
    expired: int = 0
    published: int = 0


class Crux:
    """An explicit crux_workers app. ``@flow`` and friends use a default one from env.

    Nothing connects at construction: the record, cache, broker are opened on first use.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        store: CruxStore | None = None,
        cache: StepCache | None = None,
        dispatcher: Dispatcher | None = None,
        **overrides: Any,
    ) -> None:
        if settings is not None and overrides:
            raise ConfigurationError("pass either settings or keyword overrides, not both")
        self.settings = settings or Settings.from_env(**overrides)
        self._flows: dict[str, FlowDef] = {}
        self._handles: dict[str, FlowHandle[Any]] = {}
        self._store = store
        self._cache = cache
        self._engine: Engine | None = None
        self._dispatcher: Dispatcher | None = dispatcher
        self._celery: Celery | None = None
        self._lock = threading.RLock()
        # Child task objects seen in this process, for the embedded default to run them.
        self._children: dict[str, Any] = {}

    # -- definitions ----------------------------------------------------------------

    def flow(
        self, name: str, *, input: type[M], queue: str | None = None
    ) -> Callable[[Handler], FlowHandle[M]]:
        """Decorator: define a flow called ``name`` whose input is validated by ``input``."""
        from ._flow import FlowHandle

        if not isinstance(name, str) or not name or len(name) > 200 or not name.isprintable():
            raise InvalidInput("flow name must be a printable, non-empty string (<= 200 chars)")
        if not (isinstance(input, type) and issubclass(input, BaseModel)):
            raise InvalidInput(f"flow {name!r}: input must be a pydantic model class")

        def decorate(fn: Handler) -> FlowHandle[M]:
            with self._lock:
                existing = self._flows.get(name)
                if existing is not None and _qualname(existing.fn) != _qualname(fn):
                    raise DuplicateFlowName(
                        f"flow {name!r} is already defined by {_qualname(existing.fn)}",
                        flow=name,
                    )
                defn = FlowDef(name, fn, input)
                self._flows[name] = defn
                handle: FlowHandle[M] = FlowHandle(self, defn, queue=queue)
                self._handles[name] = handle
                if self._celery is not None:
                    from ._tasks import register_flow_task

                    register_flow_task(self._celery, self, defn)
            return handle

        return decorate

    def flow_defs(self) -> list[FlowDef]:
        """Every flow registered on this app."""
        with self._lock:
            return list(self._flows.values())

    def lookup(self, name: str) -> FlowDef:
        """The registered flow called ``name``; ``UnknownFlow`` if none."""
        try:
            return self._flows[name]
        except KeyError:
            raise UnknownFlow(
                f"no flow {name!r} is registered in this process", flow=name
            ) from None

    # -- wiring (lazy) ----------------------------------------------------------------

    @property
    def store(self) -> CruxStore:
        """The durable record; its schema is brought to head on first use."""
        if self._store is None:
            with self._lock:
                if self._store is None:
                    if not self.settings.embedded and self.settings.database_url is None:
                        raise ConfigurationError(
                            "a broker is configured but CRUX_DATABASE_URL is not: this app "
                            "can publish_signal, but recording or running flows needs the "
                            "shared database"
                        )
                    store = SqlStore(self.settings.effective_database_url)
                    if self.settings.auto_migrate:
                        try:
                            ensure_schema(store.engine)
                        except Exception as exc:
                            store.close()
                            raise StoreError(
                                f"cannot prepare the record at {redact(store.url)}: {exc}"
                            ) from exc
                    self._store = store
        return self._store

    @property
    def cache(self) -> StepCache:
        """The step cache: Redis when configured, else in process memory."""
        if self._cache is None:
            with self._lock:
                if self._cache is None:
                    url = self.settings.redis_url
                    self._cache = (
                        RedisStepCache(url, self.settings.redis_prefix)
                        if url
                        else MemoryStepCache()
                    )
        return self._cache

    @property
    def engine(self) -> Engine:
        """The execution engine."""
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    self._engine = Engine(
                        self.store,
                        self.cache,
                        self.lookup,
                        lease_ttl=self.settings.lease_ttl,
                        send_child=self._send_child,
                        task_resend_after=self.settings.task_resend_after,
                    )
        return self._engine

    @property
    def celery(self) -> Celery:
        """The Celery app behind the fleet (needs a broker URL)."""
        if self._celery is None:
            with self._lock:
                if self._celery is None:
                    if self.settings.embedded:
                        raise ConfigurationError(
                            "no broker configured: set CRUX_REDIS_URL or CRUX_BROKER_URL "
                            "(and CRUX_DATABASE_URL) to run on Celery"
                        )
                    from ._tasks import make_celery

                    self._celery = make_celery(self)
        return self._celery

    @property
    def dispatcher(self) -> Dispatcher:
        """How executions are requested: Celery messages, or local threads when embedded."""
        if self._dispatcher is None:
            with self._lock:
                if self._dispatcher is None:
                    from ._dispatch import CeleryDispatcher, ThreadDispatcher

                    if self.settings.embedded:
                        self._dispatcher = ThreadDispatcher(
                            self.execute,
                            self.settings.embedded_threads,
                            sweep=self.sweep,
                            sweep_interval=self.settings.sweep_interval,
                        )
                    else:
                        self._dispatcher = CeleryDispatcher(self._send_task)
        return self._dispatcher

    def _send_task(
        self, flow_name: str, flow_id: str, countdown: float | None, start: bool = False
    ) -> None:
        from ._tasks import START_PRIORITY, task_name

        handle = self._handles.get(flow_name)
        options: dict[str, Any] = {}
        if handle is not None and handle.queue:
            options["queue"] = handle.queue
        if countdown:
            options["countdown"] = countdown
        if start:
            options["priority"] = START_PRIORITY
        self.celery.send_task(task_name(flow_name), args=[flow_id], **options)

    # -- executing ----------------------------------------------------------------------

    def execute(self, flow_name: str, flow_id: Any) -> Advance | None:
        """The body of a start/resume task: advance the flow, re-ask if it must wait."""
        if not _valid_id(flow_id):
            # Nothing can be recorded about it; retrying would loop forever.
            log.error("dropping a malformed flow message: flow_id=%.300r", flow_id)
            return None
        try:
            outcome = self.engine.advance(flow_id)
        except StoreError as exc:
            delay = 1.0 + random.random() * 2
            log.warning("flow %s: record unavailable (%s); retrying in %.1fs", flow_id, exc, delay)
            self._enqueue_quietly(flow_name, flow_id, delay)
            return None
        except UnknownFlow:
            return None
        if outcome.kind == "busy" and outcome.retry_after is not None:
            # Another executor holds the lease: look again once it would have expired.
            self._enqueue_quietly(flow_name, flow_id, outcome.retry_after + 0.1)
        elif outcome.wake_in is not None and outcome.wake_in <= self._countdown_limit():
            # A latency shortcut only: the timer is in the record and the sweeper fires
            # it if this message is lost or redelivered (see docs/time.md).
            self._enqueue_quietly(flow_name, flow_id, outcome.wake_in + 0.05)
        return outcome

    def _countdown_limit(self) -> float:
        s = self.settings
        return min(s.countdown_limit, s.visibility_timeout / 4)

    def sweep(self) -> SweepReport:
        """One sweep: expire overdue flows, re-publish due and stalled ones.

        Runs from beat every ``sweep_interval``; a second beat's sweep of the same tick
        is skipped, and every action is conditional in the record, so overlapping
        sweeps cannot expire or wake a flow twice.
        """
        s = self.settings
        tick = int(self.store.now().timestamp() // s.sweep_interval)
        if not self.store.claim_tick(tick):
            return SweepReport(tick=tick, skipped=True)
        expired: list[str] = []
        published = 0
        for _ in range(_SWEEP_BATCHES):
            got = self.store.sweep(limit=_SWEEP_LIMIT, redrive_after=s.redrive_after)
            expired += got.expired
            for flow_id in got.expired:
                self.cache.drop(flow_id)
            for name, flow_id in got.due:
                self._enqueue_quietly(name, flow_id, None)
            published += len(got.due)
            if len(got.expired) + len(got.due) < _SWEEP_LIMIT:
                break
        if expired or published:
            log.info("sweep %d: expired %d, published %d", tick, len(expired), published)
        return SweepReport(tick=tick, expired=len(expired), published=published)

    def cancel_flow(self, flow_id: str, reason: str = "") -> str:
        """Cancel a flow: at once if nothing runs it, else at its next step boundary.

        Returns "cancelled" or "cancelling"; ``FlowAlreadyFinished`` for a finished flow.
        """
        check_id(flow_id, "flow_id")
        if not isinstance(reason, str) or len(reason) > 10_000:
            raise InvalidInput("cancel reason must be a string of at most 10000 characters")
        status = self.store.cancel(flow_id, reason)
        if status == "cancelled":
            self.cache.drop(flow_id)
        return status

    def _enqueue_quietly(
        self, flow_name: str, flow_id: str, countdown: float | None, *, start: bool = False
    ) -> None:
        try:
            self.dispatcher.enqueue(flow_name, flow_id, countdown, start=start)
        except Exception as exc:
            # The record still says what is due; the sweeper re-sends it.
            log.warning(
                "flow %s: could not enqueue on %s (%s); it is recorded as due and the "
                "sweeper will send it",
                flow_id,
                redact(self.settings.effective_broker_url),
                exc,
            )

    # -- child tasks (run_task) ------------------------------------------------------------

    def _send_child(self, task_id: str, call_json: str, child: Any) -> None:
        call = _json.loads(call_json)
        if child is not None:
            self._children[call["task"]] = child
        if self.settings.embedded:
            threading.Thread(
                target=self._run_child_here,
                args=(task_id, call),
                name=f"crux-child-{call['task']}",
                daemon=True,
            ).start()
            return
        from ._tasks import send_child

        try:
            send_child(self.celery, self.settings.queue, task_id, call)
        except Exception as exc:
            log.warning(
                "child task %s could not be sent (%r); it is sent again after %ss",
                task_id,
                exc,
                self.settings.task_resend_after,
            )

    def _run_child_here(self, task_id: str, call: dict[str, Any]) -> None:
        """The embedded default has no broker: run the child on a thread of this process."""
        fn = self._children.get(call["task"])
        if fn is None:
            self.complete_task(
                task_id,
                error=TaskFailed(
                    f"task {call['task']!r} is not available in this process (the embedded "
                    "default runs children locally: pass the task object, not its name)",
                    task=call["task"],
                ),
            )
            return
        try:
            value = fn(*call["args"], **call["kwargs"])
        except Exception as exc:
            self.complete_task(task_id, error=exc)
        else:
            self.complete_task(task_id, result=value)

    def complete_task(
        self,
        task_id: str,
        *,
        result: Any = None,
        error: BaseException | None = None,
        remote_failure: bool = False,
    ) -> bool:
        """Record a child task's outcome (the first one counts) and wake its flow.

        Returns True when this outcome woke the flow; False for a duplicate, a stale
        attempt, an unknown task id, or a flow that is not waiting for it.
        """
        if not isinstance(task_id, str) or not task_id.startswith("crux:"):
            log.error("dropping a child outcome with a malformed task id %r", task_id)
            return False
        if remote_failure:
            error = TaskFailed(
                f"child task {task_id} failed on a worker that does not report its error "
                "across services; see that worker's log",
                task_id=task_id,
            )
        result_json: str | None = None
        if error is None:
            try:
                result_json = _json.dumps(result)
            except (TypeError, ValueError) as exc:
                error = TaskFailed(f"child task {task_id} returned a value that is not JSON: {exc}")
        error_text = None
        if error is not None:
            info = ErrorInfo.model_validate_json(error_json(error))
            retryable = not isinstance(error, NonRetryableError)
            error_text = info.model_copy(
                update={"details": {**info.details, "retryable": retryable}}
            ).model_dump_json()
        woke = self.store.complete_task(task_id, result=result_json, error=error_text)
        if woke is not None:
            self._enqueue_quietly(woke[0], woke[1], None)
        return woke is not None

    # -- signals and reads ------------------------------------------------------------------

    def signal_flow(
        self, flow_id: str, name: str, payload: Any = None, *, key: str | None = None
    ) -> SignalReceipt:
        """Record a signal durably, then wake the flow if it is waiting for it."""
        check_id(flow_id, "flow_id")
        check_id(name, "signal name")
        if key is not None:
            check_id(key, "signal key")
        try:
            _json.check_depth(payload)
            payload_json = _json.dumps(payload)
        except (TypeError, ValueError, RecursionError) as exc:
            raise InvalidInput(f"signal {name!r}: payload is not JSON-able: {exc}") from None
        got = self.store.record_signal(flow_id, name, payload_json, key)
        if got.wake:
            self._enqueue_quietly(got.flow_name, flow_id, None)
        return SignalReceipt(
            flow_id=flow_id, signal_id=got.signal_id, name=name, duplicate=got.duplicate
        )

    def publish_signal(
        self, flow_id: str, name: str, payload: Any = None, *, key: str | None = None
    ) -> str:
        """Publish a signal message for the ingress; needs only the broker. Returns its key.

        Without ``key`` a unique one is made, so a redelivered message is recorded once.
        The message is signed when ``signal_secret`` is set. On the embedded default
        (no broker) the signal is recorded directly instead.
        """
        import uuid

        check_id(flow_id, "flow_id")
        check_id(name, "signal name")
        key = key if key is not None else f"pub-{uuid.uuid4().hex}"
        check_id(key, "signal key")
        s = self.settings
        secret = s.signal_secret.get_secret_value().encode() if s.signal_secret else None
        try:
            body, headers = _wire.encode(flow_id, name, payload, key, secret)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"signal {name!r}: payload is not JSON-able: {exc}") from None
        if len(body.encode()) > s.signal_max_bytes:
            raise InvalidInput(
                f"signal {name!r}: message is {len(body.encode())} bytes, over "
                f"CRUX_SIGNAL_MAX_BYTES={s.signal_max_bytes}; the ingress would refuse it"
            )
        if s.embedded:
            self.signal_flow(flow_id, name, payload, key=key)
            return key
        from ._tasks import publish_json

        publish_json(self.celery, s.signal_queue, body, headers)
        return key

    def resume(self, flow_id: str) -> str:
        """Ask for a suspended flow to be replayed now; returns its flow name."""
        check_id(flow_id, "flow_id")
        name = self.store.request_resume(flow_id)
        self._enqueue_quietly(name, flow_id, None)
        return name

    def get_flow(self, flow_id: str) -> FlowState:
        """Everything the record holds about a flow."""
        check_id(flow_id, "flow_id")
        return to_state(self.store.get_flow(flow_id, details=True))

    def close(self) -> None:
        """Stop the embedded executors and release connections."""
        with self._lock:
            if self._dispatcher is not None:
                self._dispatcher.close()
                self._dispatcher = None
            if self._store is not None:
                self._store.close()
            if isinstance(self._cache, RedisStepCache):
                self._cache.close()


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def check_id(value: object, what: str) -> None:
    """Refuse an identifier the record cannot hold (``InvalidInput``)."""
    if not _valid_id(value):
        raise InvalidInput(
            f"{what} must be a non-empty string of at most {_MAX_KEY} characters, "
            "without NUL or unpaired surrogates"
        )


def _valid_id(value: object) -> bool:
    # Postgres text holds neither NUL nor lone surrogates (which json.loads can produce).
    if not isinstance(value, str) or not value or len(value) > _MAX_KEY or "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _maybe_json(text: str | None) -> Any:
    return None if text is None else _json.loads(text)


def to_state(row: FlowRow) -> FlowState:
    """The public view of a record row."""
    return FlowState(
        flow_id=row.id,
        name=row.name,
        status=row.status,  # type: ignore[arg-type]
        input=_json.loads(row.input),
        result=_maybe_json(row.result),
        error=ErrorInfo.model_validate_json(row.error) if row.error else None,
        cancel_reason=row.cancel_reason,
        waiting_on=row.waiting_on,
        deadline=row.deadline,
        wake_at=row.wake_at,
        wake_kind=row.wake_kind,
        epoch=row.epoch,
        steps=[
            StepState(
                seq=s.seq,
                kind=s.kind,
                name=s.name,
                occurrence=s.occurrence,
                result=_json.loads(s.result),
                attempts=s.attempts,
                started_at=s.started_at,
                completed_at=s.completed_at,
            )
            for s in row.steps
        ],
        signals=[
            SignalState(
                id=g.id,
                name=g.name,
                payload=_json.loads(g.payload),
                key=g.key,
                status=g.status,  # type: ignore[arg-type]
                error=g.error,
                consumed_seq=g.consumed_seq,
                created_at=g.created_at,
                consumed_at=g.consumed_at,
            )
            for g in row.signals
        ],
        step_errors=[ErrorInfo.model_validate_json(e.error) for e in row.step_errors],
        created_at=row.created_at,
        updated_at=row.updated_at,
        finished_at=row.finished_at,
    )


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
