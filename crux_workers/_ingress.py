"""The ingress: signals published by other services, recorded durably.

Services that reach only the broker publish JSON messages (``publish_signal``, or
any client in any language; docs/signals.md) on the signals queue. The ingress
consumes them with kombu and, for each one:

1. checks the raw envelope before kombu decodes anything (``_envelope.guard_channel``:
   compressed, oversized or malformed envelopes are refused undecoded);
2. checks the message (size, signature and freshness, JSON, fields: ``_wire.decode``);
3. records it with ``Crux.signal_flow``, which commits the signal and then enqueues
   the resume, or records the refusal with its reason in ``crux_rejected_signals``
   (a bounded prefix of the body, its size and digest, a bounded detail);
4. acknowledges it only after that commit.

A crash before the acknowledgement redelivers the message (at least once); its
``key`` makes the second recording a no-op. A message the record cannot take right
now (database down) is neither acknowledged nor dropped: it is retried with backoff.
Nothing a publisher sends can stop the consumer.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from . import _envelope, _wire
from ._settings import redact
from .errors import (
    FlowNotFound,
    FlowNotWaiting,
    InvalidInput,
    InvalidSignal,
    RecordRefused,
    SignalRejected,
    StoreError,
)

if TYPE_CHECKING:
    from kombu.connection import Connection
    from kombu.entity import Queue
    from kombu.message import Message

    from ._app import Crux

log = logging.getLogger("crux_workers.ingress")

_RAW_KEPT = 1024  # bytes of a refused body kept for the operator (with its size and digest)
_DETAIL_KEPT = 500  # characters of a refusal's detail
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
        previous = s.signal_secret_previous
        self._previous = previous.get_secret_value().encode() if previous else None
        self._max_age = s.signal_max_age
        self._max_bytes = s.signal_max_bytes

    # -- one message ---------------------------------------------------------------

    def handle(
        self,
        body: bytes | str | None,
        headers: Mapping[str, Any] | None,
        *,
        received: float | None = None,
    ) -> Handled:
        """Check and record one message. Raises ``StoreError`` when the record is down.

        ``received`` is when the message arrived: its freshness is judged then, so a
        record that is down for a while does not turn fresh messages stale.
        """
        try:
            msg = _wire.decode(
                body,
                headers,
                secret=self._secret,
                previous_secret=self._previous,
                max_age=self._max_age,
                max_bytes=self._max_bytes,
                now=received,
            )
            receipt = self.app.signal_flow(msg.flow_id, msg.name, msg.payload, key=msg.key)
        except SignalRejected as exc:
            return self._reject(exc.reason, exc.detail, body, exc)
        except FlowNotFound as exc:
            return self._reject("unknown_flow", str(exc), body, msg)
        except FlowNotWaiting as exc:
            return self._reject("flow_finished", str(exc), body, msg)
        except InvalidSignal as exc:
            # The payload failed the schema the flow waits with (issue 14): nothing recorded.
            detail = json.dumps(getattr(exc, "errors", []), default=str)
            return self._reject("invalid_payload", detail, body, msg)
        except InvalidInput as exc:
            return self._reject("bad_fields", str(exc), body, msg)
        except RecordRefused as exc:
            # The record refused what the message holds: retrying would loop forever.
            return self._reject("record_refused", str(exc), body, msg)
        except StoreError:
            raise
        except Exception as exc:
            # A bug here must not stop the consumer nor lose the message: keep it.
            log.exception("ingress: unexpected error on a message; recording it as refused")
            detail = "".join(traceback.format_exception_only(exc)).strip()
            return self._reject("internal", detail, body, None)
        return Handled("duplicate" if receipt.duplicate else "recorded", str(receipt.signal_id))

    def _reject(self, reason: str, detail: str, body: bytes | str | None, src: Any) -> Handled:
        if len(detail) > _DETAIL_KEPT:
            detail = detail[: _DETAIL_KEPT - 1] + "…"
        self.app.store.record_rejected(
            reason,
            detail,
            _envelope.kept(body if isinstance(body, bytes | str) else None, _RAW_KEPT),
            flow_id=getattr(src, "flow_id", None),
            name=getattr(src, "name", None),
            key=getattr(src, "key", None),
        )
        log.warning("ingress: refused a signal message (%s): %.200r", reason, detail)
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
        _envelope.guard_channel(channel, self._max_bytes)
        consumer = Consumer(
            channel,
            queues=[self._queue()],
            on_message=lambda m: self._on_message(m, stop),
            on_decode_error=lambda m, exc: self._on_undecodable(m, exc, stop),
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

    def _on_undecodable(self, message: Message, exc: Exception, stop: threading.Event) -> None:
        # kombu built the message but could not decode it (a body that is not UTF-8, say):
        # it is on the books, so it must be recorded and acknowledged like any other.
        detail = "".join(traceback.format_exception_only(exc)).strip()
        self._settle(message, lambda: self._reject("undecodable", detail, message.body, None), stop)

    def _on_message(self, message: Message, stop: threading.Event) -> None:
        refusal: _envelope.Refusal | None = getattr(message, "refusal", None)
        if refusal is not None:
            # Refused from the raw envelope (compressed, too large, not a text body):
            # nothing of it was decoded, and nothing is now.
            self._settle(message, lambda: self._reject_refusal(refusal), stop)
            return
        received = time.time()
        self._settle(
            message, lambda: self.handle(message.body, message.headers, received=received), stop
        )

    def _reject_refusal(self, refusal: _envelope.Refusal) -> Handled:
        self.app.store.record_rejected(refusal.reason, refusal.detail[:_DETAIL_KEPT], refusal.raw)
        log.warning("ingress: refused a signal envelope (%s): %s", refusal.reason, refusal.detail)
        return Handled("rejected", f"{refusal.reason}: {refusal.detail}")

    def _settle(self, message: Message, fn: Any, stop: threading.Event) -> None:
        """Record what becomes of ``message``, then acknowledge it, whatever it held."""
        try:
            done = self._retrying(fn, stop)
        except Exception:
            # Not even the refusal could be recorded (a bug, not an outage): keeping the
            # message unacknowledged would stop the consumer, so it goes, loudly.
            log.exception(
                "ingress: could not record a message; dropping it: %s",
                _envelope.kept(message.body if isinstance(message.body, bytes) else None, 200),
            )
            message.ack()
            return
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
