"""``FlowHandle`` and ``FlowRun``: starting flows and waiting for them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from ._models import FlowOutcome, FlowState, SignalReceipt
from ._starts import MAX_BATCH
from .errors import FlowIdConflict, InvalidInput

if TYPE_CHECKING:
    from ._client import Client
    from ._registry import FlowDef, Handler

M = TypeVar("M", bound=BaseModel)


class FlowApp(Protocol):
    """What a handle needs of its app: the client, and the Celery task of a flow."""

    @property
    def client(self) -> Client:
        """Start, signal, read and wait on flows."""
        ...

    def flow_task(self, defn: FlowDef) -> Any:
        """The Celery task that starts and resumes ``defn``."""
        ...


class FlowRun:
    """A started flow: its id, its state, and a way to wait for its outcome."""

    def __init__(self, app: FlowApp, flow_id: str) -> None:
        self.app = app
        self.flow_id = flow_id

    def __repr__(self) -> str:
        return f"FlowRun(flow_id={self.flow_id!r})"

    def state(self) -> FlowState:
        """Everything the record holds about this flow now."""
        return self.app.client.get_flow(self.flow_id)

    def outcome(self) -> FlowOutcome | None:
        """The outcome if the flow has finished, else None."""
        return self.app.client.outcome(self.flow_id)

    def wait(self, timeout: float | None = 60.0) -> FlowOutcome:
        """Block until the flow finishes; ``WaitTimeout`` after ``timeout`` seconds.

        A suspended flow is not finished: waiting on one only returns once a signal
        (or an expiry, or a cancellation) ends it.
        """
        return self.app.client.wait(self.flow_id, timeout)

    async def state_async(self) -> FlowState:
        """``state`` for async code (does not block the event loop)."""
        return await self.app.client.get_flow_async(self.flow_id)

    async def outcome_async(self) -> FlowOutcome | None:
        """``outcome`` for async code (does not block the event loop)."""
        return await self.app.client.outcome_async(self.flow_id)

    async def wait_async(self, timeout: float | None = 60.0) -> FlowOutcome:
        """``wait`` for async code: the event loop stays free while the flow runs."""
        return await self.app.client.wait_async(self.flow_id, timeout)


class FlowHandle(Generic[M]):
    """A defined flow: start it, resume it, signal it."""

    def __init__(self, app: FlowApp, defn: FlowDef) -> None:
        self.app = app
        self.defn = defn
        self.name = defn.name
        self.fn: Handler = defn.fn
        self.input_model: type[BaseModel] = defn.input_model
        self.queue = defn.queue

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
            name = self.app.client.resume(resume)
            if name != self.name:
                raise FlowIdConflict(
                    f"flow {resume!r} is a {name!r} flow, not {self.name!r}", flow_id=resume
                )
            return FlowRun(self.app, resume)
        model = self.validate_input(input)
        return FlowRun(self.app, self.app.client.start(self.name, model, flow_id))

    async def run_async(
        self, input: M | dict[str, Any] | None = None, *, flow_id: str | None = None
    ) -> FlowRun:
        """``run`` for async code (a FastAPI handler, an async flow's caller)."""
        model = self.validate_input(input)
        return FlowRun(self.app, await self.app.client.start_async(self.name, model, flow_id))

    def run_many(
        self,
        inputs: Iterable[M | dict[str, Any] | None],
        *,
        flow_ids: Sequence[str] | None = None,
    ) -> list[FlowRun]:
        """Start many runs at once (a bulk producer): one transaction, one connection.

        Every input is validated first: one invalid input raises ``InvalidInput``
        (naming its index) and nothing is recorded, nor is anything when an id repeats.
        ``flow_ids``, if given, has one id per input; an id that exists returns the
        existing run, as ``run`` does. At most 1000 inputs per call.
        """
        models = self._validate_many(inputs)
        ids = self.app.client.start_many(self.name, models, flow_ids)
        return [FlowRun(self.app, flow_id) for flow_id in ids]

    async def run_many_async(
        self,
        inputs: Iterable[M | dict[str, Any] | None],
        *,
        flow_ids: Sequence[str] | None = None,
    ) -> list[FlowRun]:
        """``run_many`` for async code."""
        models = self._validate_many(inputs)
        ids = await self.app.client.start_many_async(self.name, models, flow_ids)
        return [FlowRun(self.app, flow_id) for flow_id in ids]

    def _validate_many(self, inputs: Iterable[Any]) -> list[BaseModel]:
        if isinstance(inputs, BaseModel | dict | str | bytes) or not isinstance(inputs, Iterable):
            raise InvalidInput(
                f"run_many takes a list of inputs for flow {self.name!r}, "
                f"not {type(inputs).__name__}",
                flow=self.name,
            )
        inputs = list(inputs)
        if len(inputs) > MAX_BATCH:
            raise InvalidInput(
                f"run_many takes at most {MAX_BATCH} inputs per call, got {len(inputs)}; "
                "split the batch (nothing was recorded)",
                flow=self.name,
            )
        models = []
        for i, item in enumerate(inputs):
            try:
                models.append(self.validate_input(item))
            except InvalidInput as exc:
                raise InvalidInput(
                    f"input #{i}: {exc.message}; nothing of the batch was recorded",
                    flow=self.name,
                    index=i,
                    errors=getattr(exc, "errors", []),
                ) from exc
        return models

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
        return self.app.client.signal_flow(flow_id, name, payload, key=key)

    async def signal_async(
        self, flow_id: str, name: str, payload: Any = None, *, key: str | None = None
    ) -> SignalReceipt:
        """``signal`` for async code."""
        return await self.app.client.signal_flow_async(flow_id, name, payload, key=key)

    @property
    def task(self) -> Any:
        """The Celery task behind start and resume (for routing and internal use)."""
        return self.app.flow_task(self.defn)
