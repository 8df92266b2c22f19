"""Alembic environment: qcluster runs migrations on a connection it passes in."""

from __future__ import annotations

from alembic import context

from qcluster.store.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - qcluster always passes its connection
    raise RuntimeError("qcluster migrations run through `qcluster db upgrade`")

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    version_table="qc_alembic_version",
)
with context.begin_transaction():
    context.run_migrations()
