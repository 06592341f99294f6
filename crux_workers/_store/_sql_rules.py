"""The life-cycle rules as SQL: every place the record encodes a rule in a statement.

Each statement or condition names the Python rule of ``_lifecycle.py`` it encodes.
The two Postgres statements exist for speed (one round trip for the step commit
and for a signal); SQLite runs the same rules as transactions in ``_sql_exec.py``
and ``_sql_client.py``. ``tests/integration/test_pg_rules_property.py`` runs these
statements on generated rows and checks them against the Python rules.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import String, and_, case, func, literal, null, or_, text

from ._lifecycle import ACTIVE, FlowStatus, WakeKind
from ._schema import flows

_c = flows.c


def has_work(now: datetime) -> Any:
    """``_lifecycle.has_work``: new or running, or suspended and woken or due."""
    return or_(
        _c.status.in_((FlowStatus.PENDING, FlowStatus.RUNNING)),
        and_(
            _c.status == FlowStatus.SUSPENDED,
            or_(_c.wake_kind == WakeKind.RUN, _c.wake_at <= now),
        ),
    )


def lease_free(now: datetime) -> Any:
    """``_lifecycle.lease_free``: no holder, or the holder's lease ran out."""
    return or_(_c.lease_owner.is_(None), _c.lease_until < now)


def lapses_after_claim() -> Any:
    """``_lifecycle.lapses_after_claim``: one more when the claim takes over a lapsed lease.

    Used in the claim's UPDATE, whose WHERE already requires ``lease_free``: a holder
    still recorded there let the lease run out.
    """
    return case((_c.lease_owner.is_not(None), _c.lapses + 1), else_=_c.lapses)


def _link(text_expr: Any) -> Any:
    return func.encode(func.sha256(func.convert_to(text_expr, "UTF8")), "hex")


def next_digest(seq: int, cp_hex: str) -> Any:
    """``_lifecycle.next_digest`` on the row, given the checkpoint's own digest ``cp_hex``.

    The same as ``NEXT_DIGEST_SQL`` below, as an expression for UPDATE statements built
    with SQLAlchemy (the signal and child-task paths on Postgres).
    """
    if seq == 0:
        return _link(literal(cp_hex, String))
    return case(
        (_c.history_digest.is_(None), null()),
        else_=_link(_c.history_digest.concat(literal(cp_hex, String))),
    )


def sweep_due(now: datetime, redrive_after: float) -> Any:
    """``_lifecycle.is_due``: an active flow whose ``wake_at`` has come.

    ``wake_kind <> 'run'`` is NULL (false) for a NULL kind, as ``is_due`` requires.
    """
    stale = now - timedelta(seconds=redrive_after)
    return and_(
        _c.status.in_(ACTIVE),
        or_(
            and_(_c.wake_kind == WakeKind.RUN, _c.wake_at <= stale),
            and_(_c.wake_kind != WakeKind.RUN, _c.wake_at <= now),
        ),
    )


def sweep_stalled(now: datetime) -> Any:
    """``_lifecycle.is_stalled``: running, lease ran out, nothing set to wake it."""
    return and_(_c.status == FlowStatus.RUNNING, _c.lease_until < now, _c.wake_at.is_(None))


def sweep_expires() -> Any:
    """``_lifecycle.sweep_action`` == "expire": of the swept rows, a signal wait's deadline."""
    return and_(_c.status == FlowStatus.SUSPENDED, _c.wake_kind == WakeKind.EXPIRE)


# Postgres: record a signal in one statement (``PgClient.record_signal``).
# Rules: ``accepts_signal`` (the INSERT's status list), ``signal_wakes`` (the UPDATE's
# condition on f) and, with :gate, ``checks_at_send``: a flow waiting on this name with a
# schema takes the signal only once the caller checked the payload against that very
# schema (:checked); otherwise nothing is inserted and the schema is returned (gated).
# The flow's row lock comes first, so signal ids follow commit order, and a suspend
# either sees the signal or is woken by it. A same-key signal committed while this
# statement waited for the lock is not in its snapshot: the unique key refuses the
# insert, and the caller retries, then finds it.
RECORD_SIGNAL = text(
    """
    WITH f AS (
        SELECT id, name, status, waiting_on, waiting_schema
          FROM crux_flows WHERE id = :flow_id FOR UPDATE
    ), gate AS (
        SELECT f.waiting_schema AS schema FROM f
         WHERE CAST(:gate AS boolean) AND f.status = 'suspended' AND f.waiting_on = :name
           AND f.waiting_schema IS NOT NULL
           AND f.waiting_schema IS DISTINCT FROM CAST(:checked AS text)
    ), dup AS (
        SELECT s.id FROM crux_signals s
         WHERE s.flow_id = :flow_id AND s.key = :key AND EXISTS (SELECT 1 FROM f)
    ), ins AS (
        INSERT INTO crux_signals (flow_id, name, payload, key, status, created_at)
        SELECT f.id, :name, :payload, :key, 'pending', :now FROM f
         WHERE f.status IN ('pending', 'running', 'suspended')
           AND NOT EXISTS (SELECT 1 FROM dup)
           AND NOT EXISTS (SELECT 1 FROM gate)
        RETURNING id
    ), woke AS (
        -- Decided on f, the locked and current row: this statement's snapshot may be
        -- older than a suspend that committed while it waited for the lock.
        UPDATE crux_flows SET wake_at = :now, wake_kind = 'run', updated_at = :now
          FROM f
         WHERE crux_flows.id = f.id AND f.status = 'suspended' AND f.waiting_on = :name
           AND EXISTS (SELECT 1 FROM ins)
        RETURNING crux_flows.id
    )
    SELECT f.name, f.status,
           (SELECT id FROM dup LIMIT 1) AS dup_id,
           (SELECT id FROM ins) AS new_id,
           (SELECT schema FROM gate) AS gated,
           EXISTS (SELECT 1 FROM woke) AS woke
      FROM f
    """
)

# ``_lifecycle.next_digest`` in SQL, given the checkpoint's own digest (``:cp_digest``,
# computed in Python) and the row's ``history_digest``: checkpoint 0 starts the chain
# from '', a row without a digest keeps none.
NEXT_DIGEST_SQL = """
    CASE WHEN :seq = 0 THEN encode(sha256(convert_to(:cp_digest, 'UTF8')), 'hex')
         WHEN history_digest IS NULL THEN NULL
         ELSE encode(sha256(convert_to(history_digest || :cp_digest, 'UTF8')), 'hex')
    END
"""

# Postgres: commit a step in one statement (``PgExecutor.commit_checkpoint``).
# Rule: the lease fence (same epoch and owner, status 'running'); the insert reads the
# touch's output, so it happens only if the epoch still holds. A commit resets the
# failed attempts (``retry_attempt = 0``) and the crash-loop count (``lapses = 0``),
# and chains the checkpoint into ``history_digest`` (NEXT_DIGEST_SQL).
COMMIT_STEP = text(
    """
    WITH touched AS (
        UPDATE crux_flows
           SET lease_until = :lease_until, updated_at = :now,
               next_seq = :next_seq, retry_attempt = 0, lapses = 0,
               history_digest = """
    + NEXT_DIGEST_SQL
    + """
         WHERE id = :flow_id AND epoch = :epoch AND lease_owner = :owner
           AND status = 'running'
        RETURNING cancel_reason, waiting_on, deadline
    ), inserted AS (
        INSERT INTO crux_steps
               (flow_id, seq, kind, name, occurrence, result, attempts, epoch,
                started_at, completed_at)
        SELECT :flow_id, :seq, :kind, :name, :occurrence, :result, :attempts, :epoch,
               :started_at, :now
          FROM touched
        RETURNING seq
    )
    SELECT (SELECT count(*) FROM inserted) AS touched,
           (SELECT cancel_reason FROM touched) AS cancel_reason,
           (SELECT waiting_on FROM touched) AS waiting_on,
           (SELECT deadline FROM touched) AS deadline
    """
)

# What an executor's claim commits without waiting for its WAL flush (Postgres,
# ``SET LOCAL synchronous_commit = off`` for that one transaction). Losing a claim in a
# Postgres crash loses nothing anyone relies on: no side effect depends on it being
# durable, the next durable commit of the same server flushes it (the WAL is one
# sequence), and a claim that is lost is taken again (the flow is as it was before
# it). What it must not do is hand the same lease out twice: the fence
# (``_lifecycle.holds_lease``) includes the owner, and every claim has a fresh one.
ASYNC_COMMIT = "set_config('synchronous_commit', 'off', true)"

# Postgres: the claim in one statement (``PgExecutor._claim_and_wake``).
# Rules: ``has_work`` and ``lease_free`` (the WHERE), ``lapses_after_claim`` (lapses);
# the row as it was (``was``: the wake the claim clears, for the resume latency).
# It also consumes the signal that woke a flow suspended in a wait with no schema (a
# payload that is JSON needs no check in Python: the checkpoint's result is the
# payload): the oldest pending signal of that name becomes the checkpoint at
# ``next_seq``, as ``take_signal_or_suspend`` would record it (``cp_digest`` and
# ``next_digest`` in SQL; the occurrence is the count of the flow's checkpoints of that
# name, the replay's counter). ``was`` is read in the statement's snapshot: the UPDATE
# requires the row's ``next_seq`` and status to be unchanged since (a claim that waited
# on the row lock and finds them moved takes nothing; the caller claims again).
# A flow with a cancel request is claimed without consuming: it ends ``cancelled``.
CLAIM = text(
    """
    WITH was AS (
        SELECT id, status, next_seq, wake_at, wake_kind, waiting_on, waiting_schema,
               cancel_reason
          FROM crux_flows WHERE id = :flow_id
    ), sig AS (
        SELECT s.id, s.payload, was.next_seq AS seq, was.waiting_on AS name,
               (SELECT count(*) FROM crux_steps st
                 WHERE st.flow_id = :flow_id AND st.name = was.waiting_on) AS occurrence
          FROM was JOIN crux_signals s ON s.flow_id = :flow_id AND s.name = was.waiting_on
         WHERE was.status = 'suspended' AND was.waiting_schema IS NULL
           AND was.cancel_reason IS NULL AND s.status = 'pending'
         ORDER BY s.id LIMIT 1
    ), cp AS (
        SELECT sig.*,
               encode(sha256(convert_to(
                   sig.seq || E'\\n' || 'suspend' || E'\\n' || sig.occurrence || E'\\n'
                   || length(sig.name) || E'\\n' || sig.name || E'\\n' || sig.payload,
                   'UTF8')), 'hex') AS digest
          FROM sig
    ), async AS (
        SELECT """
    + ASYNC_COMMIT
    + """ AS off
    ), claimed AS (
        UPDATE crux_flows f
           SET status = 'running', lease_owner = :owner, lease_until = :lease_until,
               epoch = f.epoch + 1, runs = f.runs + 1,
               lapses = CASE WHEN f.lease_owner IS NOT NULL THEN f.lapses + 1
                             ELSE f.lapses END,
               wake_at = NULL, wake_kind = NULL, updated_at = :now,
               next_seq = f.next_seq + CASE WHEN cp.id IS NULL THEN 0 ELSE 1 END,
               waiting_on = CASE WHEN cp.id IS NULL THEN f.waiting_on END,
               deadline = CASE WHEN cp.id IS NULL THEN f.deadline END,
               history_digest = CASE
                   WHEN cp.id IS NULL THEN f.history_digest
                   WHEN f.next_seq = 0 THEN encode(sha256(convert_to(cp.digest, 'UTF8')), 'hex')
                   WHEN f.history_digest IS NULL THEN NULL
                   ELSE encode(sha256(convert_to(f.history_digest || cp.digest, 'UTF8')), 'hex')
               END
          FROM was CROSS JOIN async LEFT JOIN cp ON true
         WHERE f.id = was.id AND f.next_seq = was.next_seq AND f.status = was.status
           AND async.off IS NOT NULL
           AND (f.status IN ('pending', 'running')
                OR (f.status = 'suspended' AND (f.wake_kind = 'run' OR f.wake_at <= :now)))
           AND (f.lease_owner IS NULL OR f.lease_until < :now)
        RETURNING f.epoch, f.name, f.input, f.next_seq, f.retry_attempt, f.cancel_reason,
                  f.runs, f.lapses, f.history_digest,
                  was.wake_at AS woke_at, was.wake_kind AS woke_by,
                  cp.id AS sig_id, cp.seq AS cp_seq, cp.name AS cp_name,
                  cp.occurrence AS cp_occurrence, cp.payload AS cp_result
    ), took AS (
        UPDATE crux_signals s
           SET status = 'consumed', consumed_seq = claimed.cp_seq, consumed_at = :now
          FROM claimed
         WHERE s.flow_id = :flow_id AND s.id = claimed.sig_id
        RETURNING s.id
    ), recorded AS (
        INSERT INTO crux_steps
               (flow_id, seq, kind, name, occurrence, result, attempts, epoch,
                started_at, completed_at)
        SELECT :flow_id, cp_seq, 'suspend', cp_name, cp_occurrence, cp_result, 1, epoch,
               NULL, :now
          FROM claimed WHERE sig_id IS NOT NULL
        RETURNING seq
    )
    SELECT * FROM claimed
    """
)

# Postgres: the last step's checkpoint and the end of the flow in one statement
# (``PgExecutor.finish`` with a step). Rules: the lease fence; a cancel request seen at
# the step's write ends the flow ``cancelled`` (as ``COMMIT_STEP`` followed by the end
# would); the digest chain (NEXT_DIGEST_SQL); what a finished flow no longer has.
FINISH_STEP = text(
    """
    WITH done AS (
        UPDATE crux_flows
           SET status = CASE WHEN cancel_reason IS NULL THEN CAST(:status AS text)
                             ELSE 'cancelled' END,
               result = CASE WHEN cancel_reason IS NULL THEN CAST(:result AS text)
                             ELSE result END,
               error = CASE WHEN cancel_reason IS NULL THEN CAST(:error AS text)
                            ELSE error END,
               finished_at = :now, updated_at = :now,
               next_seq = :next_seq, retry_attempt = 0, lapses = 0,
               lease_owner = NULL, lease_until = NULL, wake_at = NULL, wake_kind = NULL,
               waiting_on = NULL, deadline = NULL, waiting_schema = NULL,
               history_digest = """
    + NEXT_DIGEST_SQL
    + """
         WHERE id = :flow_id AND epoch = :epoch AND lease_owner = :owner
           AND status = 'running'
        RETURNING status
    ), inserted AS (
        INSERT INTO crux_steps
               (flow_id, seq, kind, name, occurrence, result, attempts, epoch,
                started_at, completed_at)
        SELECT :flow_id, :seq, :kind, :name, :occurrence, :step_result, :attempts, :epoch,
               :started_at, :now
          FROM done
        RETURNING seq
    )
    SELECT (SELECT status FROM done) AS status, (SELECT count(*) FROM inserted) AS written
    """
)
