"""What a live backend migration needs: every backend's last leader token, when the
phase began, and the cluster config version each member started under.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("qc_cluster") as batch:
        batch.add_column(sa.Column("leader_tokens", sa.Text, nullable=True))
        batch.add_column(sa.Column("phase_since", sa.Float, nullable=True))
    with op.batch_alter_table("qc_members") as batch:
        batch.add_column(
            sa.Column("started_version", sa.Integer, nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("qc_members") as batch:
        batch.drop_column("started_version")
    with op.batch_alter_table("qc_cluster") as batch:
        batch.drop_column("phase_since")
        batch.drop_column("leader_tokens")
