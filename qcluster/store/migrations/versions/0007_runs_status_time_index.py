"""The runs' status index also holds the fire time and the job (issue 17): the dashboard's
"failing in 24 h" filter reads the troubled runs of the last day by this index alone (an
index-only range per status), not every troubled run of the retention window row by row.

Measured with 10,000 jobs and 1,000,000 runs (``python -m bench.web``): the filter's page
took about 250 ms on PostgreSQL and 600 ms on SQLite, now about 90 and 140 ms. It replaces
``ix_qc_runs_status``, which every status change updates already, and whose queries (by
status alone) read the new one's prefix: no index more on the hot path.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_qc_runs_status_time", "qc_runs", ["status", "scheduled_at", "job_id"])
    op.drop_index("ix_qc_runs_status", table_name="qc_runs")


def downgrade() -> None:
    op.create_index("ix_qc_runs_status", "qc_runs", ["status"])
    op.drop_index("ix_qc_runs_status_time", table_name="qc_runs")
