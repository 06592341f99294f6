"""The flow life cycle, written down once: its states and the rules over them.

Every backend calls these functions (the memory store directly, the SQL store on the
rows it read under the flow's lock). Where Postgres inlines a rule in one statement
for speed, that statement lives in ``_sql_rules.py`` next to a pointer to the rule
here, and ``tests/integration/test_pg_rules_property.py`` checks that both agree.

This module imports nothing but the standard library: no SQLAlchemy, no Redis.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import secrets
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Literal, Protocol


class FlowStatus(enum.StrEnum):
    """Where a flow is in its life; stored as the plain string value."""

    PENDING = "pending"
    """Created, never claimed yet; due at once."""
    RUNNING = "running"
    """An executor holds (or held, until its lease ran out) the lease."""
    SUSPENDED = "suspended"
    """Waiting for a signal, a timer, a poll, a retry's backoff or a child task."""
    COMPLETED = "completed"
    """Finished: the handler returned; ``result`` holds its JSON."""
    FAILED = "failed"
    """Finished: a step ran out of attempts, or the handler raised."""
    CANCELLED = "cancelled"
    """Finished: a cancel was asked and took effect."""
    EXPIRED = "expired"
    """Finished: a suspend point's deadline passed without what it waited for."""


class WakeKind(enum.StrEnum):
    """Why a suspended flow has a ``wake_at``: what the time means when it comes."""

    RUN = "run"
    """Due now (a signal, a resume, a child's outcome, a released lease); the sweeper
    publishes it again only once ``redrive_after`` has passed without a claim."""
    EXPIRE = "expire"
    """The deadline of a signal wait: at ``wake_at`` the sweep expires the flow."""
    RETRY = "retry"
    """A failed step's backoff: at ``wake_at`` the step is tried again."""
    SLEEP = "sleep"
    """``ctx.sleep``: at ``wake_at`` the flow goes on."""
    POLL = "poll"
    """``wait_until``: at ``wake_at`` the condition is checked again."""
    TASK = "task"
    """A child task is running: at ``wake_at`` its send is trusted no longer (resend);
    its outcome wakes the flow earlier."""


class CheckpointKind(enum.StrEnum):
    """What a committed checkpoint records."""

    STEP = "step"
    """A step's result."""
    SUSPEND = "suspend"
    """A consumed signal's (validated) payload."""
    SLEEP = "sleep"
    """The instant a sleep ends, fixed when it was first reached."""
    WAIT = "wait"
    """The value a ``wait_until`` condition came back with."""
    TASK = "task"
    """A child task's result."""


class SignalStatus(enum.StrEnum):
    """What became of a recorded signal."""

    PENDING = "pending"
    """Recorded, waiting for a suspend point of its name."""
    CONSUMED = "consumed"
    """Its payload passed validation and became a checkpoint (``consumed_seq``)."""
    REJECTED = "rejected"
    """Its payload failed validation; ``error`` says why, and the flow kept waiting."""


class TaskStatus(enum.StrEnum):
    """Where a ``run_task`` child is, as its row in the record says."""

    PENDING = "pending"
    """Sent (maybe more than once); no outcome recorded yet."""
    SUCCEEDED = "succeeded"
    """Its result is recorded; the flow turns it into a checkpoint."""
    FAILED = "failed"
    """Its error is recorded; the flow's retry policy decides on a new attempt."""


TERMINAL: frozenset[FlowStatus] = frozenset(
    {FlowStatus.COMPLETED, FlowStatus.FAILED, FlowStatus.CANCELLED, FlowStatus.EXPIRED}
)
"""Statuses a flow never leaves."""

ACTIVE: tuple[FlowStatus, ...] = (FlowStatus.PENDING, FlowStatus.RUNNING, FlowStatus.SUSPENDED)
"""Statuses of a flow that can still advance, accept signals and be cancelled."""

SweepAction = Literal["expire", "publish"]


def is_terminal(status: str) -> bool:
    """True once the flow has finished."""
    return status in TERMINAL


def holds_lease(
    status: str, epoch: int, lease_epoch: int, owner: str | None, lease_owner: str
) -> bool:
    """The fence: a lease may write while its epoch and owner are current and the flow runs.

    The owner is part of it because a claim commits without waiting for its WAL flush
    (``_sql_rules.ASYNC_COMMIT``): if Postgres crashes before anything flushed it, the
    claim is gone, and the next claim hands out the same epoch again, to another owner.
    """
    return status == FlowStatus.RUNNING and epoch == lease_epoch and owner == lease_owner


def lease_free(owner: str | None, lease_until: datetime | None, now: datetime) -> bool:
    """Nobody holds the lease, or its holder let it run out."""
    return owner is None or (lease_until is not None and lease_until < now)


def lease_busy(owner: str | None, lease_until: datetime | None, now: datetime) -> bool:
    """Someone holds a lease that has not run out (why a claim says "busy")."""
    return owner is not None and lease_until is not None and lease_until >= now


def has_work(status: str, wake_kind: str | None, wake_at: datetime | None, now: datetime) -> bool:
    """A claim may run the flow: new or running, or suspended and woken or due."""
    if status in (FlowStatus.PENDING, FlowStatus.RUNNING):
        return True
    return status == FlowStatus.SUSPENDED and (
        wake_kind == WakeKind.RUN or (wake_at is not None and wake_at <= now)
    )


def claimable(
    status: str,
    wake_kind: str | None,
    wake_at: datetime | None,
    owner: str | None,
    lease_until: datetime | None,
    now: datetime,
) -> bool:
    """A claim takes the lease: the flow has work and the lease is free."""
    return has_work(status, wake_kind, wake_at, now) and lease_free(owner, lease_until, now)


def is_due(
    status: str,
    wake_kind: str | None,
    wake_at: datetime | None,
    now: datetime,
    redrive_after: float,
) -> bool:
    """The sweep acts on an active flow whose ``wake_at`` has come.

    A flow already marked ``run`` was published when it was marked; the sweep only
    publishes it again once ``redrive_after`` has passed without a claim.
    """
    if status not in ACTIVE or wake_at is None or wake_kind is None:
        return False
    if wake_kind == WakeKind.RUN:
        return wake_at <= now - timedelta(seconds=redrive_after)
    return wake_at <= now


def is_stalled(
    status: str, lease_until: datetime | None, wake_at: datetime | None, now: datetime
) -> bool:
    """A running flow whose executor died: its lease ran out and nothing wakes it."""
    return (
        status == FlowStatus.RUNNING
        and lease_until is not None
        and lease_until < now
        and wake_at is None
    )


def sweep_action(
    status: str,
    wake_kind: str | None,
    wake_at: datetime | None,
    lease_until: datetime | None,
    now: datetime,
    redrive_after: float,
) -> SweepAction | None:
    """What one sweep does to a flow: expire it, publish it again (marked ``run``), or nothing."""
    due = is_due(status, wake_kind, wake_at, now, redrive_after)
    if not due and not is_stalled(status, lease_until, wake_at, now):
        return None
    if status == FlowStatus.SUSPENDED and wake_kind == WakeKind.EXPIRE:
        return "expire"
    return "publish"


def accepts_signal(status: str) -> bool:
    """A signal is recorded for any flow that has not finished (it waits for its suspend)."""
    return status in ACTIVE


def signal_wakes(status: str, waiting_on: str | None, name: str) -> bool:
    """A recorded signal wakes the flow when it is suspended waiting for that name."""
    return status == FlowStatus.SUSPENDED and waiting_on == name


def checks_at_send(status: str, waiting_on: str | None, schema: str | None, name: str) -> bool:
    """A signal is validated when sent: the flow waits for that name with a recorded schema.

    The same condition as ``signal_wakes``, plus a schema to check against; a signal to
    a flow not waiting on that name is kept and validated when a suspend consumes it.
    """
    return schema is not None and signal_wakes(status, waiting_on, name)


def retryable(status: str) -> bool:
    """``retry_flow`` takes a failed flow back to its last checkpoint."""
    return status == FlowStatus.FAILED


def fork_point_ok(at: int, recorded: int) -> bool:
    """A fork copies the first ``at`` of the ``recorded`` checkpoints: 0 to all of them."""
    return 0 <= at <= recorded


def error_number(attempt: int, recorded: int | None) -> int:
    """The number a failed attempt is kept under in the step's error history.

    Its attempt number, unless the history already counts that far: after a
    ``retry_flow`` the attempts restart at 1, and the history goes on from its last.
    """
    return attempt if recorded is None or recorded < attempt else recorded + 1


def wait_kind(wake_kind: str | None) -> str:
    """What a suspended flow waits on, for the operator: a signal, or its wake kind.

    A signal wait has no wake (no deadline) or an ``expire`` one.
    """
    if wake_kind is None or wake_kind == WakeKind.EXPIRE:
        return "signal"
    return str(wake_kind)


def child_outcome_wakes(status: str, wake_kind: str | None) -> bool:
    """A child task's outcome wakes the flow when it is suspended waiting for a child."""
    return status == FlowStatus.SUSPENDED and wake_kind == WakeKind.TASK


def resume_wakes(status: str) -> bool:
    """``request_resume`` marks the flow due only when it is suspended."""
    return status == FlowStatus.SUSPENDED


def cancels_at_next_step(
    status: str, owner: str | None, lease_until: datetime | None, now: datetime
) -> bool:
    """A cancel waits for the executor's next step while a live lease runs the flow."""
    return status == FlowStatus.RUNNING and lease_busy(owner, lease_until, now)


def deadline(
    point_name: str,
    timeout: float | None,
    waiting_on: str | None,
    current: datetime | None,
    now: datetime,
) -> datetime | None:
    """Keep the deadline set when this point was first reached; else start one now.

    A flow that comes back to the same point (a rejected signal, a stray resume, a
    poll) keeps the deadline it had; a new point starts its own from ``now``.
    """
    if waiting_on == point_name and current is not None:
        return current
    return None if timeout is None else now + timedelta(seconds=timeout)


def expired(deadline_at: datetime | None, now: datetime) -> bool:
    """The suspend point's deadline has passed: the flow ends ``expired``."""
    return deadline_at is not None and deadline_at <= now


def signal_wait(
    deadline_at: datetime | None,
) -> tuple[datetime | None, WakeKind | None]:
    """``(wake_at, wake_kind)`` of a flow suspended for a signal: its deadline, if any."""
    return deadline_at, (WakeKind.EXPIRE if deadline_at is not None else None)


def poll_wake(check_at: datetime, deadline_at: datetime | None) -> datetime:
    """A poll looks again at ``check_at``, never later than the point's deadline."""
    return check_at if deadline_at is None else min(check_at, deadline_at)


def task_id_for(flow_id: str, seq: int, attempt: int, token: str | None = None) -> str:
    """The child's Celery task id: made once per attempt and kept across its resends.

    Its last part is an unguessable secret (``token``, 32 hex digits, fresh unless
    given): the id is recorded with the task, and an outcome counts only under the
    exact id that was sent, so nobody who merely knows the flow id can forge one.
    """
    return f"crux:{flow_id}:{seq}:{attempt}:{token or secrets.token_hex(16)}"


def flow_of_task_id(task_id: str) -> str | None:
    """The flow id a child task id names (for logs only; never trusted), or None.

    Takes ``crux:<flow>:<seq>:<attempt>:<secret>`` and the older, secret-less
    ``crux:<flow>:<seq>:<attempt>`` (all a forger can make).
    """
    parts = task_id.split(":")
    if parts[0] != "crux":
        return None
    last = parts[-1]
    drop = 3 if len(last) == 32 and all(ch in "0123456789abcdef" for ch in last) else 2
    if len(parts) < drop + 2 or not all(p.isdigit() for p in parts[-drop:][:2]):
        return None
    return ":".join(parts[1:-drop]) or None


def loggable_task_id(task_id: str) -> str:
    """A child task id for logs: without its secret part."""
    head, _, last = task_id.rpartition(":")
    return f"{head}:…" if head and len(last) == 32 else task_id


def refuse_outcome(task_id: str) -> None:
    """Log a child outcome that names no task ever sent (forged, or of a stale attempt).

    The id's secret part is never logged; the flow id it names is, untrusted.
    """
    logging.getLogger("crux_workers").warning(
        "refused a child task outcome for flow %.200r: its task id matches no child this "
        "flow sent (forged, or of an earlier attempt); nothing changed",
        flow_of_task_id(task_id),
    )


def sends_new_attempt(row_status: str, row_attempt: int, attempt: int) -> bool:
    """The child of an earlier attempt failed: this attempt sends a child of its own.

    (With no child recorded at the checkpoint yet, the first one is sent, too.)
    """
    return row_status == TaskStatus.FAILED and row_attempt < attempt


def task_outcome(error: str | None) -> TaskStatus:
    """A child's recorded status: failed when it reported an error."""
    return TaskStatus.FAILED if error is not None else TaskStatus.SUCCEEDED


def task_send_stale(sent_at: datetime, resend_after: float, now: datetime) -> bool:
    """A running child's last send is trusted no longer: publish it again."""
    return sent_at + timedelta(seconds=resend_after) <= now


# -- crash loops ---------------------------------------------------------------------


def claim_takes_lapse(owner: str | None) -> bool:
    """A claim (of a claimable flow) that takes over a lease its holder let run out.

    The previous execution died or stalled without suspending, finishing or releasing:
    one lapse more. Any progress (a checkpoint, a suspend, a finish) resets the count.
    """
    return owner is not None


def lapses_after_claim(owner: str | None, lapses: int) -> int:
    """The flow's consecutive lapses once this claim took the lease."""
    return lapses + 1 if claim_takes_lapse(owner) else lapses


def parks(lapses: int, max_lapses: int | None) -> bool:
    """The claim took the ``max_lapses``-th lapse in a row: park the flow ``failed``."""
    return max_lapses is not None and lapses >= max_lapses


def crash_loop_error(lapses: int) -> str:
    """The recorded error (``ErrorInfo`` JSON) of a flow parked after a crash loop."""
    return json.dumps(
        {
            "type": "crux_workers.errors.CrashLoop",
            "message": (
                f"parked after {lapses} executions died without progress "
                "(each lost its lease before a checkpoint, a suspend or a finish); "
                "see CRUX_MAX_LAPSES"
            ),
            "traceback": None,
            "step": None,
            "details": {"lapses": lapses},
        }
    )


# -- the checkpoint chain (what the step cache is checked against) ------------------------

EMPTY_HISTORY = ""
"""The chained digest of a flow with no checkpoint yet."""


class CheckpointLike(Protocol):
    """What the chain reads of a checkpoint (``_types.Checkpoint`` has it)."""

    @property
    def seq(self) -> int: ...
    @property
    def kind(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def occurrence(self) -> int: ...
    @property
    def result(self) -> str: ...


def cp_digest(seq: int, kind: str, name: str, occurrence: int, result: str) -> str:
    """SHA-256 (hex) of a checkpoint's canonical encoding.

    ``seq``, ``kind``, ``occurrence``, the length of ``name`` and ``name`` on lines of
    their own, then ``result`` to the end, in UTF-8: unambiguous (a kind has no newline,
    the name is length-prefixed, the result comes last) and cheap to compute.
    """
    encoded = f"{seq}\n{kind}\n{occurrence}\n{len(name)}\n{name}\n{result}"
    return hashlib.sha256(encoded.encode("utf-8", "surrogatepass")).hexdigest()


def chain_link(previous: str, cp_hex: str) -> str:
    """One link of the chain: ``sha256_hex(previous + cp_digest)``."""
    return hashlib.sha256((previous + cp_hex).encode("ascii")).hexdigest()


def next_digest(
    previous: str | None, seq: int, kind: str, name: str, occurrence: int, result: str
) -> str | None:
    """The flow's chained digest after committing checkpoint ``seq``.

    Checkpoint 0 starts the chain; a flow whose row has no digest (recorded before the
    digest existed) keeps none, and its cache is never trusted.
    """
    base = EMPTY_HISTORY if seq == 0 else previous
    if base is None:
        return None
    return chain_link(base, cp_digest(seq, kind, name, occurrence, result))


def history_digest(cps: Iterable[CheckpointLike]) -> str:
    """The chained digest of a whole history (checkpoints 0, 1, ... in order).

    The fold of ``next_digest`` from checkpoint 0, written as one loop: a replay checks
    every cached checkpoint against the record's digest, 1000 of them for a flow with
    1000 steps behind it.
    """
    sha = hashlib.sha256
    digest = EMPTY_HISTORY
    for cp in cps:
        name = cp.name
        encoded = f"{cp.seq}\n{cp.kind}\n{cp.occurrence}\n{len(name)}\n{name}\n{cp.result}"
        cp_hex = sha(encoded.encode("utf-8", "surrogatepass")).hexdigest()
        digest = sha((digest + cp_hex).encode("ascii")).hexdigest()
    return digest
