"""Crash loops and a checked step cache: consecutive lapses and the checkpoint chain.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("crux_flows", sa.Column("lapses", sa.Integer, nullable=False, server_default="0"))
    # NULL for flows recorded before: their cache is never trusted (the record is read).
    op.add_column("crux_flows", sa.Column("history_digest", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("crux_flows") as batch:
        batch.drop_column("history_digest")
        batch.drop_column("lapses")
