"""Plain data that crosses the store seam: no SQLAlchemy or Redis types leak out."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One committed checkpoint; ``result`` is its JSON text."""

    seq: int
    kind: str
    name: str
    occurrence: int
    result: str


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


class ExecutorStore(Protocol):
    """What an executor may do: claim a flow, then write it fenced by its lease epoch.

    Every write raises ``LeaseLost`` (or reports False) once another claim bumped the
    epoch; ``now`` is the record's clock, so timers agree across workers.
    """

    def claim(
        self, flow_id: str, owner: str, ttl: float, *, max_lapses: int | None = None
    ) -> Claimed | NotClaimed:
        """Take the lease if it is free and the flow has something to do.

        Taking over a lease that ran out counts a lapse; the claim that would take the
        ``max_lapses``-th in a row finishes the flow ``failed`` instead (``parked``).
        """
        ...

    def renew(self, lease: Lease, ttl: float) -> bool:
        """Extend the lease; False when it was lost."""
        ...

    def release(self, lease: Lease) -> None:
        """Give the lease up without changing the flow (best effort)."""
        ...

    def load_checkpoints(self, flow_id: str) -> list[Checkpoint]:
        """All committed checkpoints of the flow, in sequence order."""
        ...

    def now(self) -> datetime:
        """The record's notion of the current time (UTC)."""
        ...

    def commit_checkpoint(
        self, lease: Lease, cp: Checkpoint, *, started_at: datetime, attempts: int, ttl: float
    ) -> bool:
        """Commit a checkpoint if ``lease`` still holds; raise ``LeaseLost`` otherwise.

        Returns True when a cancellation was requested: the checkpoint is committed and
        the flow is now ``cancelled``.
        """
        ...

    def fail_step(
        self,
        lease: Lease,
        seq: int,
        name: str,
        attempt: int,
        error: str,
        retry_in: float | None,
    ) -> SuspendOutcome | Literal["failed"]:
        """Record a failed attempt; back off until ``retry_in`` seconds, or fail the flow."""
        ...

    def suspend_until(self, lease: Lease, wake_at: datetime, kind: str) -> SuspendOutcome:
        """Suspend without waiting for a signal, until ``wake_at`` (a sleep)."""
        ...

    def poll_later(self, lease: Lease, point: Suspension, every: float) -> SuspendOutcome:
        """A ``wait_until`` check came back false: look again in ``every`` seconds.

        The deadline works as for signals; past it the flow is ``expired``.
        """
        ...

    def take_signal_or_suspend(
        self, lease: Lease, point: Suspension, validate: Validator, ttl: float
    ) -> Checkpoint | SuspendOutcome:
        """Consume the oldest valid pending signal of that name as a checkpoint, or suspend.

        One transaction under the flow's row lock, so a signal committed before it is
        seen, and one committed after it finds the flow suspended and wakes it.
        Without a valid signal: "suspended" (lease released), or "expired" when the
        point's deadline has passed (the flow is finished).
        """
        ...

    def take_task_or_send(
        self, lease: Lease, point: TaskPoint, ttl: float
    ) -> Checkpoint | TaskSend | TaskError | SuspendOutcome:
        """The child task's outcome as a checkpoint, or what to do about it.

        In one fenced transaction: a succeeded child becomes the step's checkpoint; a
        failed one (of this attempt) is returned as ``TaskError``; a new attempt, or a
        send older than ``resend_after``, gives ``TaskSend`` (the flow suspends, and the
        caller publishes after the commit); a child still running gives "suspended".
        """
        ...

    def finish(
        self, lease: Lease, status: str, *, result: str | None = None, error: str | None = None
    ) -> None:
        """End the flow with a terminal status if ``lease`` still holds."""
        ...


class ClientStore(Protocol):
    """What a client may do: create, signal, resume, cancel and read flows.

    Also where a child task's outcome is reported. Nothing here takes a lease.
    """

    def create_flow(self, flow_id: str, name: str, input_json: str) -> tuple[FlowRow, bool]:
        """Insert a pending flow, or return the existing row; the bool says if created."""
        ...

    def record_signal(
        self,
        flow_id: str,
        name: str,
        payload: str,
        key: str | None,
        *,
        check: SchemaCheck | None = None,
    ) -> SignalResult:
        """Durably record a signal; raise ``FlowNotFound`` or ``FlowNotWaiting``.

        With ``check``, a flow suspended on ``name`` with a recorded schema has the
        payload checked first (``_lifecycle.checks_at_send``), under the flow's lock:
        if ``check`` raises, nothing is recorded.
        """
        ...

    def retry_flow(self, flow_id: str) -> str:
        """Make a failed flow due again from its last checkpoint; return its flow name.

        The failed step gets a fresh attempt count; checkpoints, signals and the
        failed attempts' history stay. ``FlowNotFound``; ``FlowNotRetryable`` when the
        flow is not failed.
        """
        ...

    def fork_flow(self, source_id: str, new_id: str, at: int, input_json: str | None) -> FlowRow:
        """A new pending flow with the first ``at`` checkpoints of ``source_id``, due now.

        Same flow name; the source's input unless ``input_json``. ``FlowNotFound``;
        ``InvalidInput`` when ``at`` is past the source's checkpoints; ``FlowIdConflict``
        when ``new_id`` exists.
        """
        ...

    def request_resume(self, flow_id: str) -> str:
        """Mark a suspended flow as due now; return its flow name."""
        ...

    def cancel(self, flow_id: str, reason: str) -> str:
        """Cancel at once ("cancelled") or at the running executor's next step ("cancelling")."""
        ...

    def get_flow(self, flow_id: str, *, details: bool = True) -> FlowRow:
        """The flow's row, with steps and signals when ``details``; ``FlowNotFound`` if none."""
        ...

    def complete_task(
        self, task_id: str, *, result: str | None, error: str | None
    ) -> tuple[str, str] | None:
        """Record a child's outcome once; the (flow name, flow id) to wake, if any."""
        ...


class SweeperStore(Protocol):
    """What the sweeper does: take a tick, then expire and redrive due flows."""

    def claim_tick(self, tick: int) -> bool:
        """True for the first sweep of a tick; False when another beat's sweep took it."""
        ...

    def sweep(self, *, limit: int, redrive_after: float) -> SweepResult:
        """Expire overdue suspends; mark due and stalled flows and return them to publish."""
        ...


class AdminStore(Protocol):
    """What the operator (the CLI, the ingress) reads, keeps and deletes."""

    def list_flows(self, where: FlowFilter) -> list[FlowRow]:
        """Flows matching ``where``, newest first, without steps or signals."""
        ...

    def page_flows(self, page: FlowPage) -> list[FlowRow]:
        """One page of flows matching ``page``, newest first, without steps or signals."""
        ...

    def overview(self) -> RecordOverview:
        """Flow counts by status, the due backlog and the last sweep, in one read."""
        ...

    def purge_finished(self, before: datetime) -> int:
        """Delete finished flows (with all their rows) that ended before ``before``.

        Refused ingress messages received before ``before`` go too; the count is of flows.
        """
        ...

    def waiting(self, name: str | None = None) -> list[WaitRow]:
        """Suspended flows (of ``name``) grouped by what they wait on; woken ones excluded."""
        ...

    def purge_rejected(self, before: datetime) -> int:
        """Delete refused ingress messages received before ``before``; how many."""
        ...

    def record_rejected(
        self,
        reason: str,
        detail: str,
        raw: str,
        *,
        flow_id: str | None = None,
        name: str | None = None,
        key: str | None = None,
    ) -> int:
        """Keep a refused ingress message with its reason; returns its id."""
        ...

    def list_rejected(self, limit: int = 100) -> list[RejectedRow]:
        """The most recently refused ingress messages, newest first."""
        ...

    def metrics_snapshot(self) -> MetricsSnapshot:
        """Counts for the metrics gauges, read in one query (see ``MetricsSnapshot``)."""
        ...


class CruxStore(ExecutorStore, ClientStore, SweeperStore, AdminStore, Protocol):
    """The durable record: the union of the four roles above.

    Every write an executor makes is fenced by its lease epoch. Code that plays one
    role (the engine, a client, the sweeper, the CLI) can ask for that role's protocol.
    """

    def close(self) -> None:
        """Release connections."""
        ...


class StepCache(Protocol):
    """A best-effort cache of checkpoints. It may lose anything at any time."""

    def load(self, flow_id: str) -> dict[int, Checkpoint]:
        """Every cached checkpoint of the flow, in one round trip."""
        ...

    def fill(self, flow_id: str, cps: list[Checkpoint]) -> None:
        """Cache many checkpoints (after a miss, or an execution's new ones) in one trip."""
        ...

    def drop(self, flow_id: str) -> None:
        """Forget a finished flow."""
        ...
