"""What a leader does besides firing: recover runs, and prune old ones.

docs/DESIGN.md invariant 7: a run on a worker that died becomes ``lost``; if its job asked
for recovery, the same run row gets a new attempt (``attempt + 1``) and is sent again, as Quartz
re-fires jobs that request recovery, within bounds:

* at most ``max_attempts`` attempts in all (the job's, else ``[runs] max_attempts``);
* a run whose worker died while it was ``running`` on :data:`QUARANTINE_DEATHS` attempts
  is quarantined: ``lost``, with the reason, and never attempted again (its code may be
  what kills the worker: a poison run must not crash-loop the cluster);
* a run whose cancel was asked is never attempted again.

"Its worker died" means *known to have stopped running it*, never only "missing from the
member list": a worker cut off from the database drops out of the list while it may still
run the run, or have finished it. The leader's judge (:mod:`qcluster.leader.liveness`)
asks such a worker over RPC; an outcome it reports is recorded (fenced, over its claim),
what it still holds is left alone, and only a session that says it does not hold the
attempt, has left, or has been silent past its claim lease, is counted out.

Runs recorded but never sent (the leader died in between) are sent by the next leader, or
recorded ``missed`` when they are older than their misfire grace time. Runs claimed by a
live worker that has not started them within that grace (every slot held by jobs that do
not end) are recorded ``missed`` too: the worker's start and this write filter on the
same ``dispatched`` status, so exactly one of them wins. Every change here is fenced on
the leader's epoch, and made by :mod:`qcluster.store.runs`, the owner of ``qc_runs``;
this module decides which.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from qcluster.leader.liveness import Judge, Kind, Verdict
from qcluster.store import catalog, records, runs, schema
from qcluster.store.db import Database
from qcluster.store.records import RunRecord
from qcluster.store.reports import Key
from qcluster.store.runs import RunStatus

log = logging.getLogger(__name__)

STALE_SCHEDULED = 5.0  # seconds a `scheduled` row may wait before it is sent again
#: Attempts whose worker died mid-run after which a run is quarantined.
QUARANTINE_DEATHS = 2
#: ``[runs] max_attempts`` when the caller gives none.
DEFAULT_MAX_ATTEMPTS = 3


@dataclasses.dataclass
class RecoveryResult:
    resend: list[RunRecord] = dataclasses.field(default_factory=list)
    lost: int = 0
    retried: int = 0
    missed: int = 0
    quarantined: int = 0
    reported: int = 0  # outcomes a worker cut off from the database told us
    waiting: int = 0  # runs of sessions neither live nor known stopped: asked again later
    unclaimed: int = 0  # claimed by a worker that stopped before starting them: sent again


def _all_stopped(suspects: Mapping[str, Sequence[Key]],
                 nodes: Mapping[str, str] | None = None) -> dict[str, Verdict]:
    return {s: Verdict(Kind.STOPPED, "it is not a live member") for s in suspects}


def recover_runs(
    db: Database,
    epoch: int,
    *,
    live_workers: Collection[tuple[str, str]],
    grace_seconds: float,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    now: float | None = None,
    judge: Judge | None = None,
) -> RecoveryResult:
    """One recovery pass. ``live_workers`` are the (node id, session) pairs that the
    database lists as live; ``judge`` decides about the sessions of the other claims (a
    leader passes its :class:`~qcluster.leader.liveness.SessionJudge`; without one, a
    session not listed has stopped: for tests and tools that know no worker runs).
    ``max_attempts`` bounds the attempts of a run whose row has no bound of its own.

    The open runs are read first, the judge asks outside any transaction, and every change
    is made in one transaction fenced on ``epoch``, each filtered on the status and
    attempt that was read (a row that moved on meanwhile is left alone).

    ``now``, what staleness and the grace are judged by and what is written, is by default
    the database's time, read in the fenced transaction (after the judge's calls, however
    long they took): the clock that ``created_at`` and the fire times are on, whichever
    host leads (docs/DESIGN.md invariant 8)."""
    r = schema.runs
    out = RecoveryResult()
    live = set(live_workers)
    with db.read() as conn:
        open_runs = conn.execute(
            sa.select(r.c.id, r.c.job_id, r.c.func, r.c.args, r.c.kwargs, r.c.scheduled_at,
                      r.c.attempt, r.c.recover, r.c.status, r.c.worker, r.c.worker_session,
                      r.c.epoch, r.c.created_at, r.c.max_attempts, r.c.deaths,
                      r.c.cancel_requested)
            .where(r.c.status.in_(runs.OPEN))
        ).all()
    suspects: dict[str, list[Key]] = {}
    nodes: dict[str, str] = {}
    for row in open_runs:
        if row.status != RunStatus.SCHEDULED and (row.worker, row.worker_session) not in live:
            suspects.setdefault(row.worker_session, []).append((row.id, row.attempt))
            nodes[row.worker_session] = row.worker
    verdicts = (judge or _all_stopped)(suspects, nodes) if suspects else {}
    with db.fenced(epoch) as conn:
        if now is None:
            now = db.now(conn)
        for row in open_runs:
            if row.status == RunStatus.SCHEDULED:
                _unsent(conn, row, epoch, now, grace_seconds, out)
                continue
            verdict = verdicts.get(row.worker_session)
            fate, reason = ("held", "") if verdict is None else _fate(conn, row, verdict, out)
            if fate == "held":
                if row.status == RunStatus.DISPATCHED:
                    _not_started(conn, row, now, grace_seconds, out)
            elif fate == "stopped":
                _orphaned(conn, row, epoch, now, row.max_attempts or max_attempts, reason, out)
    return out


def _fate(conn: Any, row: Any, verdict: Verdict, out: RecoveryResult) -> tuple[str, str]:
    """What the judge's verdict on its session means for one claimed run: ``held`` (the
    worker holds it: as for a live worker), ``stopped`` (with the reason), or ``done``
    (nothing to do now: its reported outcome was recorded, or the verdict waits)."""
    if verdict.kind == Kind.UNKNOWN:
        out.waiting += 1
        return "done", ""
    if verdict.kind == Kind.STOPPED or verdict.report is None:
        return "stopped", f"worker {row.worker} stopped: {verdict.reason}"
    key = (row.id, row.attempt)
    outcome = verdict.report.finished.get(key)
    if outcome is None:
        if key in verdict.report.running:
            return "held", ""
        return "stopped", f"worker {row.worker} says it does not hold attempt {row.attempt}"
    if runs.record_reported(conn, row.id, row.attempt, row.worker_session,
                            status=outcome.status, started=outcome.started,
                            finished=outcome.finished, error=outcome.error):
        out.reported += 1
        log.info("run %d (attempt %d) of job %s %s on worker %s, which could not reach the "
                 "database and told the leader", row.id, row.attempt, row.job_id,
                 outcome.status, row.worker)
    return "done", ""


def _unsent(conn: Any, row: Any, epoch: int, now: float, grace: float,
            out: RecoveryResult) -> None:
    if row.epoch == epoch and row.created_at > now - STALE_SCHEDULED:
        return  # ours and fresh: the dispatcher still has it
    if row.attempt == 1 and now - row.scheduled_at > grace:
        if runs.mark_missed(conn, row.id, row.attempt, row.status, now=now,
                            error=f"never dispatched within the misfire grace time "
                                  f"({grace:.0f}s)"):
            out.missed += 1
        return
    out.resend.append(records.run_record(row.id, row.job_id, row.func, row.args, row.kwargs,
                                         row.scheduled_at, row.attempt, epoch, row.recover))


def _not_started(conn: Any, row: Any, now: float, grace: float, out: RecoveryResult) -> None:
    """A live worker claimed it and has not started it: missed once past the grace,
    counted from the fire time (a first attempt) or from the retry (a later one)."""
    since = row.scheduled_at if row.attempt == 1 else max(row.scheduled_at, row.created_at)
    if now - since <= grace:
        return
    if runs.mark_missed(conn, row.id, row.attempt, row.status, now=now,
                        error=f"no free worker slot within the misfire grace time "
                              f"({grace:.0f}s): worker {row.worker} claimed it and did not "
                              f"start it"):
        out.missed += 1
        log.warning("run %d of job %s is missed: worker %s claimed it and had no free slot "
                    "for %.0fs", row.id, row.job_id, row.worker, now - since)


def _orphaned(conn: Any, row: Any, epoch: int, now: float, bound: int, why: str,
              out: RecoveryResult) -> None:
    if row.status == RunStatus.DISPATCHED and row.cancel_requested is None:
        # Never started (its code runs only once `running`): not lost, just not sent
        # well; the next pass sends it again, or records it missed past its grace.
        if runs.unclaim(conn, row.id, row.attempt, row.worker_session):
            out.unclaimed += 1
            log.info("run %d (attempt %d) of job %s is sent again: %s before it started",
                     row.id, row.attempt, row.job_id, why)
        return
    died = row.status == RunStatus.RUNNING
    reason = f"{why}, during attempt {row.attempt}"
    deaths = row.deaths + (1 if died else 0)
    again = None  # why there is no new attempt, for a recover job
    if row.recover:
        if deaths >= QUARANTINE_DEATHS:
            again = f"quarantined: its worker died on {deaths} attempts"
        elif row.cancel_requested is not None:
            again = "cancelled: no further attempt"
        elif row.attempt >= bound:
            again = f"no attempt left (max_attempts {bound})"
    error = reason if again is None or not row.recover else f"{again}; {reason}"
    if not runs.mark_lost(conn, row.id, row.attempt, row.status, now=now, error=error):
        return  # it moved on meanwhile (finished, cancelled): nothing to recover
    out.lost += 1
    log.warning("run %d of job %s is lost: %s", row.id, row.job_id, error)
    if again is not None and again.startswith("quarantined"):
        out.quarantined += 1
        _quarantine_job(conn, row.job_id, row.id)
    if not row.recover or again is not None:
        return
    if not runs.retry(conn, row.id, row.attempt, epoch=epoch, now=now,
                      error=f"recovering: {reason}"):
        return  # a cancel committed in between
    out.retried += 1
    out.resend.append(records.run_record(row.id, row.job_id, row.func, row.args, row.kwargs,
                                         row.scheduled_at, row.attempt + 1, epoch, row.recover))


#: Runs of one job quarantined after which the job itself is set aside.
QUARANTINED_RUNS = 2


def _quarantine_job(conn: Any, job_id: str, run_id: int) -> None:
    """A job whose every run kills its worker would still crash-loop the cluster, one
    run at a time: once :data:`QUARANTINED_RUNS` of its runs are quarantined, the job is
    set aside (``broken``, with the reason; a job change clears it)."""
    r = schema.runs
    quarantined = conn.execute(
        sa.select(sa.func.count()).select_from(r)
        .where(r.c.job_id == job_id, r.c.status == RunStatus.LOST,
               r.c.error.like("quarantined:%"))).scalar_one()
    if quarantined >= QUARANTINED_RUNS:
        reason = (f"quarantined: {quarantined} of its runs killed their worker on "
                  f"{QUARANTINE_DEATHS} attempts (the latest run {run_id}); fix the job and "
                  "change it (jobs add --replace, or jobs apply) to fire it again")
        catalog.set_broken(conn, [(job_id, reason)])
        log.error("job %r is set aside: %s", job_id, reason)


def prune_runs(db: Database, epoch: int, *, older_than: float) -> int:
    """Delete finished runs scheduled before ``older_than``."""
    with db.fenced(epoch) as conn:
        return runs.prune(conn, older_than=older_than)
