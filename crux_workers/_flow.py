"""``@flow``, ``FlowHandle`` and ``FlowRun``: starting flows and waiting for them."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from . import _json
from ._models import TERMINAL, ErrorInfo, FlowOutcome, FlowState, SignalReceipt
from .errors import FlowIdConflict, InvalidInput, WaitTimeout

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._app import Crux
    from ._engine import FlowDef, Handler

M = TypeVar("M", bound=BaseModel)


class FlowRun:
    """A started flow: its id, its state, and a way to wait for its outcome."""

    def __init__(self, app: Crux, flow_id: str) -> None:
        self.app = app
        self.flow_id = flow_id

    def __repr__(self) -> str:
        return f"FlowRun(flow_id={self.flow_id!r})"

    def state(self) -> FlowState:
        """Everything the record holds about this flow now."""
        return self.app.get_flow(self.flow_id)

    def outcome(self) -> FlowOutcome | None:
        """The outcome if the flow has finished, else None."""
        row = self.app.store.get_flow(self.flow_id, details=False)
        if row.status not in TERMINAL:
            return None
        return FlowOutcome(
            flow_id=row.id,
            status=row.status,  # type: ignore[arg-type]
            result=None if row.result is None else _json.loads(row.result),
            error=ErrorInfo.model_validate_json(row.error) if row.error else None,
            cancel_reason=row.cancel_reason,
        )

    def wait(self, timeout: float | None = 60.0) -> FlowOutcome:
        """Block until the flow finishes; ``WaitTimeout`` after ``timeout`` seconds.

        A suspended flow is not finished: waiting on one only returns once a signal
        (or an expiry, or a cancellation) ends it.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.002
        while True:
            got = self.outcome()
            if got is not None:
                return got
            if deadline is not None and time.monotonic() >= deadline:
                status = self.app.store.get_flow(self.flow_id, details=False).status
                raise WaitTimeout(
                    f"flow {self.flow_id} still {status} after {timeout}s",
                    flow_id=self.flow_id,
                    status=status,
                )
            time.sleep(pause)
            pause = min(pause * 1.5, 0.1)


class FlowHandle(Generic[M]):
    """A defined flow: start it, resume it, signal it."""

    def __init__(self, app: Crux, defn: FlowDef, *, queue: str | None = None) -> None:
        self.app = app
        self.name = defn.name
        self.fn: Handler = defn.fn
        self.input_model: type[BaseModel] = defn.input_model
        self.queue = queue

    def __repr__(self) -> str:
        return f"FlowHandle({self.name!r})"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"flow {self.name!r} is not called directly: use {self.name}.run(input=...)"
        )

    def run(
        self,
        input: M | dict[str, Any] | None = None,
        *,
        flow_id: str | None = None,
        resume: str | None = None,
    ) -> FlowRun:
        """Start the flow (or, with ``resume=flow_id``, ask a suspended one to replay).

        The input is validated first: invalid input raises ``InvalidInput`` and records
        nothing. The same ``flow_id`` twice returns the existing run, never a second one.
        """
        if resume is not None:
            if input is not None or flow_id is not None:
                raise InvalidInput("run(resume=...) takes no input or flow_id")
            name = self.app.resume(resume)
            if name != self.name:
                raise FlowIdConflict(
                    f"flow {resume!r} is a {name!r} flow, not {self.name!r}", flow_id=resume
                )
            return FlowRun(self.app, resume)
        model = self.validate_input(input)
        if flow_id is None:
            flow_id = str(uuid.uuid4())
        else:
            from ._app import check_id

            check_id(flow_id, "flow_id")
        row, created = self.app.store.create_flow(flow_id, self.name, model.model_dump_json())
        if row.name != self.name:
            raise FlowIdConflict(
                f"flow id {flow_id!r} is taken by a {row.name!r} flow", flow_id=flow_id
            )
        if created or row.status == "pending":
            # A repeated run() of a pending flow re-sends the start: the first message
            # may have been lost with the process that sent it.
            self.app._enqueue_quietly(self.name, flow_id, None, start=True)
        return FlowRun(self.app, flow_id)

    def validate_input(self, input: Any) -> BaseModel:
        """The input as the flow's model; ``InvalidInput`` with pydantic's errors if not."""
        if isinstance(input, self.input_model):
            return input
        if isinstance(input, BaseModel):
            input = input.model_dump()
        try:
            return self.input_model.model_validate(input if input is not None else {})
        except ValidationError as exc:
            raise InvalidInput(
                f"invalid input for flow {self.name!r}: {exc}",
                flow=self.name,
                errors=exc.errors(include_url=False, include_context=False),
            ) from exc

    def signal(
        self, flow_id: str, name: str, payload: Any = None, *, key: str | None = None
    ) -> SignalReceipt:
        """Same as ``signal_flow`` on this flow's app."""
        return self.app.signal_flow(flow_id, name, payload, key=key)

    @property
    def task(self) -> Any:
        """The Celery task behind start and resume (for routing and internal use)."""
        from ._tasks import register_flow_task

        return register_flow_task(self.app.celery, self.app, self.app.lookup(self.name))


def flow(
    name: str, *, input: type[M], queue: str | None = None
) -> Callable[[Handler], FlowHandle[M]]:
    """Define a flow on the default app (configured from ``CRUX_*`` variables)."""
    from ._app import default_app

    return default_app().flow(name, input=input, queue=queue)
