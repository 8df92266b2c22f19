"""The first schema: job store, cluster row, lease, members, runs.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "qc_jobs",
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("func", sa.String(400), nullable=False),
        sa.Column("trigger", sa.Text, nullable=False),
        sa.Column("args", sa.Text, nullable=False),
        sa.Column("kwargs", sa.Text, nullable=False),
        sa.Column("next_run_time", sa.Float, nullable=True),
        sa.Column("paused", sa.Boolean, nullable=False),
        sa.Column("misfire_grace_seconds", sa.Integer, nullable=True),
        sa.Column("coalesce", sa.Boolean, nullable=True),
        sa.Column("recover", sa.Boolean, nullable=False),
        sa.Column("broken", sa.Text, nullable=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_index("ix_qc_jobs_next_run_time", "qc_jobs", ["next_run_time"])
    op.create_table(
        "qc_cluster",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("backend", sa.String(20), nullable=False),
        sa.Column("phase", sa.String(40), nullable=False),
        sa.Column("target_backend", sa.String(20), nullable=True),
        sa.Column("config_version", sa.Integer, nullable=False),
        sa.Column("epoch", sa.BigInteger, nullable=False),
        sa.Column("leader_id", sa.String(200), nullable=True),
        sa.Column("leader_uri", sa.String(400), nullable=True),
        sa.Column("leader_since", sa.Float, nullable=True),
        sa.Column("leader_backend", sa.String(20), nullable=True),
        sa.Column("leader_token", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "qc_lease",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("holder", sa.String(200), nullable=True),
        sa.Column("token", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=True),
    )
    op.create_table(
        "qc_members",
        sa.Column("node_id", sa.String(200), primary_key=True),
        sa.Column("session", sa.String(64), nullable=False),
        sa.Column("roles", sa.String(100), nullable=False),
        sa.Column("uri", sa.String(400), nullable=True),
        sa.Column("capacity", sa.Integer, nullable=False),
        sa.Column("tags", sa.Text, nullable=False),
        sa.Column("backends", sa.String(100), nullable=False),
        sa.Column("config_version", sa.Integer, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("last_seen", sa.Float, nullable=False),
    )
    op.create_table(
        "qc_runs",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(200), nullable=False),
        sa.Column("scheduled_at", sa.Float, nullable=False),
        sa.Column("func", sa.String(400), nullable=False),
        sa.Column("args", sa.Text, nullable=False),
        sa.Column("kwargs", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("recover", sa.Boolean, nullable=False),
        sa.Column("epoch", sa.BigInteger, nullable=False),
        sa.Column("leader", sa.String(200), nullable=False),
        sa.Column("worker", sa.String(200), nullable=True),
        sa.Column("worker_session", sa.String(64), nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("dispatched_at", sa.Float, nullable=True),
        sa.Column("started_at", sa.Float, nullable=True),
        sa.Column("finished_at", sa.Float, nullable=True),
        sa.Column("duration", sa.Float, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.UniqueConstraint("job_id", "scheduled_at", name="uq_qc_runs_job_time"),
    )
    op.create_index("ix_qc_runs_status", "qc_runs", ["status"])
    op.create_index("ix_qc_runs_scheduled_at", "qc_runs", ["scheduled_at"])


def downgrade() -> None:
    for table in ("qc_runs", "qc_members", "qc_lease", "qc_cluster", "qc_jobs"):
        op.drop_table(table)
