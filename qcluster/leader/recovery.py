"""What a leader does besides firing: recover runs, and prune old ones.

docs/DESIGN.md invariant 7: a run on a worker that died becomes ``lost``; if its job asked
for recovery, the same run row gets a new attempt (``attempt + 1``) and is sent again, as Quartz
re-fires jobs that request recovery. Runs recorded but never sent (the leader died in
between) are sent by the next leader, or recorded ``missed`` when they are older than
their misfire grace time. Every change here is fenced on the leader's epoch, and made by
:mod:`qcluster.store.runs`, the owner of ``qc_runs``; this module decides which.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Collection
from typing import Any

import sqlalchemy as sa

from qcluster.store import records, runs, schema
from qcluster.store.db import Database
from qcluster.store.records import RunRecord
from qcluster.store.runs import RunStatus

log = logging.getLogger(__name__)

STALE_SCHEDULED = 5.0  # seconds a `scheduled` row may wait before it is sent again


@dataclasses.dataclass
class RecoveryResult:
    resend: list[RunRecord] = dataclasses.field(default_factory=list)
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
            .where(r.c.status.in_(runs.OPEN))
        ).all()
        for row in open_runs:
            if row.status == RunStatus.SCHEDULED:
                _unsent(conn, row, epoch, now, grace_seconds, out)
            elif (row.worker, row.worker_session) not in live:
                _orphaned(conn, row, epoch, now, out)
    return out


def _unsent(conn: Any, row: Any, epoch: int, now: float, grace: float,
            out: RecoveryResult) -> None:
    if row.epoch == epoch and row.created_at > now - STALE_SCHEDULED:
        return  # ours and fresh: the dispatcher still has it
    if row.attempt == 1 and now - row.scheduled_at > grace:
        runs.mark_missed(conn, row.id, now=now,
                         error=f"never dispatched within the misfire grace time ({grace:.0f}s)")
        out.missed += 1
        return
    out.resend.append(records.run_record(row.id, row.job_id, row.func, row.args, row.kwargs,
                                         row.scheduled_at, row.attempt, epoch, row.recover))


def _orphaned(conn: Any, row: Any, epoch: int, now: float, out: RecoveryResult) -> None:
    reason = f"worker {row.worker} stopped checking in during attempt {row.attempt}"
    runs.mark_lost(conn, row.id, row.attempt, row.status, now=now, error=reason)
    out.lost += 1
    log.warning("run %d of job %s is lost: %s", row.id, row.job_id, reason)
    if not row.recover:
        return
    runs.retry(conn, row.id, row.attempt, epoch=epoch, now=now, error=f"recovering: {reason}")
    out.retried += 1
    out.resend.append(records.run_record(row.id, row.job_id, row.func, row.args, row.kwargs,
                                         row.scheduled_at, row.attempt + 1, epoch, row.recover))


def prune_runs(db: Database, epoch: int, *, older_than: float) -> int:
    """Delete finished runs scheduled before ``older_than``."""
    with db.fenced(epoch) as conn:
        return runs.prune(conn, older_than=older_than)
