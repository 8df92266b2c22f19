"""The job changes that also change runs, as the leader's control object and a direct
change (no leader alive) both make them, on the caller's fenced connection.

A recorded run carries its own function, arguments and ``recover`` (docs/DESIGN.md,
``qc_runs``), so changing a job does not by itself change its runs:

* :func:`remove_job` (and ``jobs apply --prune``) removes the job, cancels its open runs
  and ends its retries to come, in one transaction (a job that ended by itself, a
  one-off after its fire, keeps its runs' retries);
* a one-off whose row is gone once its run is recorded ahead of its time is removed by
  withdrawing that run; pausing it is refused with the run's id;
* every change withdraws the runs sent ahead of their fire time (``[scheduler]
  fire_ahead_seconds``; :func:`qcluster.store.runs.withdraw`), so that a pause, an
  update or a removal applies at once, not from the next fire. An updated job whose
  schedule is unchanged fires the withdrawn time again, under its new definition: its
  next fire time is set back to it.

The times written (``finished_at``, ``cancel_requested``) are the database's, read on
the connection.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import Connection

from qcluster.definitions.jobdefs import JobDef
from qcluster.errors import JobNotFound
from qcluster.store import catalog, runs
from qcluster.store.catalog import ApplyResult
from qcluster.store.db import database_now


def remove_job(conn: Connection, job_id: str) -> None:
    """Remove a job (JobNotFound if there is none) and stop any further attempt of its
    open runs: sent ahead of their time, withdrawn; not started, ``cancelled``; running,
    no new attempt. A job whose row is gone because its last fire was recorded (a
    one-off ``--at``), but whose run is still ahead of its time, has that run withdrawn:
    inside the fire-ahead window the removal applies at once, as for any other job."""
    try:
        catalog.remove_job(conn, job_id)
    except JobNotFound:
        if not runs.withdraw(conn, [job_id], now=database_now(conn),
                             reason="its job was removed"):
            raise
        return
    _removed(conn, [job_id])


def _removed(conn: Connection, job_ids: Sequence[str]) -> None:
    now = database_now(conn)
    runs.withdraw(conn, job_ids, now=now, reason="its job was removed")
    runs.cancel_job_runs(conn, job_ids, now=now, reason="cancelled: its job was removed")
    runs.give_up_job_retries(conn, job_ids, "its job was removed")


def pause_job(conn: Connection, job_id: str) -> None:
    """Pause a job (JobNotFound if there is none); its runs sent ahead are withdrawn. A
    one-off whose only run is already recorded ahead of its time cannot be paused (there
    is nothing left to resume); the error names that run, and how to stop it."""
    now = database_now(conn)
    try:
        catalog.pause_job(conn, job_id)
    except JobNotFound:
        pending = runs.ahead(conn, job_id, now=now)
        if not pending:
            raise
        run_id, at = pending[0]
        when = datetime.fromtimestamp(at, UTC).isoformat()
        raise JobNotFound(
            f"job {job_id!r} has made its last fire: run {run_id} is sent ahead of its time "
            f"({when}) and there is nothing left to pause; `qcluster jobs remove {job_id}` "
            f"or `qcluster runs cancel {run_id}` withdraws it") from None
    runs.withdraw(conn, [job_id], now=now, reason="its job was paused")


def upsert_jobs(conn: Connection, defs: Sequence[JobDef], *, replace: bool,
                prune: bool = False, retention_seconds: float | None = None) -> ApplyResult:
    """:func:`qcluster.store.catalog.upsert_jobs`; with ``prune``, the jobs not in
    ``defs`` are removed as :func:`remove_job` removes one. The updated jobs' runs sent
    ahead are withdrawn; one whose next fire time the update left as it was (the same
    schedule) fires the earliest withdrawn time again, as it now is."""
    now = database_now(conn)
    result = catalog.upsert_jobs(conn, defs, replace=replace, now=now,
                                 retention_seconds=retention_seconds)
    withdrawn = runs.withdraw(conn, result.updated, now=now, reason="its job was updated")
    for job_id in result.kept_schedule:
        if job_id in withdrawn:
            catalog.set_next_run_time(conn, job_id, withdrawn[job_id])
    if prune:
        result.removed = catalog.prune_jobs(conn, [d.id for d in defs])
        _removed(conn, result.removed)
    return result


def cancel_run(conn: Connection, run_id: int) -> dict[str, Any]:
    """:func:`qcluster.store.runs.cancel` of one run, as plain data (it travels):
    ``{"run_id", "status", "attempt"}``."""
    done = runs.cancel(conn, run_id, now=database_now(conn), reason="cancelled: by runs cancel")
    return {"run_id": done.run_id, "status": str(done.status), "attempt": done.attempt}
