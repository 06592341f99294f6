"""Operations: signal schemas checked at send, forks, retries.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("crux_flows", sa.Column("waiting_schema", sa.Text))
    op.add_column("crux_flows", sa.Column("forked_from", sa.String(200)))
    op.add_column("crux_flows", sa.Column("forked_at", sa.Integer))
    op.add_column(
        "crux_flows", sa.Column("retries", sa.Integer, nullable=False, server_default="0")
    )


def downgrade() -> None:
    with op.batch_alter_table("crux_flows") as batch:
        batch.drop_column("retries")
        batch.drop_column("forked_at")
        batch.drop_column("forked_from")
        batch.drop_column("waiting_schema")
