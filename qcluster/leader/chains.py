"""Dependent jobs: the leader decides each child's run once its parents' runs have ended
(docs/DESIGN.md, "Dependent jobs"; ``jobs add B --after A``).

A run of a job that has children is marked ``chain`` when it is recorded
(``store/runs.insert_runs``). Every recovery pass, in its transaction fenced on the
leader's epoch, :func:`chain_runs` reads the marked runs through a partial index that
holds only them, and for each of their children decides the child's run *of the same
fire time*:

* every parent of the child has a run of that fire time that has ended, each as its
  condition asks (``success``: succeeded; ``failure``: failed, timed out, lost or
  interrupted, its final attempt, retries spent; ``always``: either): the child's run is
  recorded ``scheduled`` and sent, its ``parent_run`` the parent run that ended last;
* a parent's run ended otherwise (it failed and the child runs on success; it was missed,
  skipped or cancelled, so its code never ran): the child's run is recorded ``skipped``,
  with the reason; so is a paused or set-aside child's;
* a parent has no run of that fire time a grace after it (the job's own misfire grace,
  else ``[scheduler]``'s): ``missed``, naming that parent. Parents on different schedules
  never meet: a child waits for all of its parents *of the same fire*, as Airflow's
  dependencies are of one logical date, because a join (B needs the night's A and C) is
  what several parents are for.

The child's row is keyed on (child, the parent's fire time), the key of every run
(``uq_qc_runs_job_time``), and written by ``insert_runs``, which skips a key already
recorded: it is written once, whichever leader decides and however often a pass is
repeated after a crash. A parent retried (a failed attempt with retries left, a
``recover`` run lost and sent again) has not ended: its child waits for the last attempt,
so a parent that succeeds on its third attempt triggers its child once. A sharded or
broadcast parent (several runs of one fire time) would trigger its child once too, after
all of them. The mark is cleared once every child of the run has its row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from qcluster.definitions.policy import Defaults
from qcluster.errors import InputError
from qcluster.store import catalog, schema
from qcluster.store.records import RunRecord
from qcluster.store.runs import RETRIABLE, FireRow, RunStatus, chain_decided, insert_runs
from qcluster.store.runs.states import OPEN, WITHDRAWN

#: Marked runs read per pass (oldest fire time first); the rest wait for the next pass.
PER_PASS = 5000
_CHUNK = 500
_FAILURE = (RunStatus.FAILED, RunStatus.TIMED_OUT, RunStatus.LOST, RunStatus.INTERRUPTED)
#: The statuses each condition is met by.
MEETS = {"success": (RunStatus.SUCCEEDED,), "failure": _FAILURE,
         "always": (RunStatus.SUCCEEDED, *_FAILURE)}


#: Where a pass that read :data:`PER_PASS` marked runs stopped (fire time, run id): the
#: next pass reads on from there. None: the pass read to the end; the next starts over.
Cursor = tuple[float, int]


@dataclasses.dataclass
class ChainResult:
    send: list[RunRecord] = dataclasses.field(default_factory=list)  # scheduled children
    recorded: dict[str, int] = dataclasses.field(default_factory=dict)  # by status
    cursor: Cursor | None = None


def ended(row: Any) -> bool:
    """Whether a run has ended for its children: not open, no retry to come, and not
    withdrawn (a fire-ahead run taken back may be fired again in the same row)."""
    if row.status in OPEN:
        return False
    if row.status in RETRIABLE and row.retries_left > 0:
        return False
    return not (row.status == RunStatus.CANCELLED and (row.error or "").startswith(WITHDRAWN))


def _marked_and_ended() -> sa.ColumnElement[bool]:
    """:func:`ended` in SQL, for the runs still marked (read through the partial index)."""
    r = schema.runs
    return sa.and_(
        sa.text("chain"), r.c.status.not_in(OPEN),
        sa.not_(sa.and_(r.c.status.in_(RETRIABLE), r.c.retries_left > 0)),  # a retry to come
        sa.not_(sa.and_(r.c.status == RunStatus.CANCELLED,
                        sa.func.coalesce(r.c.error, "").startswith(WITHDRAWN,
                                                                    autoescape=True))))


def ready(conn: Connection, since: float) -> bool:
    """Whether a marked run has ended at or after ``since`` (its ``finished_at``): a chain
    pass has new work. One read of the partial index, so a leader can ask often; runs
    that wait (a join whose other parent has not run) do not make it ask again."""
    r = schema.runs
    # In the index's order: a LIMIT without it let a planner with no statistics yet (a
    # new table) read the whole table (migrations/versions/0010).
    return conn.execute(sa.select(r.c.id).where(
        _marked_and_ended(), r.c.finished_at >= since)
        .order_by(r.c.scheduled_at, r.c.id).limit(1)).first() is not None


def chain_runs(conn: Connection, epoch: int, leader: str, *, now: float, grace: float,
               defaults: Defaults, after: Cursor | None = None,
               since: float | None = None) -> ChainResult:
    """One chain pass, in the caller's transaction fenced on ``epoch``. The leader runs
    one at the end of every recovery pass, and between those every
    ``leader/role.CHAIN_INTERVAL`` when :func:`ready` says there is work, so a child
    starts soon after its parent ends.

    It reads at most :data:`PER_PASS` marked runs, by fire time from ``after`` (the
    previous pass's :attr:`ChainResult.cursor`), so that runs which wait for long (a join
    whose other parent has no run yet, within a long grace; a withdrawn run) cannot hold
    the others back: every marked run is read within a few passes. ``since``: only runs
    that ended then or later (the passes between two recovery passes)."""
    r, d = schema.runs, schema.job_deps
    out = ChainResult()
    query = sa.select(*_RUN).where(_marked_and_ended())
    if since is not None:
        query = query.where(r.c.finished_at >= since)
    if after is not None:
        at, run_id = after
        query = query.where(sa.tuple_(r.c.scheduled_at, r.c.id)
                            > sa.tuple_(sa.literal(at), sa.literal(run_id)))
    marked = conn.execute(query.order_by(r.c.scheduled_at, r.c.id).limit(PER_PASS)).all()
    if len(marked) == PER_PASS:
        out.cursor = (float(marked[-1].scheduled_at), int(marked[-1].id))
    if not marked:
        return out
    down: dict[str, list[str]] = {}
    up: dict[str, list[tuple[str, str]]] = {}
    for child, parent, condition in conn.execute(
            sa.select(d.c.child_id, d.c.parent_id, d.c.condition)):
        down.setdefault(parent, []).append(child)
        up.setdefault(child, []).append((parent, condition))
    wanted = {(c, m.scheduled_at) for m in marked for c in down.get(m.job_id, ())}
    needed = wanted | {(p, at) for c, at in wanted for p, _ in up[c]}
    runs = _runs_at(conn, needed)
    jobs = _jobs(conn, sorted({c for c, _ in wanted}))
    fires: list[FireRow] = []
    for child, at in sorted(wanted, key=lambda k: (k[1], k[0])):
        job = jobs.get(child)
        if (child, at) in runs or job is None:
            continue
        fire = _decide(job, at, up[child], runs, now=now, grace=grace, defaults=defaults)
        if fire is not None:
            fires.append(fire)
    for record in insert_runs(conn, fires, epoch, leader, now=now):
        out.send.append(record)
    for fire in fires:
        out.recorded[fire.status] = out.recorded.get(fire.status, 0) + 1
    decided = set(runs) | {(f.job_id, f.scheduled_at) for f in fires}
    clear = [m.id for m in marked
             if all((c, m.scheduled_at) in decided for c in down.get(m.job_id, ()))]
    chain_decided(conn, clear)
    return out


_r = schema.runs
_RUN = (_r.c.id, _r.c.job_id, _r.c.scheduled_at, _r.c.status, _r.c.retries_left,
        _r.c.error, _r.c.finished_at)


def _runs_at(conn: Connection, keys: set[tuple[str, float]]
             ) -> dict[tuple[str, float], list[Any]]:
    """The runs of each (job, fire time) of ``keys`` that has any: one for most jobs,
    one per slot for a sharded or broadcast job's."""
    r = schema.runs
    found: dict[tuple[str, float], list[Any]] = {}
    ordered = sorted(keys)
    for start in range(0, len(ordered), _CHUNK):
        for row in conn.execute(sa.select(*_RUN).where(
                sa.tuple_(r.c.job_id, r.c.scheduled_at).in_(ordered[start:start + _CHUNK]))):
            found.setdefault((row.job_id, row.scheduled_at), []).append(row)
    return found


def _jobs(conn: Connection, ids: Sequence[str]) -> dict[str, Any]:
    j = schema.jobs
    out: dict[str, Any] = {}
    for start in range(0, len(ids), _CHUNK):
        for row in conn.execute(sa.select(j).where(j.c.id.in_(ids[start:start + _CHUNK]))):
            out[row.id] = row
    return out


def _decide(job: Any, at: float, parents: Sequence[tuple[str, str]],
            runs: Mapping[tuple[str, float], list[Any]], *, now: float, grace: float,
            defaults: Defaults) -> FireRow | None:
    """The child run of ``job`` for fire time ``at``, or None to wait. A parent with
    several runs of the fire time (shards, a broadcast) counts once all of them ended,
    and meets the condition when each of them does."""
    last: Any = None
    absent: list[str] = []
    for parent, condition in parents:
        found = runs.get((parent, at))
        if not found:
            absent.append(parent)
            continue
        if not all(ended(run) for run in found):
            return None
        for run in sorted(found, key=lambda r: r.id):
            if run.status not in MEETS[condition]:
                what = ("its code did not run" if run.status not in MEETS["always"]
                        else f"{job.id!r} runs after it on {condition}")
                return _fire(job, at, RunStatus.SKIPPED, defaults, run.id, now,
                             f"after {parent!r}: its run {run.id} ended {run.status} "
                             f"({what})")
            if last is None or (run.finished_at or 0.0) >= (last.finished_at or 0.0):
                last = run
    if absent:
        wait = job.misfire_grace_seconds or grace
        if now - at <= wait:
            return None
        return _fire(job, at, RunStatus.MISSED, defaults, None if last is None else last.id,
                     now, f"after {absent[0]!r}: it has no run of this fire time "
                          f"{wait:.0f}s after it (parents on other schedules never meet)")
    assert last is not None
    if job.paused:
        return _fire(job, at, RunStatus.SKIPPED, defaults, last.id, now,
                     f"{job.id!r} is paused")
    if job.broken is not None:
        return _fire(job, at, RunStatus.SKIPPED, defaults, last.id, now,
                     f"{job.id!r} is set aside: {job.broken[:500]}")
    return _fire(job, at, RunStatus.SCHEDULED, defaults, last.id, now, None)


def _fire(job: Any, at: float, status: RunStatus, defaults: Defaults, parent_run: int | None,
          now: float, error: str | None) -> FireRow:
    try:
        return catalog.fire_row(job, at, status, defaults, error=error, parent_run=parent_run,
                                due_at=now if status == RunStatus.SCHEDULED else None)
    except InputError as e:  # not run on policies it does not have: recorded, with why
        return FireRow(job.id, job.func, job.args, job.kwargs, at, RunStatus.SKIPPED,
                       bool(job.recover), parent_run=parent_run,
                       error=f"{job.id!r} has an unreadable policy: {e}"[:2000])
