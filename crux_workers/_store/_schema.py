"""The durable record's tables, as SQLAlchemy Core metadata (the migrations match it)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

# SQLite only autoincrements INTEGER PRIMARY KEY columns.
_BigId = BigInteger().with_variant(Integer(), "sqlite")

flows = Table(
    "crux_flows",
    metadata,
    Column("id", String(200), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("status", String(16), nullable=False),
    Column("input", Text, nullable=False),
    Column("result", Text),
    Column("error", Text),
    Column("cancel_reason", Text),
    Column("waiting_on", String(200)),
    Column("deadline", DateTime(timezone=True)),
    # The outbox marker: when the sweeper must act on this flow, and why.
    Column("wake_at", DateTime(timezone=True)),
    Column("wake_kind", String(16)),
    Column("lease_owner", String(200)),
    Column("lease_until", DateTime(timezone=True)),
    Column("epoch", BigInteger, nullable=False, server_default="0"),
    Column("next_seq", Integer, nullable=False, server_default="0"),
    Column("runs", Integer, nullable=False, server_default="0"),
    # Failed attempts of the step at next_seq (reset when a checkpoint commits).
    Column("retry_attempt", Integer, nullable=False, server_default="0"),
    # Claims in a row that took over a lease its holder let run out (reset by progress).
    Column("lapses", Integer, nullable=False, server_default="0"),
    # The chained SHA-256 of the checkpoints (``_lifecycle.next_digest``): what a cached
    # history must match. NULL on a flow with checkpoints recorded before it existed.
    Column("history_digest", String(64)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    # The JSON Schema of the signal a suspended flow waits for (checked at send).
    Column("waiting_schema", Text),
    # Where a fork came from: the source flow and how many checkpoints it copied.
    Column("forked_from", String(200)),
    Column("forked_at", Integer),
    # How many times an operator retried the flow after it failed.
    Column("retries", Integer, nullable=False, server_default="0"),
    Index("ix_crux_flows_name_status", "name", "status"),
    Index("ix_crux_flows_status", "status"),
    Index("ix_crux_flows_wake_at", "wake_at"),
    Index("ix_crux_flows_status_lease", "status", "lease_until"),
    # The console's keyset pages, newest first (migration 0006).
    Index("ix_crux_flows_created", "created_at", "id"),
    Index("ix_crux_flows_status_created", "status", "created_at", "id"),
)

steps = Table(
    "crux_steps",
    metadata,
    Column(
        "flow_id", String(200), ForeignKey("crux_flows.id", ondelete="CASCADE"), primary_key=True
    ),
    Column("seq", Integer, primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("name", String(200), nullable=False),
    Column("occurrence", Integer, nullable=False),
    Column("result", Text, nullable=False),
    Column("attempts", Integer, nullable=False, server_default="1"),
    Column("epoch", BigInteger, nullable=False),
    Column("started_at", DateTime(timezone=True)),
    Column("completed_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("flow_id", "name", "occurrence", name="uq_crux_steps_name_occurrence"),
)

signals = Table(
    "crux_signals",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("flow_id", String(200), ForeignKey("crux_flows.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(200), nullable=False),
    Column("payload", Text, nullable=False),
    Column("key", String(200)),
    Column("status", String(16), nullable=False),
    Column("error", Text),
    Column("consumed_seq", Integer),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("consumed_at", DateTime(timezone=True)),
    UniqueConstraint("flow_id", "key", name="uq_crux_signals_key"),
    Index("ix_crux_signals_pending", "flow_id", "name", "status", "id"),
)

step_errors = Table(
    "crux_step_errors",
    metadata,
    Column(
        "flow_id", String(200), ForeignKey("crux_flows.id", ondelete="CASCADE"), primary_key=True
    ),
    Column("seq", Integer, primary_key=True),
    Column("attempt", Integer, primary_key=True),
    Column("name", String(200), nullable=False),
    Column("error", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# One row per sweep tick: a second beat's sweep of the same tick is a no-op.
sweeps = Table(
    "crux_sweeps",
    metadata,
    Column("tick", BigInteger, primary_key=True, autoincrement=False),
    Column("swept_at", DateTime(timezone=True), nullable=False),
)

# Messages the ingress refused (bad JSON, fields, signature, size, unknown flow):
# acknowledged so they never block the queue, and kept here so none is lost silently.
rejected_signals = Table(
    "crux_rejected_signals",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("reason", String(32), nullable=False),
    Column("detail", Text, nullable=False),
    Column("flow_id", String(200)),
    Column("name", String(200)),
    Column("key", String(200)),
    Column("raw", Text, nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Index("ix_crux_rejected_signals_received", "received_at"),
)

# Child tasks started by ``run_task``: the flow's inbox for their outcome, like signals.
tasks = Table(
    "crux_tasks",
    metadata,
    Column(
        "flow_id", String(200), ForeignKey("crux_flows.id", ondelete="CASCADE"), primary_key=True
    ),
    Column("seq", Integer, primary_key=True),
    Column("name", String(200), nullable=False),
    Column("task", String(200), nullable=False),
    Column("task_id", String(300), nullable=False, unique=True),
    Column("attempt", Integer, nullable=False),
    Column("call", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("result", Text),
    Column("error", Text),
    Column("sends", Integer, nullable=False, server_default="1"),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("sent_at", DateTime(timezone=True), nullable=False),
    Column("completed_at", DateTime(timezone=True)),
)
