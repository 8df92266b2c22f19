"""What PostgreSQL spends its time on during a window (issue 18, item 3):
``pg_stat_statements``, when the server loads it (the bench's private server does, if the
Debian package has the library; a ``--db-url`` server may). Nothing is asserted.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from tests.servers.postgres import find_pg_bindir


def statements_available() -> bool:
    """Whether this machine's PostgreSQL has the ``pg_stat_statements`` library."""
    try:
        lib = Path(find_pg_bindir()).parent / "lib" / "pg_stat_statements.so"
    except Exception:  # no PostgreSQL here: the bench says so elsewhere
        return False
    return lib.exists()


def reset(engine: Engine) -> bool:
    """Create the extension if need be and empty its counters; whether it is usable."""
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            conn.exec_driver_sql("SELECT pg_stat_statements_reset()")
    except sa.exc.DBAPIError:  # not loaded (shared_preload_libraries), or not allowed
        return False
    return True


def top(engine: Engine, limit: int = 10) -> list[dict[str, Any]]:
    """The statements of this database by total execution time since :func:`reset`."""
    query = sa.text(
        "SELECT calls, total_exec_time, max_exec_time, shared_blks_hit + shared_blks_read, "
        "rows, query FROM pg_stat_statements "
        "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "ORDER BY total_exec_time DESC LIMIT :limit")
    with contextlib.suppress(sa.exc.DBAPIError), engine.connect() as conn:
        rows = conn.execute(query, {"limit": limit}).all()
        return [{"calls": int(c), "total_ms": round(float(t), 1),
                 "mean_ms": round(float(t) / max(1, int(c)), 3),
                 "max_ms": round(float(m), 1), "blocks_per_call": int(b) // max(1, int(c)),
                 "rows": int(r), "query": " ".join(str(q).split())[:400]}
                for c, t, m, b, r, q in rows]
    return []
