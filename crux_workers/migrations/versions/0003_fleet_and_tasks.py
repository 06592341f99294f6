"""Fleet and child tasks: messages the ingress refused, and run_task's inbox.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_ts = sa.DateTime(timezone=True)
_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "crux_rejected_signals",
        sa.Column("id", _id, primary_key=True, autoincrement=True),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("flow_id", sa.String(200)),
        sa.Column("name", sa.String(200)),
        sa.Column("key", sa.String(200)),
        sa.Column("raw", sa.Text, nullable=False),
        sa.Column("received_at", _ts, nullable=False),
    )
    op.create_index("ix_crux_rejected_signals_received", "crux_rejected_signals", ["received_at"])
    op.create_table(
        "crux_tasks",
        sa.Column(
            "flow_id",
            sa.String(200),
            sa.ForeignKey("crux_flows.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("task", sa.String(200), nullable=False),
        sa.Column("task_id", sa.String(300), nullable=False, unique=True),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("call", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("result", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("sends", sa.Integer, nullable=False, server_default="1"),
        sa.Column("created_at", _ts, nullable=False),
        sa.Column("sent_at", _ts, nullable=False),
        sa.Column("completed_at", _ts),
    )


def downgrade() -> None:
    op.drop_table("crux_tasks")
    op.drop_index("ix_crux_rejected_signals_received", "crux_rejected_signals")
    op.drop_table("crux_rejected_signals")
