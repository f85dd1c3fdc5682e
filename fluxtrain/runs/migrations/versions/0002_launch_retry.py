"""Launch retry bookkeeping: when a queued run may be launched again, and since when launches fail.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("launch_retry_at", sa.Float, nullable=True))
        batch.add_column(sa.Column("launch_failing_since", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("launch_failing_since")
        batch.drop_column("launch_retry_at")
