"""Backfill runs are marked (issue 15): they are sent as workers have free slots, after the
live schedule's runs, and are not missed for waiting their turn (leader/recovery.py). Each
run keeps its job's own misfire grace, which recovery judges it by after the job is gone
(a one-off job's row is deleted after its fire).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("qc_runs") as batch:
        batch.add_column(sa.Column("backfill", sa.Boolean, nullable=False,
                                   server_default=sa.false()))
        batch.add_column(sa.Column("grace", sa.Integer, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("qc_runs") as batch:
        batch.drop_column("grace")
        batch.drop_column("backfill")
