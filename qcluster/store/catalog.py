"""Job changes and queries, on a connection the caller opened.

The leader's control object runs these inside its fenced transaction; the CLI, when no
leader is alive, runs them inside a transaction fenced on the epoch it read. Either way
one call is one transaction: a batch of 10,000 jobs is written whole or not at all.

``apply`` of a job whose trigger is unchanged keeps its stored next run time, so the
fire times missed while the cluster was down are not lost (unlike APScheduler's
``replace_existing=True``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from qcluster.definitions.jobdefs import JobDef
from qcluster.definitions.triggers import build_trigger, describe
from qcluster.errors import InputError, JobExists, JobNotFound
from qcluster.store import schema
from qcluster.store.records import RunRecord
from qcluster.store.runs import FireRow, RunStatus, insert_runs

_CHUNK = 500


@dataclasses.dataclass
class ApplyResult:
    created: list[str] = dataclasses.field(default_factory=list)
    updated: list[str] = dataclasses.field(default_factory=list)
    unchanged: list[str] = dataclasses.field(default_factory=list)
    removed: list[str] = dataclasses.field(default_factory=list)

    def to_wire(self) -> dict[str, list[str]]:
        return dataclasses.asdict(self)


def first_fire(jd: JobDef, now: float) -> float | None:
    nxt = build_trigger(jd.trigger).get_next_fire_time(None, datetime.fromtimestamp(now, UTC))
    return None if nxt is None else float(nxt.timestamp())


def _row_values(jd: JobDef) -> dict[str, Any]:
    return {
        "func": jd.func,
        "trigger": json.dumps(jd.trigger, sort_keys=True),
        "args": json.dumps(list(jd.args)),
        "kwargs": json.dumps(dict(jd.kwargs), sort_keys=True),
        "misfire_grace_seconds": jd.misfire_grace_seconds,
        "coalesce": jd.coalesce,
        "recover": jd.recover,
    }


def upsert_jobs(
    conn: Connection, defs: Sequence[JobDef], *, replace: bool, now: float | None = None
) -> ApplyResult:
    """Create the new jobs, and (with ``replace``) update the changed ones."""
    now = time.time() if now is None else now
    j = schema.jobs
    result = ApplyResult()
    seen: set[str] = set()
    for jd in defs:
        if jd.id in seen:
            raise InputError(f"job {jd.id!r} is given twice")
        seen.add(jd.id)
    existing: dict[str, Row[Any]] = {}
    ids = [jd.id for jd in defs]
    for start in range(0, len(ids), _CHUNK):
        for row in conn.execute(sa.select(j).where(j.c.id.in_(ids[start : start + _CHUNK]))):
            existing[row.id] = row
    inserts: list[dict[str, Any]] = []
    for jd in defs:
        values = _row_values(jd)
        found = existing.get(jd.id)
        if found is not None and _same_schedule(found.trigger, jd.trigger):
            values["trigger"] = found.trigger  # keep the stored interval's anchor
        if found is None:
            inserts.append(
                {"id": jd.id, "next_run_time": first_fire(jd, now), "paused": False,
                 "broken": None, "version": 1, "created_at": now, "updated_at": now, **values}
            )
            result.created.append(jd.id)
            continue
        row = found
        if not replace:
            raise JobExists(f"job {jd.id!r} exists (use --replace to change it)")
        if all(getattr(row, k) == v for k, v in values.items()) and row.broken is None:
            result.unchanged.append(jd.id)
            continue
        changes: dict[str, Any] = {**values, "version": row.version + 1, "updated_at": now,
                                   "broken": None}
        if values["trigger"] != row.trigger and not row.paused:
            changes["next_run_time"] = first_fire(jd, now)
        conn.execute(j.update().where(j.c.id == jd.id).values(**changes))
        result.updated.append(jd.id)
    for start in range(0, len(inserts), _CHUNK):
        conn.execute(j.insert(), inserts[start : start + _CHUNK])
    return result


def _same_schedule(stored: str, new: dict[str, Any]) -> bool:
    """Whether ``new`` fires at the same times as the stored spec.

    An interval typed again (``every = "30s"``) gets a new start, anchored at the moment it
    was parsed; that is the same schedule, and re-applying it must not move the job.
    """
    old = json.loads(stored)
    if old.get("type") == "interval" and new.get("type") == "interval":
        return bool(old["seconds"] == new["seconds"] and old["tz"] == new["tz"])
    return bool(old == new)


def prune_jobs(conn: Connection, keep: Sequence[str]) -> list[str]:
    """Remove every job whose id is not in ``keep``."""
    j = schema.jobs
    keep_set = set(keep)
    gone = [i for i in conn.execute(sa.select(j.c.id)).scalars() if i not in keep_set]
    for start in range(0, len(gone), _CHUNK):
        conn.execute(j.delete().where(j.c.id.in_(gone[start : start + _CHUNK])))
    return gone


def _get_row(conn: Connection, job_id: str) -> Row[Any]:
    j = schema.jobs
    row = conn.execute(sa.select(j).where(j.c.id == job_id)).one_or_none()
    if row is None:
        raise JobNotFound(f"no job {job_id!r}")
    return row


def pause_job(conn: Connection, job_id: str) -> None:
    j = schema.jobs
    row = _get_row(conn, job_id)
    conn.execute(
        j.update().where(j.c.id == job_id)
        .values(paused=True, next_run_time=None, version=row.version + 1, updated_at=time.time())
    )


def resume_job(conn: Connection, job_id: str, now: float | None = None) -> None:
    """Resume from now: fire times that fell inside the pause are skipped, not made up."""
    j = schema.jobs
    now = time.time() if now is None else now
    row = _get_row(conn, job_id)
    if not row.paused:
        return
    nxt = build_trigger(json.loads(row.trigger)).get_next_fire_time(
        None, datetime.fromtimestamp(now, UTC)
    )
    conn.execute(
        j.update().where(j.c.id == job_id)
        .values(paused=False, next_run_time=None if nxt is None else nxt.timestamp(),
                version=row.version + 1, updated_at=now)
    )


def remove_job(conn: Connection, job_id: str) -> None:
    _get_row(conn, job_id)
    conn.execute(schema.jobs.delete().where(schema.jobs.c.id == job_id))


def run_now(conn: Connection, job_id: str, epoch: int, leader: str) -> RunRecord:
    """Record a run of ``job_id`` scheduled for now; the caller dispatches it."""
    row = _get_row(conn, job_id)
    fire = FireRow(job_id, row.func, row.args, row.kwargs, round(time.time(), 6),
                   RunStatus.SCHEDULED, bool(row.recover))
    runs = insert_runs(conn, [fire], epoch, leader)
    if not runs:
        raise InputError(f"job {job_id!r} already has a run at this instant; try again")
    return runs[0]


# -- queries -----------------------------------------------------------------------------


def iso(value: float | None) -> str | None:
    if value is None:
        return None
    return datetime.fromtimestamp(value, UTC).isoformat().replace("+00:00", "Z")


def job_view(row: Row[Any]) -> dict[str, Any]:
    spec = json.loads(row.trigger)
    return {
        "id": row.id,
        "func": row.func,
        "trigger": describe(spec),
        "trigger_spec": spec,
        "next_run_time": iso(row.next_run_time),
        "paused": bool(row.paused),
        "args": json.loads(row.args),
        "kwargs": json.loads(row.kwargs),
        "misfire_grace_seconds": row.misfire_grace_seconds,
        "coalesce": row.coalesce,
        "recover": bool(row.recover),
        "broken": row.broken,
    }


def list_jobs(conn: Connection, limit: int = 0, offset: int = 0) -> list[dict[str, Any]]:
    j = schema.jobs
    query = sa.select(j).order_by(j.c.id).offset(offset)
    if limit:
        query = query.limit(limit)
    return [job_view(r) for r in conn.execute(query)]


def get_job(conn: Connection, job_id: str) -> dict[str, Any]:
    return job_view(_get_row(conn, job_id))


def run_view(row: Row[Any]) -> dict[str, Any]:
    return {
        "run_id": int(row.id),
        "job_id": row.job_id,
        "scheduled_at": iso(row.scheduled_at),
        "status": row.status,
        "attempt": row.attempt,
        "epoch": int(row.epoch),
        "leader": row.leader,
        "worker": row.worker,
        "dispatched_at": iso(row.dispatched_at),
        "started_at": iso(row.started_at),
        "finished_at": iso(row.finished_at),
        "duration": row.duration,
        "error": row.error,
    }


def list_runs(
    conn: Connection,
    *,
    job_id: str | None = None,
    status: str | None = None,
    since: float | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """Runs, newest scheduled time first. ``limit=0`` lists them all."""
    r = schema.runs
    query = sa.select(r).order_by(r.c.scheduled_at.desc(), r.c.id.desc())
    if job_id is not None:
        query = query.where(r.c.job_id == job_id)
    if status is not None:
        query = query.where(r.c.status == status)
    if since is not None:
        query = query.where(r.c.scheduled_at >= since)
    if limit:
        query = query.limit(limit)
    return [run_view(row) for row in conn.execute(query)]
