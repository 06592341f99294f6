"""The client side of an app: start, signal, cancel, resume, read and wait on flows.

Everything here records first and then asks the transport to act; a request that is
lost on the way is repaired by the sweeper, because the record already says what is due.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel

from . import _json, _wire
from ._ids import check_id
from ._models import (
    TERMINAL,
    ErrorInfo,
    FlowOutcome,
    FlowState,
    ForkOrigin,
    SignalReceipt,
    SignalState,
    StepState,
    WaitGroup,
)
from ._schema_check import schema_errors
from ._settings import Settings, redact
from ._starts import batch_items, enqueue_many_quietly
from ._starts import input_json as to_json
from ._store._roles import CruxStore, StepCache
from ._store._types import FlowFilter, FlowRow
from ._transport import PublishedSignal, Transport
from .errors import (
    FlowIdConflict,
    FlowNotFound,
    FlowNotRetryable,
    InvalidInput,
    InvalidSignal,
    WaitTimeout,
)

log = logging.getLogger("crux_workers")
T = TypeVar("T")

# The async forms run the record's (blocking) calls here, not on the caller's loop and
# not in its default executor, which the application may need for itself.
_async_calls = ThreadPoolExecutor(max_workers=8, thread_name_prefix="crux-client")


async def off_loop(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run a blocking client call on the client's threads; the event loop stays free."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_async_calls, functools.partial(fn, *args, **kwargs))


class Services(Protocol):
    """What the client and the runtime are given by the app: opened on first use."""

    @property
    def settings(self) -> Settings:
        """The app's settings."""
        ...

    @property
    def store(self) -> CruxStore:
        """The durable record."""
        ...

    @property
    def cache(self) -> StepCache:
        """The step cache."""
        ...

    @property
    def transport(self) -> Transport:
        """The transport chosen for this app."""
        ...


def enqueue_quietly(
    services: Services,
    flow_name: str,
    flow_id: str,
    countdown: float | None,
    *,
    start: bool = False,
) -> None:
    """Ask for an execution; a failure is logged, not raised (the record says it is due)."""
    try:
        services.transport.enqueue(flow_name, flow_id, countdown, start=start)
    except Exception as exc:
        log.warning(
            "flow %s: could not enqueue on %s (%s); it is recorded as due and the "
            "sweeper will send it",
            flow_id,
            redact(services.settings.effective_broker_url),
            exc,
        )


class Client:
    """Start, signal, cancel, resume, read and wait on flows of one app."""

    def __init__(self, services: Services) -> None:
        self._s = services

    def start(self, flow_name: str, model: BaseModel, flow_id: str | None = None) -> str:
        """Record a pending flow with validated input and ask for its first execution.

        The same ``flow_id`` twice returns the existing flow, never a second one.
        """
        if flow_id is None:
            flow_id = str(uuid.uuid4())
        else:
            check_id(flow_id, "flow_id")
        what = f"input of flow {flow_name!r}"
        input_json = to_json(flow_name, model, self._s.settings.max_value_bytes, what)
        row, created = self._s.store.create_flow(flow_id, flow_name, input_json)
        if row.name != flow_name:
            raise FlowIdConflict(
                f"flow id {flow_id!r} is taken by a {row.name!r} flow", flow_id=flow_id
            )
        if created or row.status == "pending":
            # A repeated start of a pending flow re-sends the request: the first one may
            # have been lost with the process that sent it.
            enqueue_quietly(self._s, flow_name, flow_id, None, start=True)
        return flow_id

    def start_many(
        self,
        flow_name: str,
        models: Sequence[BaseModel],
        flow_ids: Sequence[str] | None = None,
    ) -> list[str]:
        """Start many flows of ``flow_name`` at once; their ids, in the order of ``models``.

        Every input (and id) is checked before anything is recorded: one bad item
        refuses the whole batch (``InvalidInput``), as does an id given twice. The flows
        are recorded in one transaction, all or nothing (an id taken by another flow
        name: ``FlowIdConflict``), then their executions are asked for together. An id
        that exists already returns that flow, re-sent if it is still pending, as
        ``start`` does. At most 1000 flows per call (``_starts.MAX_BATCH``).
        """
        items = batch_items(flow_name, list(models), flow_ids, self._s.settings.max_value_bytes)
        if not items:
            return []
        got = self._s.store.create_flows(items)
        # Pending flows that existed already are re-sent, as a repeated ``start`` does.
        due = [row.id for row, created in got if created or row.status == "pending"]
        if due:
            enqueue_many_quietly(self._s.transport, self._s.settings, flow_name, due, start=True)
        return [flow_id for flow_id, _, _ in items]

    def resume(self, flow_id: str) -> str:
        """Ask for a suspended flow to be replayed now; returns its flow name."""
        check_id(flow_id, "flow_id")
        name = self._s.store.request_resume(flow_id)
        enqueue_quietly(self._s, name, flow_id, None)
        return name

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
        _json.check_size(payload_json, self._s.settings.max_value_bytes, f"signal {name!r} payload")
        got = self._s.store.record_signal(
            flow_id, name, payload_json, key, check=_send_check(flow_id, name, payload)
        )
        if got.wake:
            enqueue_quietly(self._s, got.flow_name, flow_id, None)
        return SignalReceipt(
            flow_id=flow_id,
            signal_id=got.signal_id,
            name=name,
            duplicate=got.duplicate,
            delivered=got.wake,
        )

    def publish_signal(
        self, flow_id: str, name: str, payload: Any = None, *, key: str | None = None
    ) -> str:
        """Publish a signal message for the ingress; needs only the broker. Returns its key.

        Without ``key`` a unique one is made, so a redelivered message is recorded once.
        The message is signed when ``signal_secret`` is set. Where there is no broker
        (the embedded default) the transport records the signal directly.
        """
        check_id(flow_id, "flow_id")
        check_id(name, "signal name")
        key = key if key is not None else f"pub-{uuid.uuid4().hex}"
        check_id(key, "signal key")
        s = self._s.settings
        secret = s.signal_secret.get_secret_value().encode() if s.signal_secret else None
        try:
            body, headers = _wire.encode(flow_id, name, payload, key, secret)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"signal {name!r}: payload is not JSON-able: {exc}") from None
        size = len(body.encode())
        if size > s.signal_max_bytes:
            raise InvalidInput(
                f"signal {name!r}: message is {size} bytes, over "
                f"CRUX_SIGNAL_MAX_BYTES={s.signal_max_bytes}; the ingress would refuse it"
            )
        self._s.transport.publish_signal(
            PublishedSignal(flow_id, name, payload, key, body, headers)
        )
        return key

    def cancel_flow(self, flow_id: str, reason: str = "") -> str:
        """Cancel a flow: at once if nothing runs it, else at its next step boundary.

        Returns "cancelled" or "cancelling"; ``FlowAlreadyFinished`` for a finished flow.
        """
        check_id(flow_id, "flow_id")
        if not isinstance(reason, str) or len(reason) > 10_000:
            raise InvalidInput("cancel reason must be a string of at most 10000 characters")
        status = self._s.store.cancel(flow_id, reason)
        if status == "cancelled":
            self._s.cache.drop(flow_id)
        return status

    # -- operations: retry, fork, what waits on what -----------------------------------

    def retry_flow(self, flow_id: str) -> str:
        """Resume a failed flow from its last checkpoint; returns its new status, "pending".

        The failed step runs again with a fresh attempt count; earlier steps replay from
        the record. ``FlowNotRetryable`` when the flow has not failed.
        """
        check_id(flow_id, "flow_id")
        name = self._s.store.retry_flow(flow_id)
        enqueue_quietly(self._s, name, flow_id, None)
        return "pending"

    def retry_flows(
        self, *, status: str = "failed", name: str | None = None, limit: int = 1000
    ) -> list[str]:
        """Retry every flow matching the filter (at most ``limit``); returns their ids.

        A flow that stopped being retryable meanwhile (another operator retried it) is
        skipped.
        """
        if not 1 <= limit <= 100_000:
            raise InvalidInput("limit must be between 1 and 100000")
        rows = self._s.store.list_flows(FlowFilter(status=status, name=name, limit=limit))
        retried = []
        for row in rows:
            try:
                self.retry_flow(row.id)
            except (FlowNotRetryable, FlowNotFound):
                continue
            retried.append(row.id)
        return retried

    def fork_flow(
        self,
        source_id: str,
        at: int,
        *,
        input: BaseModel | None = None,
        flow_id: str | None = None,
    ) -> str:
        """A new flow from the first ``at`` checkpoints of ``source_id``, started now.

        ``input`` (already validated by the flow's model) replaces the source's input.
        Returns the new flow's id.
        """
        check_id(source_id, "flow_id")
        if isinstance(at, bool) or not isinstance(at, int):
            raise InvalidInput(f"at must be a checkpoint count (an int), got {at!r}")
        if flow_id is not None:
            check_id(flow_id, "flow_id")
        new_id = flow_id if flow_id is not None else str(uuid.uuid4())
        input_json = None
        if input is not None:
            input_json = _json.check_size(
                input.model_dump_json(), self._s.settings.max_value_bytes, "fork input"
            )
        row = self._s.store.fork_flow(source_id, new_id, at, input_json)
        enqueue_quietly(self._s, row.name, new_id, None, start=True)
        return new_id

    def waiting(self, *, name: str | None = None) -> list[WaitGroup]:
        """Suspended flows grouped by what they wait on, most flows first."""
        return [
            WaitGroup(
                name=w.name,
                kind=w.kind,  # type: ignore[arg-type]
                on=w.on,
                count=w.count,
                oldest_since=w.oldest_since,
                nearest_deadline=w.nearest_deadline,
                next_wake=w.next_wake,
            )
            for w in self._s.store.waiting(name)
        ]

    def get_flow(self, flow_id: str) -> FlowState:
        """Everything the record holds about a flow."""
        check_id(flow_id, "flow_id")
        return to_state(self._s.store.get_flow(flow_id, details=True))

    def outcome(self, flow_id: str) -> FlowOutcome | None:
        """The outcome if the flow has finished, else None."""
        row = self._s.store.get_flow(flow_id, details=False)
        if row.status not in TERMINAL:
            return None
        return FlowOutcome(
            flow_id=row.id,
            status=row.status,  # type: ignore[arg-type]
            result=_maybe_json(row.result),
            error=ErrorInfo.model_validate_json(row.error) if row.error else None,
            cancel_reason=row.cancel_reason,
        )

    def wait(self, flow_id: str, timeout: float | None = 60.0) -> FlowOutcome:
        """Block until the flow finishes; ``WaitTimeout`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.002
        while True:
            got = self.outcome(flow_id)
            if got is not None:
                return got
            if deadline is not None and time.monotonic() >= deadline:
                status = self._s.store.get_flow(flow_id, details=False).status
                raise WaitTimeout(
                    f"flow {flow_id} still {status} after {timeout}s",
                    flow_id=flow_id,
                    status=status,
                )
            time.sleep(pause)
            pause = min(pause * 1.5, 0.1)

    # -- async forms: the same calls, without blocking the caller's event loop ----------------

    async def start_async(
        self, flow_name: str, model: BaseModel, flow_id: str | None = None
    ) -> str:
        """``start`` for async code."""
        return await off_loop(self.start, flow_name, model, flow_id)

    async def start_many_async(
        self,
        flow_name: str,
        models: Sequence[BaseModel],
        flow_ids: Sequence[str] | None = None,
    ) -> list[str]:
        """``start_many`` for async code."""
        return await off_loop(self.start_many, flow_name, models, flow_ids)

    async def signal_flow_async(
        self, flow_id: str, name: str, payload: Any = None, *, key: str | None = None
    ) -> SignalReceipt:
        """``signal_flow`` for async code."""
        return await off_loop(self.signal_flow, flow_id, name, payload, key=key)

    async def cancel_flow_async(self, flow_id: str, reason: str = "") -> str:
        """``cancel_flow`` for async code."""
        return await off_loop(self.cancel_flow, flow_id, reason)

    async def get_flow_async(self, flow_id: str) -> FlowState:
        """``get_flow`` for async code."""
        return await off_loop(self.get_flow, flow_id)

    async def outcome_async(self, flow_id: str) -> FlowOutcome | None:
        """``outcome`` for async code."""
        return await off_loop(self.outcome, flow_id)

    async def wait_async(self, flow_id: str, timeout: float | None = 60.0) -> FlowOutcome:
        """``wait`` for async code: polls the record off the loop, sleeps on it."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        pause = 0.002
        while True:
            got = await self.outcome_async(flow_id)
            if got is not None:
                return got
            if deadline is not None and loop.time() >= deadline:
                row = await off_loop(self._s.store.get_flow, flow_id, details=False)
                raise WaitTimeout(
                    f"flow {flow_id} still {row.status} after {timeout}s",
                    flow_id=flow_id,
                    status=row.status,
                )
            await asyncio.sleep(pause)
            # Async callers tend to wait on many flows at once: poll them more gently.
            pause = min(pause * 1.5, 0.25)


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
        waiting_schema=_maybe_json(row.waiting_schema),
        forked_from=(
            ForkOrigin(flow_id=row.forked_from, at=row.forked_at or 0)
            if row.forked_from is not None
            else None
        ),
        retries=row.retries,
    )


def _send_check(flow_id: str, name: str, payload: Any) -> Callable[[str], None]:
    """The check ``record_signal`` runs when the flow waits on ``name`` with a schema."""

    def check(schema_json: str) -> None:
        errors = schema_errors(_json.loads(schema_json), payload)
        if errors:
            first = errors[0]
            where = ".".join(str(p) for p in first["loc"]) or "payload"
            raise InvalidSignal(
                f"signal {name!r} for flow {flow_id!r} does not match the schema the flow "
                f"waits with ({len(errors)} error(s); {where}: {first['msg']}); "
                "nothing was recorded",
                flow_id=flow_id,
                signal=name,
                errors=errors,
            )

    return check
