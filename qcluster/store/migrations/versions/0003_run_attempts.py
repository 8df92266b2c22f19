"""Bounded attempts, quarantine and cancel (issue 14): a job's ``max_attempts`` and, on
each run, the bound it was fired with, how many of its attempts ended with their worker
dead mid-run (``deaths``), and when a cancel of it was asked while it ran.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("qc_jobs") as batch:
        batch.add_column(sa.Column("max_attempts", sa.Integer, nullable=True))
    with op.batch_alter_table("qc_runs") as batch:
        batch.add_column(sa.Column("max_attempts", sa.Integer, nullable=True))
        batch.add_column(sa.Column("deaths", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("cancel_requested", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("qc_runs") as batch:
        batch.drop_column("cancel_requested")
        batch.drop_column("deaths")
        batch.drop_column("max_attempts")
    with op.batch_alter_table("qc_jobs") as batch:
        batch.drop_column("max_attempts")
