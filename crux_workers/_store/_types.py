"""Plain data that crosses the store seam: no SQLAlchemy or Redis types leak out."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One committed checkpoint; ``result`` is its JSON text."""

    seq: int
    kind: str
    name: str
    occurrence: int
    result: str


@dataclass(frozen=True, slots=True)
class StepCommit:
    """A checkpoint whose durable write rides with the execution's next write.

    Between a step's commit and the next checkpoint call only handler code runs, which
    must be deterministic and free of side effects; so the step's row can be written
    in the same transaction as what comes next (a suspend, the finish), as long as it
    is durable before any later step's function runs (``Execution.before_step``).
    """

    cp: Checkpoint
    started_at: datetime | None
    attempts: int


@dataclass(frozen=True, slots=True)
class Lease:
    """The right to advance one flow, fenced by ``epoch``."""

    flow_id: str
    owner: str
    epoch: int


@dataclass(frozen=True, slots=True)
class Claimed:
    """A successful claim: the lease, and what the executor needs to replay."""

    lease: Lease
    name: str
    input: str
    next_seq: int
    failed_attempts: int = 0
    cancel_requested: bool = False
    # The flow's wake_at and wake_kind the claim cleared: when and why it became due
    # (for the resume latency metric); None when nothing had set one.
    woke_at: datetime | None = None
    woke_by: str | None = None
    runs: int = 0  # claims of this flow so far, this one included
    history_digest: str | None = None
    """The chained digest of the ``next_seq`` checkpoints (``_lifecycle.next_digest``):
    a cached history is used only if it matches; None (an old row) trusts no cache."""
    consumed: Checkpoint | None = None
    """The signal checkpoint the claim itself recorded (Postgres, a wait with no
    schema): the last of the ``next_seq`` checkpoints, not yet in the step cache."""


SuspendOutcome = Literal["suspended", "expired", "cancelled"]

ClaimRefusal = Literal["missing", "finished", "busy", "idle", "parked"]


@dataclass(frozen=True, slots=True)
class NotClaimed:
    """Why a claim failed; ``retry_after`` is set when the lease is held by someone else."""

    reason: ClaimRefusal
    retry_after: float | None = None
    """``parked``: this claim found the flow in a crash loop and finished it ``failed``."""


@dataclass(frozen=True, slots=True)
class StepErrorRow:
    """One failed attempt of a step."""

    seq: int
    attempt: int
    name: str
    error: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class SweepResult:
    """What one sweep did: flows it expired, and flows to publish again."""

    expired: list[str] = field(default_factory=list)
    due: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class StepRow:
    """A checkpoint as ``get_flow`` shows it."""

    seq: int
    kind: str
    name: str
    occurrence: int
    result: str
    attempts: int
    started_at: datetime | None
    completed_at: datetime


@dataclass(frozen=True, slots=True)
class SignalRow:
    """A recorded signal as ``get_flow`` shows it."""

    id: int
    name: str
    payload: str
    key: str | None
    status: str
    error: str | None
    consumed_seq: int | None
    created_at: datetime
    consumed_at: datetime | None


@dataclass(frozen=True, slots=True)
class FlowRow:
    """A flow's row, with its steps and signals when asked for."""

    id: str
    name: str
    status: str
    input: str
    result: str | None
    error: str | None
    cancel_reason: str | None
    waiting_on: str | None
    deadline: datetime | None
    wake_at: datetime | None
    wake_kind: str | None
    epoch: int
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    waiting_schema: str | None = None
    forked_from: str | None = None
    forked_at: int | None = None
    retries: int = 0
    steps: list[StepRow] = field(default_factory=list)
    signals: list[SignalRow] = field(default_factory=list)
    step_errors: list[StepErrorRow] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SignalResult:
    """What recording a signal did: its id, whether it duplicated a key, whether to wake."""

    signal_id: int
    flow_name: str
    duplicate: bool
    wake: bool


@dataclass(frozen=True, slots=True)
class Suspension:
    """What a suspend point asks for: the signal name and its timeout, if any.

    The deadline is set when the point is first reached, and kept when the flow
    comes back to the same point (after a rejected signal or a stray resume).
    """

    seq: int
    name: str
    occurrence: int
    timeout: float | None
    schema: str | None = None
    """The JSON Schema (text) of the payload, recorded with the wait so a sender can check."""


@dataclass(frozen=True, slots=True)
class TaskPoint:
    """A ``run_task`` checkpoint: which attempt, what to call (JSON), how long to trust a send."""

    seq: int
    name: str
    occurrence: int
    attempt: int
    task: str
    call: str
    resend_after: float


@dataclass(frozen=True, slots=True)
class TaskSend:
    """Publish the child now (after the commit): its task id and call (JSON)."""

    task_id: str
    call: str


@dataclass(frozen=True, slots=True)
class TaskError:
    """The child of this attempt failed; ``error`` is the recorded ``ErrorInfo`` JSON."""

    error: str


@dataclass(frozen=True, slots=True)
class RejectedRow:
    """A published signal message the ingress refused, kept with its reason."""

    id: int
    reason: str
    detail: str
    flow_id: str | None
    name: str | None
    key: str | None
    raw: str
    received_at: datetime

    def as_json(self) -> dict[str, object]:
        """The row as JSON-able values (the CLI's and the console's shape)."""
        return {
            "id": self.id,
            "reason": self.reason,
            "detail": self.detail,
            "flow_id": self.flow_id,
            "name": self.name,
            "key": self.key,
            "raw": self.raw,
            "received_at": self.received_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class FlowFilter:
    """Which flows ``list_flows`` returns; ``None`` fields do not filter."""

    status: str | None = None
    name: str | None = None
    waiting_on: str | None = None
    limit: int = 100


@dataclass(frozen=True, slots=True)
class FlowPage:
    """One page of ``page_flows``: a filter, newest first (ties: greater id first).

    ``after`` is the ``(created_at, id)`` of the previous page's last row: the page
    starts strictly after it, so page 1000 costs what page 1 does. ``id_prefix``
    matches flow ids that start with it; ``created_from``/``created_to`` bound the
    creation time (inclusive, exclusive).
    """

    status: str | None = None
    name: str | None = None
    waiting_on: str | None = None
    id_prefix: str | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None
    after: tuple[datetime, str] | None = None
    limit: int = 50


@dataclass(frozen=True, slots=True)
class RecordOverview:
    """What the operator's front page shows of the whole record, read at ``now``.

    ``due`` counts active flows whose wake time has come (the sweeper's backlog),
    ``oldest_due`` is the earliest such wake time, ``last_sweep`` the last sweep
    tick taken (None where the store keeps no sweep times).
    """

    counts: dict[str, int]
    due: int
    oldest_due: datetime | None
    last_sweep: datetime | None
    now: datetime


@dataclass(frozen=True, slots=True)
class WaitRow:
    """Suspended flows of one name that wait on the same thing, counted."""

    name: str
    kind: str
    on: str
    count: int
    oldest_since: datetime
    nearest_deadline: datetime | None
    next_wake: datetime | None


def wait_on(waiting_on: str | None) -> str:
    """What a wait is on, for the operator: the signal, poll or child task name, or ""."""
    if waiting_on is None:
        return ""
    return waiting_on.removeprefix("task:")


def merge_waits(rows: Iterable[WaitRow]) -> list[WaitRow]:
    """One row per (name, kind, on), most flows first (a signal wait with and without
    a deadline come from different wake kinds)."""
    merged: dict[tuple[str, str, str], WaitRow] = {}
    for r in rows:
        key = (r.name, r.kind, r.on)
        had = merged.get(key)
        if had is not None:
            r = WaitRow(
                r.name,
                r.kind,
                r.on,
                had.count + r.count,
                min(had.oldest_since, r.oldest_since),
                _least(had.nearest_deadline, r.nearest_deadline),
                _least(had.next_wake, r.next_wake),
            )
        merged[key] = r
    return sorted(merged.values(), key=lambda w: (-w.count, w.name, w.kind, w.on))


def _least(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else min(a, b)


# Called with the JSON Schema a flow waits with; raises (``InvalidSignal``) to refuse
# the payload, in which case nothing is recorded.
SchemaCheck = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """What the metrics read from the record in one query (``AdminStore.metrics_snapshot``).

    ``flows``: (flow name, status) -> count. ``waits``: (kind, on) -> suspended flows not
    yet due, kind one of signal, sleep, poll, task, retry and ``on`` the signal, poll or
    task name ("" for sleeps and retries). ``due``: flow name -> flows that could be
    claimed now (the runnable backlog); ``oldest_due_at``: since when the longest-waiting
    of them has been due. ``refused``: refused ingress messages kept, by reason.
    """

    taken_at: datetime
    flows: dict[tuple[str, str], int] = field(default_factory=dict)
    waits: dict[tuple[str, str], int] = field(default_factory=dict)
    due: dict[str, int] = field(default_factory=dict)
    oldest_due_at: datetime | None = None
    refused: dict[str, int] = field(default_factory=dict)
    last_sweep_at: datetime | None = None


# Turns a signal payload (JSON text) into the JSON text to checkpoint, or raises
# ValueError with the reason the payload is rejected.
Validator = Callable[[str], str]
