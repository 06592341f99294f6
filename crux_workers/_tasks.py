"""The Celery transport: the only module that imports Celery.

The app's Celery configuration, one task per flow, the child-outcome callbacks and
the sweep task. Every message is a hint to look at the record: the task claims the
flow's lease in Postgres and replays. Redelivered or duplicated messages are harmless.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from contextlib import nullcontext
from datetime import datetime
from typing import TYPE_CHECKING, Any

from celery import Celery, bootsteps
from celery.worker.consumer import Consumer

from ._health import Heartbeat
from ._transport import PublishedSignal

if TYPE_CHECKING:
    from ._registry import FlowDef, FlowRegistry
    from ._runtime import Runtime
    from ._settings import Settings

log = logging.getLogger("crux_workers.tasks")

TASK_PREFIX = "crux.flow."
SWEEP_TASK = "crux.sweep"
RETENTION_TASK = "crux.retention"
TASK_DONE = "crux.task_done"
TASK_FAILED = "crux.task_failed"
# On Redis, 0 is the highest priority. Starts go to the "<queue>:9" list, which workers
# read only when "<queue>" (resumes, timers, child outcomes) is empty.
START_PRIORITY = 9
# The raw task message size a worker decodes when no setting says otherwise.
_MAX_MESSAGE_BYTES = 8 * 1024 * 1024


class SafeConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, refusing a malformed task message instead of dying on it.

    Celery 5.7 lets some malformed messages (a body of ``5``, a list as the task
    header) escape as "Unrecoverable error", which stops the worker and, since the
    message goes back to the queue, every worker after it. Anything can publish on a
    shared broker: such a message is logged and dropped, the worker lives on.

    kombu inflates a ``compression`` body while it builds the message, before Celery
    sees it: the channel is guarded (``_envelope.guard_channel``) so that a compressed
    message, or one whose raw body is over ``worker_max_message_bytes``, arrives here
    undecoded and is refused (logged, rejected without requeue).
    """

    def connect(self) -> Any:
        """Celery's connection, its channels guarded before any message is read."""
        from ._envelope import guard_connection

        conn = super().connect()
        limit = int(self.app.conf.get("crux_max_message_bytes") or _MAX_MESSAGE_BYTES)
        guard_connection(conn, limit)
        return conn

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        """Wrap Celery's handler of incoming task messages."""
        handler = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Any) -> Any:
            refusal = getattr(message, "refusal", None)
            if refusal is not None:
                log.error(
                    "refusing a task message before decoding it (%s: %s); headers=%.300r",
                    refusal.reason,
                    refusal.detail,
                    getattr(message, "headers", None),
                )
                try:
                    message.reject(requeue=False)
                except Exception:
                    log.exception("could not reject the refused message")
                return None
            try:
                return handler(message)
            except Exception as exc:
                body = getattr(message, "body", b"")
                log.error(
                    "refusing a malformed task message (%s: %s); headers=%.300r body=%.300r",
                    type(exc).__name__,
                    exc,
                    getattr(message, "headers", None),
                    body,
                )
                try:
                    message.reject(requeue=False)
                except Exception:
                    log.exception("could not reject the malformed message")
                return None

        return on_task_received


def task_name(flow_name: str) -> str:
    """The Celery task name of a flow."""
    return TASK_PREFIX + flow_name


class CeleryTransport:
    """Executions, children and published signals as messages on the Celery broker."""

    def __init__(self, settings: Settings, runtime: Runtime, registry: FlowRegistry) -> None:
        self._settings = settings
        self._runtime = runtime
        self._registry = registry
        self._celery: Celery | None = None
        self._lock = threading.Lock()
        registry.on_define(self._defined)

    @property
    def celery(self) -> Celery:
        """The Celery app (built on first use; nothing connects until a message is sent)."""
        if self._celery is None:
            with self._lock:
                if self._celery is None:
                    self._celery = make_celery(self._settings, self._runtime, self._registry)
        return self._celery

    def _defined(self, defn: FlowDef) -> None:
        if self._celery is not None:
            register_flow_task(self._celery, self._runtime, defn)

    def flow_task(self, defn: FlowDef) -> Any:
        """The Celery task that starts and resumes ``defn``."""
        return register_flow_task(self.celery, self._runtime, defn)

    def enqueue(
        self, flow_name: str, flow_id: str, countdown: float | None = None, *, start: bool = False
    ) -> None:
        """Publish the flow's task; ``countdown`` only for short delays (see docs/time.md).

        Starts go out at a lower priority than resumes, so a signal's resume does not
        wait behind a burst of new flows.
        """
        options = self._options(flow_name, start)
        if countdown:
            options["countdown"] = countdown
        self.celery.send_task(task_name(flow_name), args=[flow_id], **options)

    def enqueue_many(self, flow_name: str, flow_ids: Sequence[str], *, start: bool = False) -> None:
        """Publish the flows' tasks over one producer: one connection for the batch.

        Where kombu can batch publishes (5.7 on Redis: ``Producer.batch``), the messages
        go out in one pipeline, flushed when the batch ends; an error discards those not
        flushed yet, and the sweeper sends them (the record says they are due).
        """
        if not flow_ids:
            return
        app, name = self.celery, task_name(flow_name)
        options = self._options(flow_name, start)
        with app.producer_or_acquire() as producer:
            batch = getattr(producer, "batch", None)
            with batch(max_size=len(flow_ids)) if batch is not None else nullcontext():
                for flow_id in flow_ids:
                    app.send_task(name, args=[flow_id], producer=producer, **options)

    def _options(self, flow_name: str, start: bool) -> dict[str, Any]:
        defn = self._registry.get(flow_name)
        options: dict[str, Any] = {}
        if defn is not None and defn.queue:
            options["queue"] = defn.queue
        if start:
            options["priority"] = START_PRIORITY
        return options

    def send_child(self, task_id: str, call: dict[str, Any], child: Any) -> None:
        """Publish the child with its outcome routed back to the flow queue."""
        send_child(self.celery, self._settings.queue, task_id, call)

    def publish_signal(self, signal: PublishedSignal) -> None:
        """Publish the signal's wire message on the signals queue, for the ingress."""
        publish_json(self.celery, self._settings.signal_queue, signal.body, signal.headers)

    def start(self) -> None:
        """Nothing to start here: `crux-workers worker` runs the Celery worker."""

    def close(self) -> None:
        """Nothing to release: Celery owns the producer pool."""


def make_celery(s: Settings, runtime: Runtime, registry: FlowRegistry) -> Celery:
    """A Celery app configured for durable flows on the Redis broker."""
    app = Celery("crux_workers", broker=s.effective_broker_url, set_as_current=False)
    transport = {
        # Must exceed the longest task run, and be the same in every process sharing
        # the broker (the shortest one wins); flows never rely on broker ETA.
        "visibility_timeout": int(s.visibility_timeout),
        # Priority lists are named "<queue>:<priority>" (kombu's default separator is a
        # control character, which queue-length autoscalers cannot be given).
        "sep": ":",
        "priority_steps": [0, START_PRIORITY],
        **s.broker_options,
    }
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_backend=None,
        task_default_queue=s.queue,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        worker_consumer="crux_workers._tasks:SafeConsumer",
        crux_max_message_bytes=s.worker_max_message_bytes,  # read by SafeConsumer
    )
    # -- trust boundary (docs/security.md): remote control answers questions but takes no
    # orders unless asked to; the health checks read a heartbeat file, not the broker.
    app.conf.worker_enable_remote_control = s.remote_control != "off"
    if s.remote_control == "inspect":
        app.steps["consumer"].add(ReadOnlyControl)
    if s.health_file:
        app.steps["consumer"].add(heartbeat_step(s.health_file))
    # -- end trust boundary
    app.conf.beat_schedule = {
        "crux-sweep": {
            "task": SWEEP_TASK,
            "schedule": s.sweep_interval,
            # A sweep that waited longer than one interval is superseded by the next.
            "options": {"expires": s.sweep_interval},
        }
    }

    @app.task(name=SWEEP_TASK, acks_late=False, shared=False, bind=True)  # type: ignore[untyped-decorator]
    def sweep(task: Any) -> dict[str, Any]:
        report = runtime.sweep(scheduled_at=_sent_at(task.request.expires, s.sweep_interval))
        return {"tick": report.tick, "expired": report.expired, "published": report.published}

    # -- retention (issue 14, operations): CRUX_RETENTION purges from beat ----------------
    _add_retention(app, s, runtime)

    _register_child_callbacks(app, runtime)
    from .ops._worker import instrument_celery  # metrics, spans, events (docs/observability.md)

    instrument_celery(app, runtime, s)
    for defn in registry.all():
        register_flow_task(app, runtime, defn)
    return app


def _add_retention(app: Celery, s: Settings, runtime: Runtime) -> None:
    """The task that purges finished flows older than ``CRUX_RETENTION``, and its beat
    entry when the setting is on. The worker that runs it reads its own setting."""
    from ._ops import retention_tick

    if s.retention is not None:
        app.conf.beat_schedule["crux-retention"] = {
            "task": RETENTION_TASK,
            "schedule": s.retention_interval,
            "options": {"expires": s.retention_interval},
        }

    @app.task(name=RETENTION_TASK, acks_late=False, shared=False)  # type: ignore[untyped-decorator]
    def retention() -> dict[str, Any]:
        report = retention_tick(runtime.services)
        if report is None:
            log.warning("retention: beat asked for a purge but CRUX_RETENTION is unset here")
            return {}
        return {"tick": report.tick, "skipped": report.skipped, "purged": report.purged}


def _sent_at(expires: Any, interval: float) -> float | None:
    """When beat sent a sweep: its message expires one interval after (for the lag metric)."""
    if not expires:
        return None
    try:
        when = expires if isinstance(expires, datetime) else datetime.fromisoformat(str(expires))
    except ValueError:
        return None
    return when.timestamp() - interval


def _register_child_callbacks(app: Celery, runtime: Runtime) -> None:
    """The link and link_error of every child sent by ``run_task``.

    A record that is down makes them retry; past that, the flow's resend timer sends
    the child again, so an outcome is never lost for good.
    """
    from .errors import RecordRefused, StoreError

    retrying = {
        "shared": False,
        "acks_late": True,
        "autoretry_for": (StoreError,),
        # ... but a write the record refuses for what it holds would be refused again.
        "dont_autoretry_for": (RecordRefused,),
        "retry_backoff": True,
        "retry_backoff_max": 30,
        "max_retries": 20,
    }

    @app.task(name=TASK_DONE, **retrying)  # type: ignore[untyped-decorator]
    def task_done(result: Any, task_id: str) -> None:
        runtime.complete_task(task_id, result=result)

    @app.task(name=TASK_FAILED, **retrying)  # type: ignore[untyped-decorator]
    def task_failed(request: Any, exc: Any = None, traceback: Any = None) -> None:
        # Called in-process, with the error, when the child ran on a crux worker; sent
        # as a message with just the child's task id when it ran on another service's.
        if isinstance(request, str):
            runtime.complete_task(request, error=None, remote_failure=True)
        else:
            error = exc if isinstance(exc, BaseException) else RuntimeError(repr(exc))
            runtime.complete_task(str(request.id), error=error)


def send_child(app: Celery, queue: str, task_id: str, call: dict[str, Any]) -> None:
    """Publish a ``run_task`` child with its outcome routed back to the flow queue."""
    done = app.signature(TASK_DONE, args=(task_id,), queue=queue)
    failed = app.signature(TASK_FAILED, queue=queue)
    app.send_task(
        call["task"],
        args=call["args"],
        kwargs=call["kwargs"],
        task_id=task_id,
        link=done,
        link_error=failed,
        **call["options"],
    )


def register_flow_task(app: Celery, runtime: Runtime, defn: FlowDef) -> Any:
    """Register the task that starts and resumes ``defn``."""
    name = task_name(defn.name)
    if name in app.tasks:
        return app.tasks[name]

    def advance_flow(flow_id: Any) -> dict[str, Any] | None:
        outcome = runtime.execute(defn.name, flow_id)
        # What this execution did, as the task's result: Celery's task-succeeded event
        # carries it, so Flower and `celery events` show it (no result backend stores it).
        if outcome is None:
            return None
        return {"flow_id": flow_id, "outcome": outcome.kind, "steps_run": outcome.steps_run}

    # Celery compiles a signature from __name__: flow names like "first-week" are not
    # identifiers. Arguments are checked by runtime.execute, not by Celery (typing=False).
    ident = re.sub(r"\W", "_", defn.name)
    advance_flow.__name__ = advance_flow.__qualname__ = f"advance_{ident}"
    # shared=False: a shared task would be registered on every later Celery app in this
    # process, and the first registration wins there, so one app would run another's flows.
    return app.task(
        name=name, acks_late=True, reject_on_worker_lost=True, shared=False, typing=False
    )(advance_flow)


def publish_json(app: Celery, queue_name: str, body: str, headers: dict[str, str]) -> None:
    """Publish a JSON text as is (no Celery task envelope) on a durable queue.

    Nothing is declared: on Redis a queue is a list that LPUSH creates, and a publisher
    whose broker user may only LPUSH to that list (docs/security.md) can publish.
    """
    with app.producer_or_acquire() as producer:
        producer.publish(
            body,
            exchange="",
            routing_key=queue_name,
            content_type="application/json",
            content_encoding="utf-8",
            headers=headers,
            delivery_mode=2,
            retry=True,
            retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
        )


def heartbeat_step(path: str) -> type[bootsteps.StartStopStep]:
    """A consumer bootstep that beats while the consumer consumes (after its task step)."""

    class HeartbeatStep(bootsteps.StartStopStep):  # type: ignore[misc]
        """Liveness heartbeat of this worker's consumer (``CRUX_HEALTH_FILE``)."""

        requires = ("celery.worker.consumer.tasks:Tasks",)

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self.heartbeat = Heartbeat(path)

        def start(self, parent: Any) -> None:
            self.heartbeat.start()
            log.info("heartbeat: touching %s every %.0fs", path, self.heartbeat.interval)

        def stop(self, parent: Any) -> None:
            self.heartbeat.stop()

        def shutdown(self, parent: Any) -> None:
            self.heartbeat.stop()

    return HeartbeatStep


# What remote control may ask in "inspect" mode: Celery's read-only commands (less the
# heavy or revealing ones: memory dumps, the configuration), the worker-to-worker
# greetings, and turning events on and off for Flower. Never shutdown, pool changes,
# revokes, rate or time limits, consumers.
_INSPECT_ONLY = frozenset(
    {
        "active",
        "active_queues",
        "clock",
        "hello",
        "ping",
        "query_task",
        "registered",
        "report",
        "reserved",
        "revoked",
        "scheduled",
        "stats",
        "heartbeat",
        "election",
        "enable_events",
        "disable_events",
    }
)


class ReadOnlyControl(bootsteps.StartStopStep):  # type: ignore[misc]
    """Keeps the worker's mailbox (Flower and ``celery inspect`` can read) but refuses
    every command that changes or stops the worker.

    The mailbox also matters for reconnection: on the Redis transport, a worker without
    one did not notice a broker restart and stopped consuming for good (found by
    tests/faults/test_servers_down.py), so "inspect", not "off", is the default.
    """

    requires = ("celery.worker.consumer.control:Control",)

    def start(self, parent: Any) -> None:
        """Narrow the mailbox's handlers to the read-only commands."""
        control = parent.blueprint.steps.get("celery.worker.consumer.control.Control")
        node = getattr(getattr(control, "box", None), "node", None)
        if node is None:
            return
        node.handlers = {k: v for k, v in node.handlers.items() if k in _INSPECT_ONLY}
