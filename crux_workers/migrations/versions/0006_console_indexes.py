"""The operator console's flows list: newest first, overall and within a status.

Both indexes serve keyset pages ordered by (created_at, id) descending: without them,
every page of a large record sorts all its matching rows.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_crux_flows_created", "crux_flows", ["created_at", "id"])
    op.create_index("ix_crux_flows_status_created", "crux_flows", ["status", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_crux_flows_status_created", "crux_flows")
    op.drop_index("ix_crux_flows_created", "crux_flows")
