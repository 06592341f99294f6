"""Time and failure: step attempt errors, the frontier step's failed attempts, sweep ticks.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_ts = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("crux_flows") as batch:
        batch.add_column(sa.Column("retry_attempt", sa.Integer, nullable=False, server_default="0"))
    op.create_index("ix_crux_flows_status_lease", "crux_flows", ["status", "lease_until"])
    op.create_table(
        "crux_step_errors",
        sa.Column(
            "flow_id",
            sa.String(200),
            sa.ForeignKey("crux_flows.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("attempt", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("created_at", _ts, nullable=False),
    )
    op.create_table(
        "crux_sweeps",
        sa.Column("tick", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("swept_at", _ts, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("crux_sweeps")
    op.drop_table("crux_step_errors")
    op.drop_index("ix_crux_flows_status_lease", "crux_flows")
    with op.batch_alter_table("crux_flows") as batch:
        batch.drop_column("retry_attempt")
