"""Webhook delivery bookkeeping: which notifications of a run were settled, and when to try again.

Runs that existed before were notified by the old in-process sender, so they are marked settled
and an upgrade sends nothing old again.

Revision ID: 0003
Revises: 0002
Create Date: 2025-01-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("webhook_started", sa.String(16), nullable=True))
        batch.add_column(sa.Column("webhook_ended", sa.String(16), nullable=True))
        batch.add_column(sa.Column("webhook_attempts", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("webhook_retry_at", sa.Float, nullable=True))
    op.execute("UPDATE runs SET webhook_started = 'sent' WHERE started_at IS NOT NULL")
    op.execute("UPDATE runs SET webhook_ended = 'sent' WHERE status IN ('succeeded', 'failed', 'canceled')")


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("webhook_retry_at")
        batch.drop_column("webhook_attempts")
        batch.drop_column("webhook_ended")
        batch.drop_column("webhook_started")
