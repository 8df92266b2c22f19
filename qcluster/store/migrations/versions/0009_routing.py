"""Routing (issue 16): tags, affinity groups, a job's own strategy, shards and broadcast.

``qc_runs.routing`` keeps where a run may go, as its job asked when it fired (JSON; NULL
for the runs of most jobs, which go anywhere): the leader's dispatcher reads it with the
run, so a run fired before a ``jobs update`` keeps the routing it fired with.
``qc_groups`` holds the worker each affinity group sits on (``store/groups.py``), so that
a new leader keeps it.

``qc_runs.slot`` tells the runs of one fire time apart: ``""`` for the one run of most
jobs, ``"3/8"`` for shard 3 of a job of 8 shards, ``"@w1"`` for a broadcast job's run on
worker w1. The unique key of a run becomes (job, fire time, slot), so each is recorded
once whoever records it.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("qc_runs") as batch:
        batch.add_column(sa.Column("routing", sa.Text, nullable=True))
        batch.add_column(sa.Column("slot", sa.String(210), nullable=False,
                                   server_default=""))
        batch.drop_constraint("uq_qc_runs_job_time", type_="unique")
        batch.create_unique_constraint("uq_qc_runs_job_time_slot",
                                       ["job_id", "scheduled_at", "slot"])
    op.create_table(
        "qc_groups",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("worker", sa.String(200), nullable=False),
        sa.Column("placed_at", sa.Float, nullable=False),
        sa.Column("epoch", sa.BigInteger, nullable=False),
        sa.Column("moves", sa.Integer, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_table("qc_groups")
    with op.batch_alter_table("qc_runs") as batch:
        batch.drop_constraint("uq_qc_runs_job_time_slot", type_="unique")
        batch.create_unique_constraint("uq_qc_runs_job_time", ["job_id", "scheduled_at"])
        batch.drop_column("slot")
        batch.drop_column("routing")
