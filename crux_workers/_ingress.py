"""The ingress: signals published by other services, recorded durably.

Services that reach only the broker publish JSON messages (``publish_signal``, or
any client in any language; docs/signals.md) on the signals queue. The ingress
consumes them with kombu and, for each one:

1. checks it (size, signature, JSON, fields: ``_wire.decode``);
2. records it with ``Crux.signal_flow``, which commits the signal and then enqueues
   the resume, or records the refusal with its reason in ``crux_rejected_signals``;
3. acknowledges it only after that commit.

A crash before the acknowledgement redelivers the message (at least once); its
``key`` makes the second recording a no-op. A message the record cannot take right
now (database down) is neither acknowledged nor dropped: it is retried with backoff.
Nothing a publisher sends can stop the consumer.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from . import _wire
from ._settings import redact
from .errors import FlowNotFound, FlowNotWaiting, InvalidInput, SignalRejected, StoreError

if TYPE_CHECKING:
    from kombu.connection import Connection
    from kombu.entity import Queue
    from kombu.message import Message

    from ._app import Crux

log = logging.getLogger("crux_workers.ingress")

_RAW_KEPT = 64 * 1024  # how much of a refused body is kept for the operator
_BACKOFF_MAX = 10.0

Verdict = Literal["recorded", "duplicate", "rejected"]

# What decoding a malformed envelope raises, as opposed to a broker that went away.
_ENVELOPE_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError)


@dataclass(frozen=True, slots=True)
class Handled:
    """What became of one message."""

    verdict: Verdict
    detail: str = ""


class _Unreachable(Exception):
    """The broker could not be reached at all."""


class Ingress:
    """Consume the signals queue into the record. ``run`` until ``stop`` is set."""

    def __init__(self, app: Crux) -> None:
        self.app = app
        s = app.settings
        self._secret = s.signal_secret.get_secret_value().encode() if s.signal_secret else None
        self._max_bytes = s.signal_max_bytes

    # -- one message ---------------------------------------------------------------

    def handle(self, body: bytes | str | None, headers: Mapping[str, Any] | None) -> Handled:
        """Check and record one message. Raises ``StoreError`` when the record is down."""
        try:
            msg = _wire.decode(body, headers, secret=self._secret, max_bytes=self._max_bytes)
            receipt = self.app.signal_flow(msg.flow_id, msg.name, msg.payload, key=msg.key)
        except SignalRejected as exc:
            return self._reject(exc.reason, exc.detail, body, exc)
        except FlowNotFound as exc:
            return self._reject("unknown_flow", str(exc), body, msg)
        except FlowNotWaiting as exc:
            return self._reject("flow_finished", str(exc), body, msg)
        except InvalidInput as exc:
            return self._reject("bad_fields", str(exc), body, msg)
        except StoreError:
            raise
        except Exception as exc:
            # A bug here must not stop the consumer nor lose the message: keep it.
            log.exception("ingress: unexpected error on a message; recording it as refused")
            detail = "".join(traceback.format_exception_only(exc)).strip()
            return self._reject("internal", detail, body, None)
        return Handled("duplicate" if receipt.duplicate else "recorded", str(receipt.signal_id))

    def _reject(self, reason: str, detail: str, body: bytes | str | None, src: Any) -> Handled:
        raw = body.decode("utf-8", "replace") if isinstance(body, bytes) else (body or "")
        if len(raw) > _RAW_KEPT:
            raw = raw[:_RAW_KEPT] + f"... [{len(raw) - _RAW_KEPT} more characters not kept]"
        self.app.store.record_rejected(
            reason,
            detail,
            raw,
            flow_id=getattr(src, "flow_id", None),
            name=getattr(src, "name", None),
            key=getattr(src, "key", None),
        )
        log.warning("ingress: refused a signal message (%s): %s", reason, detail)
        return Handled("rejected", f"{reason}: {detail}")

    # -- the consumer loop -------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> None:
        """Consume until ``stop`` is set, reconnecting to the broker as needed."""
        from kombu.connection import Connection

        stop = stop or threading.Event()
        s = self.app.settings
        url = s.effective_broker_url
        if url is None:
            raise InvalidInput("the ingress needs a broker: set CRUX_REDIS_URL or CRUX_BROKER_URL")
        options = {"visibility_timeout": int(s.visibility_timeout), **s.broker_options}
        backoff = 0.5
        where = redact(url)
        while not stop.is_set():
            conn = Connection(url, transport_options=options)
            try:
                try:
                    conn.ensure_connection(max_retries=1)
                except Exception as exc:
                    # kombu reports a broker it cannot reach as OperationalError, which
                    # is not among its own connection_errors.
                    raise _Unreachable(exc) from exc
                backoff = 0.5
                self._consume(conn, stop)
            except (_Unreachable, *conn.connection_errors, *conn.channel_errors) as exc:
                cause = exc.__cause__ if isinstance(exc, _Unreachable) else exc
                log.warning(
                    "ingress: broker %s unavailable (%s); retrying in %.1fs", where, cause, backoff
                )
                stop.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
            finally:
                conn.release()

    def _queue(self) -> Queue:
        from kombu.entity import Queue

        name = self.app.settings.signal_queue
        return Queue(name, routing_key=name, durable=True)

    def _consume(self, conn: Connection, stop: threading.Event) -> None:
        from kombu.messaging import Consumer

        channel = conn.channel()
        consumer = Consumer(
            channel, queues=[self._queue()], on_message=lambda m: self._on_message(m, stop)
        )
        consumer.qos(prefetch_count=1)
        consumer.consume()
        log.info("ingress: consuming %s", self.app.settings.signal_queue)
        while not stop.is_set():
            try:
                conn.drain_events(timeout=1.0)
            except TimeoutError:
                continue
            except _ENVELOPE_ERRORS as exc:
                # The transport could not even decode the envelope (not kombu's format;
                # kombu counts some of these, KeyError included, as channel errors): it
                # is off the queue already, so all that can be kept is the reason.
                self._keep_undecodable(exc, stop)
            except conn.connection_errors + conn.channel_errors:
                raise
            except Exception as exc:
                self._keep_undecodable(exc, stop)

    def _keep_undecodable(self, exc: Exception, stop: threading.Event) -> None:
        detail = "".join(traceback.format_exception_only(exc)).strip()
        self._retrying(lambda: self._reject("undecodable", detail, None, None), stop)

    def _on_message(self, message: Message, stop: threading.Event) -> None:
        done = self._retrying(lambda: self.handle(message.body, message.headers), stop)
        if done is None:
            # Stopping while the record is down: hand the message back, unrecorded.
            message.requeue()
            return
        message.ack()

    def _retrying(self, fn: Any, stop: threading.Event) -> Handled | None:
        backoff = 0.5
        while True:
            try:
                result: Handled = fn()
                return result
            except StoreError as exc:
                log.warning("ingress: record unavailable (%s); retrying in %.1fs", exc, backoff)
                if stop.wait(backoff):
                    return None
                backoff = min(backoff * 2, _BACKOFF_MAX)
