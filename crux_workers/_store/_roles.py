"""The record's seams by role: what an executor, a client, the sweeper and an operator may do.

``CruxStore`` is their union (every backend implements it); ``StepCache`` is the
best-effort cache of checkpoints. Plain data only crosses these seams (``_types``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Literal, Protocol

from ._types import (
    Checkpoint,
    Claimed,
    FlowFilter,
    FlowPage,
    FlowRow,
    Lease,
    MetricsSnapshot,
    NotClaimed,
    RecordOverview,
    RejectedRow,
    SchemaCheck,
    SignalResult,
    StepCommit,
    SuspendOutcome,
    Suspension,
    SweepResult,
    TaskError,
    TaskPoint,
    TaskSend,
    Validator,
    WaitRow,
)


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
        self,
        lease: Lease,
        point: Suspension,
        validate: Validator,
        ttl: float,
        *,
        step: StepCommit | None = None,
    ) -> Checkpoint | SuspendOutcome:
        """Consume the oldest valid pending signal of that name as a checkpoint, or suspend.

        One transaction under the flow's row lock, so a signal committed before it is
        seen, and one committed after it finds the flow suspended and wakes it.
        Without a valid signal: "suspended" (lease released), or "expired" when the
        point's deadline has passed (the flow is finished). ``step`` is committed first
        in the same transaction; if cancellation was asked, the flow is then
        "cancelled".
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
        self,
        lease: Lease,
        status: str,
        *,
        result: str | None = None,
        error: str | None = None,
        step: StepCommit | None = None,
    ) -> str:
        """End the flow with a terminal status if ``lease`` still holds; returns the status.

        ``step`` is committed in the same write. If cancellation was asked meanwhile,
        the flow ends "cancelled" instead, as a separate step commit would have ended
        it, and that is what is returned.
        """
        ...


class ClientStore(Protocol):
    """What a client may do: create, signal, resume, cancel and read flows.

    Also where a child task's outcome is reported. Nothing here takes a lease.
    """

    def create_flow(self, flow_id: str, name: str, input_json: str) -> tuple[FlowRow, bool]:
        """Insert a pending flow, or return the existing row; the bool says if created."""
        ...

    def create_flows(self, items: Sequence[tuple[str, str, str]]) -> list[tuple[FlowRow, bool]]:
        """Insert many pending flows at once: (flow id, name, input JSON) each.

        All or nothing, in one transaction: for each item, in order, its row and whether
        it was created (an id that exists returns its row, as ``create_flow`` does). An
        id repeated in ``items`` (``InvalidInput``) or taken by another flow name
        (``FlowIdConflict``) refuses the whole batch, and nothing is recorded.
        """
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
