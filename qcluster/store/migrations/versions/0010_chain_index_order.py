"""The index of the runs whose children are still to be decided holds their fire time and
id (issue 18): the chain pass reads them in that order, and the leader's check between
passes (``leader/chains.ready``) in it too, so that the planner reads the index whatever
its statistics say.

With ``ix_qc_runs_chain`` on the boolean alone, a ``qc_runs`` never analyzed (a new
database, its first minute, before autovacuum's first look) made PostgreSQL guess that
half the rows were marked, and read the check's ``LIMIT 1`` by a sequential scan of the
table: ``python -m bench steady --jobs 2000`` showed 3,020 blocks and 16 ms per check, about
three times a second, 10% of the database's time, with no dependent job at all. Now the
check reads one block of the (nearly empty) partial index.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_qc_runs_chain_time", "qc_runs", ["scheduled_at", "id"],
                    postgresql_where=sa.text("chain"), sqlite_where=sa.text("chain"))
    op.drop_index("ix_qc_runs_chain", table_name="qc_runs")


def downgrade() -> None:
    op.create_index("ix_qc_runs_chain", "qc_runs", ["chain"],
                    postgresql_where=sa.text("chain"), sqlite_where=sa.text("chain"))
    op.drop_index("ix_qc_runs_chain_time", table_name="qc_runs")
