"""The durable record: flows, steps, signals.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_ts = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "crux_flows",
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("input", sa.Text, nullable=False),
        sa.Column("result", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("cancel_reason", sa.Text),
        sa.Column("waiting_on", sa.String(200)),
        sa.Column("deadline", _ts),
        sa.Column("wake_at", _ts),
        sa.Column("wake_kind", sa.String(16)),
        sa.Column("lease_owner", sa.String(200)),
        sa.Column("lease_until", _ts),
        sa.Column("epoch", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("next_seq", sa.Integer, nullable=False, server_default="0"),
        sa.Column("runs", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", _ts, nullable=False),
        sa.Column("updated_at", _ts, nullable=False),
        sa.Column("finished_at", _ts),
    )
    op.create_index("ix_crux_flows_name_status", "crux_flows", ["name", "status"])
    op.create_index("ix_crux_flows_status", "crux_flows", ["status"])
    op.create_index("ix_crux_flows_wake_at", "crux_flows", ["wake_at"])
    op.create_table(
        "crux_steps",
        sa.Column(
            "flow_id",
            sa.String(200),
            sa.ForeignKey("crux_flows.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("occurrence", sa.Integer, nullable=False),
        sa.Column("result", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="1"),
        sa.Column("epoch", sa.BigInteger, nullable=False),
        sa.Column("started_at", _ts),
        sa.Column("completed_at", _ts, nullable=False),
        sa.UniqueConstraint("flow_id", "name", "occurrence", name="uq_crux_steps_name_occurrence"),
    )
    op.create_table(
        "crux_signals",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column(
            "flow_id",
            sa.String(200),
            sa.ForeignKey("crux_flows.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("key", sa.String(200)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("consumed_seq", sa.Integer),
        sa.Column("created_at", _ts, nullable=False),
        sa.Column("consumed_at", _ts),
        sa.UniqueConstraint("flow_id", "key", name="uq_crux_signals_key"),
    )
    op.create_index("ix_crux_signals_pending", "crux_signals", ["flow_id", "name", "status", "id"])


def downgrade() -> None:
    op.drop_table("crux_signals")
    op.drop_table("crux_steps")
    op.drop_table("crux_flows")
