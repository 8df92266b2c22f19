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
same ``dispatched`` status, so exactly one of them wins.

Backfill runs (``qc_runs.backfill``, written by ``jobs backfill``) are the exception to
the grace: thousands may be due at once, and they are sent in the dispatcher's bulk lane,
as workers have free slots and after every live run (leader/dispatch.py), so a backfill
never delays the live schedule. One waits its turn unsent for up to
:data:`BACKFILL_WAIT` (then ``missed``), and once claimed is missed past its grace counted
from its claim. At most :data:`BULK_PER_PASS` are handed over per pass, oldest first.

Every change here is fenced on
the leader's epoch, and made by :mod:`qcluster.store.runs`, the owner of ``qc_runs``;
this module decides which.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from qcluster.definitions.policy import Defaults, backoff
from qcluster.leader.chains import chain_runs
from qcluster.leader.liveness import Judge, Kind, Verdict
from qcluster.store import catalog, groups, records, runs, schema
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


#: How long an unsent backfill run may wait for a free worker slot before it is missed.
BACKFILL_WAIT = 86400.0
#: Backfill runs handed to the dispatcher's bulk lane per pass (it drops the ones it has).
BULK_PER_PASS = 2000


@dataclasses.dataclass
class RecoveryResult:
    resend: list[RunRecord] = dataclasses.field(default_factory=list)
    bulk: list[RunRecord] = dataclasses.field(default_factory=list)  # backfill runs to send
    lost: int = 0
    retried: int = 0
    missed: int = 0
    quarantined: int = 0
    reported: int = 0  # outcomes a worker cut off from the database told us
    waiting: int = 0  # runs of sessions neither live nor known stopped: asked again later
    unclaimed: int = 0  # claimed by a worker that stopped before starting them: sent again
    retries: int = 0  # failed or timed-out attempts given a new one (their backoff later)
    unbuffered: int = 0  # buffered runs whose job's open run ended: sent now
    #: Dependent jobs' runs recorded by the chain pass, by status (leader/chains.py).
    chained: dict[str, int] = dataclasses.field(default_factory=dict)
    chain_cursor: tuple[float, int] | None = None  # where its read of marked runs stopped


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
    leader: str = "leader",
    defaults: Defaults | None = None,
    chain_after: tuple[float, int] | None = None,
    worker_tags: Mapping[str, frozenset[str]] | None = None,
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
    host leads (docs/DESIGN.md invariant 8).

    Last in the same transaction, the chain pass (:mod:`qcluster.leader.chains`) records
    the runs of dependent jobs whose parents' runs have ended (``leader``: the node id
    it writes; ``defaults``: the ``[scheduler]`` policies of their rows; ``chain_after``:
    where the previous pass's read of marked runs stopped, ``chain_cursor`` of its result).

    ``worker_tags`` (node id -> tags, of the live workers) explains a run that asked for
    tags and is missed: whether any live worker has them."""
    r = schema.runs
    out = RecoveryResult()
    live = set(live_workers)
    with db.read() as conn:
        open_runs = conn.execute(
            sa.select(*_COLUMNS).where(r.c.status.in_(runs.OPEN))
        ).all()
        to_retry = conn.execute(
            sa.select(*_COLUMNS, r.c.error, r.c.retry_backoff, r.c.retry_max_backoff)
            .where(r.c.status.in_(runs.RETRIABLE), r.c.retries_left > 0)
        ).all()
    suspects: dict[str, list[Key]] = {}
    nodes: dict[str, str] = {}
    for row in open_runs:
        if row.status in _UNCLAIMED:
            continue
        if (row.worker, row.worker_session) not in live:
            suspects.setdefault(row.worker_session, []).append((row.id, row.attempt))
            nodes[row.worker_session] = row.worker
    verdicts = (judge or _all_stopped)(suspects, nodes) if suspects else {}
    with db.fenced(epoch) as conn:
        if now is None:
            now = db.now(conn)
        for row in to_retry:
            _retry_failed(conn, row, epoch, now, out)
        for row in open_runs:
            if row.status == RunStatus.SCHEDULED:
                _unsent(conn, row, epoch, now, grace_seconds, out, worker_tags)
                continue
            if row.status == RunStatus.BUFFERED:
                continue
            verdict = verdicts.get(row.worker_session)
            fate, reason = ("held", "") if verdict is None else _fate(conn, row, verdict, out)
            if fate == "held":
                if row.status == RunStatus.DISPATCHED:
                    _not_started(conn, row, now, grace_seconds, out)
            elif fate == "stopped":
                _orphaned(conn, row, epoch, now, row.max_attempts or max_attempts, reason, out)
        _unbuffer(conn, epoch, now, out)
        chained = chain_runs(conn, epoch, leader, now=now, grace=grace_seconds,
                             defaults=defaults or Defaults(), after=chain_after)
        out.resend.extend(chained.send)
        out.chained, out.chain_cursor = chained.recorded, chained.cursor
    out.bulk.sort(key=lambda run: run["scheduled_at"])
    del out.bulk[BULK_PER_PASS:]
    return out


_UNCLAIMED = (RunStatus.SCHEDULED, RunStatus.BUFFERED)
_r = schema.runs
_COLUMNS = (_r.c.id, _r.c.job_id, _r.c.func, _r.c.args, _r.c.kwargs, _r.c.scheduled_at,
            _r.c.attempt, _r.c.recover, _r.c.status, _r.c.worker, _r.c.worker_session,
            _r.c.epoch, _r.c.created_at, _r.c.max_attempts, _r.c.deaths,
            _r.c.cancel_requested, _r.c.due_at, _r.c.backfill, _r.c.dispatched_at,
            _r.c.routing,
            # the job's own misfire grace, kept by the run (by its job for a run made
            # before 0005); NULL: [scheduler] misfire_grace_seconds
            sa.func.coalesce(_r.c.grace, sa.select(schema.jobs.c.misfire_grace_seconds)
                             .where(schema.jobs.c.id == _r.c.job_id).scalar_subquery())
            .label("job_grace"))
#: How long before its start a run that waits (a retry's backoff) is sent.
SEND_AHEAD = 1.0


def _retry_failed(conn: Any, row: Any, epoch: int, now: float, out: RecoveryResult) -> None:
    """A failed or timed-out attempt with a retry left: attempt + 1, after its backoff
    (docs/DESIGN.md, "Job policies"); none if its cancel was asked or its job is gone."""
    if row.cancel_requested is not None:  # (a removed job's: store/cancels ended them)
        runs.give_up_retries(conn, row.id, row.attempt, "its cancel was asked")
        return
    base = row.retry_backoff or 0.0
    delay = backoff(row.id, row.attempt, base, row.retry_max_backoff or base) if base else 0.0
    due = round(now + delay, 6)
    if not runs.retry_failed(conn, row.id, row.attempt, epoch=epoch, now=now, due_at=due,
                             error=f"retry {row.attempt} after {row.status}: "
                                   f"{(row.error or '')[:1000]}"):
        return
    out.retries += 1
    log.info("run %d of job %s %s on attempt %d: attempt %d in %.3gs", row.id, row.job_id,
             row.status, row.attempt, row.attempt + 1, delay)
    if due <= now + SEND_AHEAD:
        out.resend.append(records.run_record(row.id, row.job_id, row.func, row.args,
                                             row.kwargs, row.scheduled_at, row.attempt + 1,
                                             epoch, row.recover, row.routing))


def _unbuffer(conn: Any, epoch: int, now: float, out: RecoveryResult) -> None:
    """For each job with ``buffered`` runs and nothing else open (no run scheduled,
    dispatched or running, no retry to come): its oldest buffered run is sent now. Read
    in the fenced transaction, after this pass's changes."""
    r = schema.runs
    busy = sa.select(r.c.job_id).where(
        sa.or_(r.c.status.in_([s for s in runs.OPEN if s != RunStatus.BUFFERED]),
               sa.and_(r.c.status.in_(runs.RETRIABLE), r.c.retries_left > 0)))
    oldest = conn.execute(
        sa.select(r.c.job_id, sa.func.min(r.c.scheduled_at).label("at"))
        .where(r.c.status == RunStatus.BUFFERED, r.c.job_id.not_in(busy))
        .group_by(r.c.job_id)
    ).all()
    for job_id, at in oldest:
        # Every run of that fire time: one, or one per slot (a sharded or broadcast job's).
        for run_id in conn.execute(sa.select(r.c.id).where(
                r.c.job_id == job_id, r.c.scheduled_at == at,
                r.c.status == RunStatus.BUFFERED).order_by(r.c.id)).scalars():
            record = runs.unbuffer(conn, run_id, epoch=epoch, now=now)
            if record is not None:
                out.unbuffered += 1
                out.resend.append(record)
                log.info("run %d of job %s is sent: the job's previous run has ended",
                         record["run_id"], job_id)


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
            out: RecoveryResult, worker_tags: Mapping[str, frozenset[str]] | None) -> None:
    """A ``scheduled`` row: sent (again) once due, unless its writer has just sent it;
    ``missed`` past its grace, counted from when it was due to start (``due_at``: a
    jitter, a backfill) or its fire time, or from when it was written if that was later
    (a make-up run of ``run-once``/``run-all``, a leader that fell behind: the leader
    judged it within its catch-up window then). The grace is the job's own, else
    ``grace``."""
    grace = row.job_grace or grace
    due = row.scheduled_at if row.due_at is None else row.due_at
    if due > now + SEND_AHEAD:
        return  # a retry's backoff, a jitter: not yet
    if row.backfill:  # waits its turn in the bulk lane, for up to BACKFILL_WAIT
        limit, why = BACKFILL_WAIT, (f"backfill run never dispatched within "
                                     f"{BACKFILL_WAIT / 3600:.0f}h: no free worker slot")
    else:
        limit, why = grace, f"never dispatched within the misfire grace time ({grace:.0f}s)"
    # Past its grace first, fresh or not: a grace shorter than STALE_SCHEDULED (a run held
    # or parked by its routing, a dispatcher that fell behind) is judged at the next pass.
    # The worker's claim filters on `scheduled` too: of the two, one writes.
    pinned = _pinned_gone(row.routing, worker_tags)  # a retry of it can go nowhere else
    if (row.attempt == 1 or pinned) and now - max(due, row.created_at) > limit:
        why += _unroutable(conn, row.routing, worker_tags)
        if runs.mark_missed(conn, row.id, row.attempt, row.status, now=now, error=why):
            out.missed += 1
            if row.routing is not None:
                log.warning("run %d of job %s is missed: %s", row.id, row.job_id, why)
        return
    sent_at_once = row.due_at is None or row.due_at <= row.created_at + SEND_AHEAD
    if row.epoch == epoch and row.created_at > now - STALE_SCHEDULED and sent_at_once:
        return  # ours and fresh: the dispatcher still has it
    (out.bulk if row.backfill else out.resend).append(records.run_record(
        row.id, row.job_id, row.func, row.args, row.kwargs, row.scheduled_at, row.attempt,
        epoch, row.recover, row.routing))


def _pinned_gone(text: str | None, worker_tags: Mapping[str, frozenset[str]] | None) -> bool:
    """Whether a run of routing ``text`` may go to one worker only (a broadcast run) and
    that worker is not a live member."""
    if text is None or worker_tags is None:
        return False
    worker = records.routing_of(text).worker
    return worker is not None and worker not in worker_tags


def _unroutable(conn: Any, text: str | None,
                worker_tags: Mapping[str, frozenset[str]] | None) -> str:
    """Why a run of routing ``text`` (its row's) could not be sent, if its routing says
    ("": it says nothing): no live worker with its tags, or its group's worker lacks them."""
    want = records.routing_of(text)
    if worker_tags is None or want == records.ANYWHERE:
        return ""
    tags = ", ".join(sorted(want.tags))
    if want.worker is not None:
        return ("" if want.worker in worker_tags
                else f": its worker {want.worker} (a broadcast run) is not a live member")
    if want.group is not None:
        node = groups.placements(conn, [want.group]).get(want.group)
        if node is None or node not in worker_tags:
            return f": its affinity group {want.group!r} has no live worker"
        if not want.tags <= worker_tags[node]:
            return (f": its affinity group {want.group!r} sits on worker {node}, which lacks "
                    f"the tags {tags}")
        return f": its affinity group {want.group!r} sits on worker {node}"
    if want.tags and not any(want.tags <= have for have in worker_tags.values()):
        return f": no live worker has the tags {tags}"
    return ""


def _not_started(conn: Any, row: Any, now: float, grace: float, out: RecoveryResult) -> None:
    """A live worker claimed it and has not started it: missed once past the grace,
    counted from the fire time, or from when the row was written if later (a retry, a
    make-up run written late within its catch-up window). The grace is the job's own,
    else ``grace``."""
    grace = row.job_grace or grace
    since = max(row.scheduled_at, row.created_at)
    if row.due_at is not None:
        since = max(since, row.due_at)
    if row.backfill and row.dispatched_at is not None:
        since = max(since, row.dispatched_at)  # it waited its turn unsent: from its claim
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
        if records.routing_of(row.routing).worker is not None:
            again = "a broadcast run: its worker is gone, and no other runs it"
        elif deaths >= QUARANTINE_DEATHS:
            again = f"quarantined: its worker died on {deaths} attempts"
        elif row.cancel_requested is not None:
            again = "cancelled: no further attempt"
        elif row.attempt >= bound:
            again = f"no attempt left (max_attempts {bound})"
    error = reason if again is None or not row.recover else f"{again}; {reason}"
    if not runs.mark_lost(conn, row.id, row.attempt, row.status, now=now, error=error,
                          keep_retries=row.recover and again is None):
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
                                         row.scheduled_at, row.attempt + 1, epoch, row.recover,
                                         row.routing))


#: Runs of one job quarantined after which the job itself is set aside.
QUARANTINED_RUNS = 2


def _quarantine_job(conn: Any, job_id: str, run_id: int) -> None:
    """A job whose every run kills its worker would still crash-loop the cluster, one
    run at a time: once :data:`QUARANTINED_RUNS` of its runs are quarantined with no run
    of it succeeding in between (by fire time), the job is set aside (``broken``, with
    the reason; a job change clears it). A job that succeeds between two unlucky runs
    (their workers killed by something else) is not poison, and keeps firing."""
    r = schema.runs
    last_ok = (sa.select(sa.func.max(r.c.scheduled_at))
               .where(r.c.job_id == job_id, r.c.status == RunStatus.SUCCEEDED)
               .scalar_subquery())
    quarantined = conn.execute(
        sa.select(sa.func.count()).select_from(r)
        .where(r.c.job_id == job_id, r.c.status == RunStatus.LOST,
               r.c.error.like("quarantined:%"),
               r.c.scheduled_at > sa.func.coalesce(last_ok, -1.0))).scalar_one()
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
