"""What the dashboard's pages read from the shared database: read-only queries, each a
few index lookups, so that a page stays fast with 10,000 jobs and 1,000,000 runs kept.

- A jobs page is one page of ``qc_jobs`` by id (the filters are on ``qc_jobs`` itself, or
  on the failures of the last 24 h by the (``status``, ``scheduled_at``, ``job_id``)
  index alone), then, for its jobs alone, the
  last run of each (the unique (``job_id``, ``scheduled_at``) index, read backwards, once
  per job) and the counts of the last 24 h (the same index, a range per job).
- A job's runs, and the runs page, read the newest rows first by an index, with a limit.

Times are float UTC seconds; the views give ISO text as ``store/catalog`` does.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from qcluster.store import catalog, schema
from qcluster.store.runs.states import RunStatus

DAY = 86400.0
#: Ends the runs page shows by default: what an operator looks for in the morning.
TROUBLE = (RunStatus.FAILED, RunStatus.TIMED_OUT, RunStatus.LOST, RunStatus.MISSED,
           RunStatus.INTERRUPTED)
OPEN = (RunStatus.DISPATCHED, RunStatus.RUNNING)
JOB_FILTERS = ("all", "active", "paused", "broken", "failing")
#: The runs page's job search reads runs by job id for up to this many matching jobs.
MAX_MATCHED_JOBS = 500


@dataclasses.dataclass(frozen=True)
class JobsPage:
    jobs: list[dict[str, Any]]
    total: int  # jobs matching the filters, over all pages


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def jobs_page(conn: Connection, *, now: float, search: str = "", status: str = "all",
              offset: int = 0, limit: int = 100) -> JobsPage:
    """One page of jobs by id: ``search`` is a part of the id, ``status`` one of
    :data:`JOB_FILTERS` (``failing``: a run of it ended in trouble in the last 24 h). Each
    job has ``last_run`` (or None) and ``day``, its runs of the last 24 h by outcome."""
    j, r = schema.jobs, schema.runs
    where: list[sa.ColumnElement[bool]] = []
    if search:
        where.append(j.c.id.like(_like(search), escape="\\"))
    if status == "active":
        where += [j.c.paused == sa.false(), j.c.broken.is_(None)]
    elif status == "paused":
        where.append(j.c.paused == sa.true())
    elif status == "broken":
        where.append(j.c.broken.is_not(None))
    elif status == "failing":
        failing = (sa.select(r.c.job_id).where(r.c.status.in_(TROUBLE),
                                               r.c.scheduled_at >= now - DAY))
        where.append(j.c.id.in_(failing))
    total = conn.execute(sa.select(sa.func.count()).select_from(j).where(*where)).scalar_one()
    rows = conn.execute(sa.select(j).where(*where).order_by(j.c.id)
                        .offset(offset).limit(limit)).all()
    jobs = [catalog.job_view(row) for row in rows]
    ids = [job["id"] for job in jobs]
    last = last_runs(conn, ids)
    day = day_counts(conn, ids, now)
    for job in jobs:
        job["last_run"] = last.get(job["id"])
        job["day"] = day.get(job["id"], {"succeeded": 0, "failed": 0})
    return JobsPage(jobs, int(total))


def last_runs(conn: Connection, job_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The newest run (by fire time) of each of ``job_ids`` that has one, with its
    ``lateness`` (started minus due, seconds; None if it has not started)."""
    if not job_ids:
        return {}
    r = schema.runs
    newest = (sa.select(r.c.scheduled_at).where(r.c.job_id == schema.jobs.c.id)
              .order_by(r.c.scheduled_at.desc()).limit(1).scalar_subquery())
    pairs = sa.select(schema.jobs.c.id.label("job_id"), newest.label("at")).where(
        schema.jobs.c.id.in_(job_ids)).subquery()
    rows = conn.execute(sa.select(r).join(pairs, sa.and_(r.c.job_id == pairs.c.job_id,
                                                         r.c.scheduled_at == pairs.c.at)))
    return {row.job_id: with_lateness(row) for row in rows}


def day_counts(conn: Connection, job_ids: Sequence[str],
               now: float) -> dict[str, dict[str, int]]:
    """Runs of the last 24 h by fire time, per job: ``succeeded`` and ``failed`` (every
    end in :data:`TROUBLE`)."""
    if not job_ids:
        return {}
    r = schema.runs
    rows = conn.execute(
        sa.select(r.c.job_id, r.c.status, sa.func.count())
        .where(r.c.job_id.in_(job_ids), r.c.scheduled_at >= now - DAY,
               r.c.status.in_((RunStatus.SUCCEEDED, *TROUBLE)))
        .group_by(r.c.job_id, r.c.status))
    counts: dict[str, dict[str, int]] = {}
    for job_id, status, n in rows:
        c = counts.setdefault(job_id, {"succeeded": 0, "failed": 0})
        c["succeeded" if status == RunStatus.SUCCEEDED else "failed"] += int(n)
    return counts


def with_lateness(row: sa.Row[Any]) -> dict[str, Any]:
    view = catalog.run_view(row)
    due = row.due_at if row.due_at is not None else row.scheduled_at
    view["lateness"] = None if row.started_at is None else max(0.0, row.started_at - due)
    view["scheduled"] = float(row.scheduled_at)
    return view


def job_runs(conn: Connection, job_id: str, limit: int = 100) -> list[dict[str, Any]]:
    """The job's newest ``limit`` runs by fire time, each with ``lateness`` and
    ``has_output``."""
    r, o = schema.runs, schema.run_output
    has_output = sa.exists().where(o.c.run_id == r.c.id).label("has_output")
    rows = conn.execute(sa.select(r, has_output).where(r.c.job_id == job_id)
                        .order_by(r.c.scheduled_at.desc()).limit(limit))
    return [{**with_lateness(row), "has_output": bool(row.has_output)} for row in rows]


def runs_page(conn: Connection, *, statuses: Sequence[str], job: str = "",
              limit: int = 100) -> list[dict[str, Any]]:
    """The newest ``limit`` runs (by fire time) with one of ``statuses``, of the jobs
    whose id contains ``job`` (all if empty): the stored jobs' ids, and ``job`` itself
    as an exact id (a removed job's runs show by its whole id)."""
    r, o = schema.runs, schema.run_output
    has_output = sa.exists().where(o.c.run_id == r.c.id).label("has_output")
    query = sa.select(r, has_output).where(r.c.status.in_(statuses))
    if job:
        # The ids of the stored jobs that match, first (qc_jobs is small), then their runs
        # by the (job_id, status) index: a LIKE on qc_runs itself scans every run newest
        # first, 350 ms with 1,000,000 runs when few match (bench/web.py). The exact id
        # is always among them (the runs of a removed job). Beyond MAX_MATCHED_JOBS
        # matches, the LIKE on qc_runs: with that many, its scan soon finds a page.
        j = schema.jobs
        ids = set(conn.execute(sa.select(j.c.id).where(j.c.id.like(_like(job), escape="\\"))
                               .limit(MAX_MATCHED_JOBS + 1)).scalars())
        if len(ids) > MAX_MATCHED_JOBS:
            query = query.where(r.c.job_id.like(_like(job), escape="\\"))
        else:
            query = query.where(r.c.job_id.in_(sorted(ids | {job})))
    rows = conn.execute(query.order_by(r.c.scheduled_at.desc(), r.c.id.desc()).limit(limit))
    return [{**with_lateness(row), "has_output": bool(row.has_output)} for row in rows]


def in_flight(conn: Connection) -> dict[str, int]:
    """Runs sent to a worker or running, by worker."""
    r = schema.runs
    rows = conn.execute(sa.select(r.c.worker, sa.func.count())
                        .where(r.c.status.in_(OPEN), r.c.worker.is_not(None))
                        .group_by(r.c.worker))
    return {str(worker): int(n) for worker, n in rows}


def job_tags(conn: Connection) -> dict[str, list[str]]:
    """Each member's declared ``[worker] tags``."""
    m = schema.members
    out: dict[str, list[str]] = {}
    for node_id, tags in conn.execute(sa.select(m.c.node_id, m.c.tags)):
        out[str(node_id)] = _tag_list(tags)
    return out


def _tag_list(value: object) -> list[str]:
    """A member's ``tags`` column: a JSON list (an old or odd row shows as none)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return []
    return [str(v) for v in value] if isinstance(value, list) else []
