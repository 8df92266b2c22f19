"""The writes that stop further attempts of runs, as the leader's control object and a
direct change (no leader alive) both make them, on the caller's fenced connection.

A recorded run carries its own function, arguments and ``recover`` (docs/DESIGN.md,
``qc_runs``), so removing a job does not by itself stop its runs: :func:`remove_job`
removes the job and cancels its open runs in one transaction. The times written
(``finished_at``, ``cancel_requested``) are the database's, read on the connection.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Connection

from qcluster.store import catalog, runs
from qcluster.store.db import database_now


def remove_job(conn: Connection, job_id: str) -> None:
    """Remove a job (JobNotFound if there is none) and stop any further attempt of its
    open runs: not started, ``cancelled``; running, no new attempt."""
    catalog.remove_job(conn, job_id)
    runs.cancel_job_runs(conn, job_id, now=database_now(conn),
                         reason="cancelled: its job was removed")


def cancel_run(conn: Connection, run_id: int) -> dict[str, Any]:
    """:func:`qcluster.store.runs.cancel` of one run, as plain data (it travels):
    ``{"run_id", "status", "attempt"}``."""
    done = runs.cancel(conn, run_id, now=database_now(conn), reason="cancelled: by runs cancel")
    return {"run_id": done.run_id, "status": str(done.status), "attempt": done.attempt}
