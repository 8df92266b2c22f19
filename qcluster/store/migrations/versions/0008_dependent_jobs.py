"""Dependent jobs (issue 16): a job may run after others (``jobs add B --after A``).

``qc_job_deps`` holds one row per (child, parent) edge, written with the child job
(``store/catalog.upsert_jobs``). A run of a job that has children when it is recorded is
marked ``chain`` (``store/runs.insert_runs``); the leader's chain pass
(``leader/chains.py``) reads the marked runs that have ended through a partial index (only
the few undecided ones are in it), records each child's run, keyed on (child, the
parent's fire time) like every run, with ``parent_run`` naming the parent run, and clears
the mark.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "qc_job_deps",
        sa.Column("child_id", sa.String(200), primary_key=True),
        sa.Column("parent_id", sa.String(200), primary_key=True),
        sa.Column("condition", sa.String(16), nullable=False),
    )
    op.create_index("ix_qc_job_deps_parent", "qc_job_deps", ["parent_id"])
    with op.batch_alter_table("qc_runs") as batch:
        batch.add_column(sa.Column("parent_run", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("chain", sa.Boolean, nullable=True))
    op.create_index("ix_qc_runs_chain", "qc_runs", ["chain"],
                    postgresql_where=sa.text("chain"), sqlite_where=sa.text("chain"))


def downgrade() -> None:
    op.drop_index("ix_qc_runs_chain", table_name="qc_runs")
    with op.batch_alter_table("qc_runs") as batch:
        batch.drop_column("chain")
        batch.drop_column("parent_run")
    op.drop_index("ix_qc_job_deps_parent", table_name="qc_job_deps")
    op.drop_table("qc_job_deps")
