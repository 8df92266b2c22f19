"""Job policies (issue 15): each job's policies and how many of its fire times ran, each
run's start time, timeout and retries, and the exclusion calendars.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("qc_jobs") as batch:
        batch.add_column(sa.Column("policy", sa.Text, nullable=True))
        batch.add_column(sa.Column("runs_made", sa.Integer, nullable=False, server_default="0"))
    with op.batch_alter_table("qc_runs") as batch:
        batch.add_column(sa.Column("due_at", sa.Float, nullable=True))
        batch.add_column(sa.Column("timeout", sa.Float, nullable=True))
        batch.add_column(sa.Column("retries_left", sa.Integer, nullable=False,
                                   server_default="0"))
        batch.add_column(sa.Column("retry_backoff", sa.Float, nullable=True))
        batch.add_column(sa.Column("retry_max_backoff", sa.Float, nullable=True))
    op.create_index("ix_qc_runs_job_status", "qc_runs", ["job_id", "status"])
    op.create_index("ix_qc_runs_retry", "qc_runs", ["status"],
                    postgresql_where=sa.text("retries_left > 0"),
                    sqlite_where=sa.text("retries_left > 0"))
    op.create_table(
        "qc_calendars",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("dates", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("qc_calendars")
    op.drop_index("ix_qc_runs_retry", "qc_runs")
    op.drop_index("ix_qc_runs_job_status", "qc_runs")
    with op.batch_alter_table("qc_runs") as batch:
        for name in ("retry_max_backoff", "retry_backoff", "retries_left", "timeout", "due_at"):
            batch.drop_column(name)
    with op.batch_alter_table("qc_jobs") as batch:
        batch.drop_column("runs_made")
        batch.drop_column("policy")
