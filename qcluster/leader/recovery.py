"""What a leader does besides firing: recover runs, and prune old ones.

docs/DESIGN.md invariant 7: a run on a worker that died becomes ``lost``; if its job asked
for recovery, the same run row gets a new attempt (``attempt + 1``) and is sent again, as Quartz
re-fires jobs that request recovery. Runs recorded but never sent (the leader died in
between) are sent by the next leader, or recorded ``missed`` when they are older than
their misfire grace time. Every change here is fenced on the leader's epoch.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Collection
from typing import Any

import sqlalchemy as sa

from qcluster.store import schema
from qcluster.store.db import Database
from qcluster.store.jobstore import run_record

log = logging.getLogger(__name__)

STALE_SCHEDULED = 5.0  # seconds a `scheduled` row may wait before it is sent again


@dataclasses.dataclass
class RecoveryResult:
    resend: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    lost: int = 0
    retried: int = 0
    missed: int = 0


def recover_runs(
    db: Database,
    epoch: int,
    *,
    live_workers: Collection[tuple[str, str]],
    grace_seconds: float,
    now: float | None = None,
) -> RecoveryResult:
    """One recovery pass, in one fenced transaction."""
    r = schema.runs
    now = time.time() if now is None else now
    out = RecoveryResult()
    live = set(live_workers)
    with db.fenced(epoch) as conn:
        open_runs = conn.execute(
            sa.select(r.c.id, r.c.job_id, r.c.func, r.c.args, r.c.kwargs, r.c.scheduled_at,
                      r.c.attempt, r.c.recover, r.c.status, r.c.worker, r.c.worker_session,
                      r.c.epoch, r.c.created_at)
            .where(r.c.status.in_(("scheduled", "dispatched", "running")))
        ).all()
        for row in open_runs:
            if row.status == "scheduled":
                _unsent(conn, row, epoch, now, grace_seconds, out)
            elif (row.worker, row.worker_session) not in live:
                _orphaned(conn, row, epoch, now, out)
    return out


def _unsent(conn: Any, row: Any, epoch: int, now: float, grace: float,
            out: RecoveryResult) -> None:
    r = schema.runs
    if row.epoch == epoch and row.created_at > now - STALE_SCHEDULED:
        return  # ours and fresh: the dispatcher still has it
    if row.attempt == 1 and now - row.scheduled_at > grace:
        conn.execute(
            r.update().where(r.c.id == row.id, r.c.status == "scheduled")
            .values(status="missed", finished_at=now,
                    error=f"never dispatched within the misfire grace time ({grace:.0f}s)")
        )
        out.missed += 1
        return
    out.resend.append(run_record(row.id, row.job_id, row.func, row.args, row.kwargs,
                                 row.scheduled_at, row.attempt, epoch, row.recover))


def _orphaned(conn: Any, row: Any, epoch: int, now: float, out: RecoveryResult) -> None:
    r = schema.runs
    where = (r.c.id == row.id, r.c.attempt == row.attempt, r.c.status == row.status)
    reason = f"worker {row.worker} stopped checking in during attempt {row.attempt}"
    conn.execute(r.update().where(*where).values(status="lost", finished_at=now, error=reason))
    out.lost += 1
    log.warning("run %d of job %s is lost: %s", row.id, row.job_id, reason)
    if not row.recover:
        return
    attempt = row.attempt + 1
    conn.execute(
        r.update().where(r.c.id == row.id, r.c.status == "lost")
        .values(status="scheduled", attempt=attempt, worker=None, worker_session=None,
                dispatched_at=None, started_at=None, finished_at=None, duration=None,
                epoch=epoch, created_at=now, error=f"recovering: {reason}")
    )
    out.retried += 1
    out.resend.append(run_record(row.id, row.job_id, row.func, row.args, row.kwargs,
                                 row.scheduled_at, attempt, epoch, row.recover))


def prune_runs(db: Database, epoch: int, *, older_than: float) -> int:
    """Delete finished runs scheduled before ``older_than``."""
    r = schema.runs
    with db.fenced(epoch) as conn:
        return int(
            conn.execute(
                r.delete().where(
                    r.c.scheduled_at < older_than,
                    r.c.status.in_(("succeeded", "failed", "missed", "lost")),
                )
            ).rowcount
        )
