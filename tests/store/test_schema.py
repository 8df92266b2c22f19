"""The migrations make the tables ``store/schema.py`` declares: after ``db upgrade`` on a
new database, Alembic finds no difference between the two (columns, indexes, constraints),
on SQLite and PostgreSQL. A migration that forgets what the schema says, or a schema
change without its migration, fails here, not on a user's upgraded cluster."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from qcluster.store import schema
from qcluster.store.db import SCHEMA_HEAD, Database


def test_the_migrations_make_the_declared_schema(db_url: str) -> None:
    db = Database(db_url)
    try:
        db.upgrade()
        assert db.current_revision() == SCHEMA_HEAD
        with db.engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={
                "compare_type": False,  # Float/Double spellings differ per dialect
                "include_name": _ours,
            })
            differences: list[Any] = compare_metadata(context, schema.metadata)
    finally:
        db.dispose()
    assert differences == []


def _ours(name: str | None, kind: str, _parent: Any) -> bool:
    return kind != "table" or ((name or "").startswith("qc_") and name != "qc_alembic_version")
