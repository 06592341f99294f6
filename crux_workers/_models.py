"""Public value types: what ``run``, ``wait``, ``get_flow`` and ``signal_flow`` return."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ._durations import Duration, parse_duration
from ._store import _lifecycle

# The values of ``_lifecycle.FlowStatus`` (a unit test keeps the two equal).
Status = Literal["pending", "running", "suspended", "completed", "failed", "cancelled", "expired"]
TERMINAL: frozenset[str] = frozenset(s.value for s in _lifecycle.TERMINAL)
SignalStatus = Literal["pending", "consumed", "rejected"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ErrorInfo(_Frozen):
    """An error as recorded: its type, message and (when there was one) traceback."""

    type: str
    message: str
    traceback: str | None = None
    step: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class FlowOutcome(_Frozen):
    """How a flow ended."""

    flow_id: str
    status: Status
    result: Any = None
    error: ErrorInfo | None = None
    cancel_reason: str | None = None


class StepState(_Frozen):
    """One recorded checkpoint of a flow: a step's result or a consumed signal."""

    seq: int
    kind: str
    name: str
    occurrence: int
    result: Any
    attempts: int
    started_at: datetime | None
    completed_at: datetime


class SignalState(_Frozen):
    """One signal sent to a flow, with what became of it."""

    id: int
    name: str
    payload: Any
    key: str | None
    status: SignalStatus
    error: str | None
    consumed_seq: int | None
    created_at: datetime
    consumed_at: datetime | None


class ForkOrigin(_Frozen):
    """Where a forked flow came from: the source flow and the checkpoints it copied."""

    flow_id: str
    at: int


class FlowState(_Frozen):
    """Everything the record holds about a flow."""

    flow_id: str
    name: str
    status: Status
    input: Any
    result: Any = None
    error: ErrorInfo | None = None
    cancel_reason: str | None = None
    waiting_on: str | None = None
    deadline: datetime | None = None
    wake_at: datetime | None = None
    wake_kind: str | None = None
    epoch: int
    steps: list[StepState]
    signals: list[SignalState]
    step_errors: list[ErrorInfo] = Field(
        default_factory=list, description="every failed step attempt, oldest first"
    )
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
    waiting_schema: dict[str, Any] | None = Field(
        default=None, description="JSON Schema of the signal it waits for, checked at send"
    )
    forked_from: ForkOrigin | None = None
    retries: int = Field(default=0, description="how many times it was retried after failing")

    @property
    def finished(self) -> bool:
        """True once the flow has reached a terminal status."""
        return self.status in TERMINAL


class SignalReceipt(_Frozen):
    """What ``signal_flow`` recorded: the signal's id, whether it was a duplicate, and
    whether it was delivered to a flow waiting for it (else it is kept until one does)."""

    flow_id: str
    signal_id: int
    name: str
    duplicate: bool = False
    delivered: bool = False


WaitKind = Literal["signal", "sleep", "poll", "task", "retry"]


class WaitGroup(_Frozen):
    """Suspended flows of one name waiting on the same thing (``waiting()``).

    ``on`` is the signal, poll or child task name ("" for a sleep or a retry's
    backoff); ``oldest_since`` is when the longest-waiting one last changed.
    """

    name: str
    kind: WaitKind
    on: str
    count: int
    oldest_since: datetime
    nearest_deadline: datetime | None = None
    next_wake: datetime | None = None


class Retry(_Frozen):
    """A step's retry policy: how many attempts in all, and the backoff between them."""

    attempts: int = Field(default=3, ge=1, le=1000)
    backoff: Literal["exponential", "linear", "fixed"] = "exponential"
    initial: float = 1.0
    max: float = 300.0
    jitter: bool = True

    @field_validator("initial", "max", mode="before")
    @classmethod
    def _duration(cls, value: Duration) -> float:
        return parse_duration(value, what="Retry backoff")

    def delay(self, failed_attempt: int) -> float:
        """Seconds to wait after attempt number ``failed_attempt`` (1-based) failed."""
        if self.backoff == "fixed":
            base = self.initial
        elif self.backoff == "linear":
            base = self.initial * failed_attempt
        else:
            base = self.initial * (2 ** (failed_attempt - 1))
        return min(base, self.max)
