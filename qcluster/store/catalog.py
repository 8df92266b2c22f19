"""Job changes and queries, on a connection the caller opened: the owner of ``qc_jobs``.

Every write to ``qc_jobs`` is a function of this module (``tests/store/test_owners.py``),
as every write to ``qc_runs`` is one of :mod:`qcluster.store.runs`. This module owns the
table rather than :mod:`qcluster.store.jobstore` because its functions work on the
caller's connection, the shape the owners of tables have here: the caller opens the
fenced transaction (docs/DESIGN.md invariant 1) and one transaction may write several
tables. ``SqlJobStore`` is an adapter to APScheduler's job-store interface: it opens its
fenced transactions and calls :func:`apply_advances`, :func:`set_next_run_time`,
:func:`delete_job`, :func:`delete_all_jobs` and :func:`set_broken` inside them. So the row
version rule lives in one file: a job change (``upsert_jobs``, ``pause_job``,
``resume_job``, and ``set_next_run_time`` for APScheduler's ``update_job``) adds one to
``version``; an advance (:func:`apply_advances`) applies only at the version it read.

The leader's control object runs the job changes inside its fenced transaction; the CLI,
when no leader is alive, runs them inside a transaction fenced on the epoch it read.
Either way one call is one transaction: a batch of 10,000 jobs is written whole or not
at all.

``apply`` of a job whose trigger is unchanged keeps its stored next run time, so the
fire times missed while the cluster was down are not lost (unlike APScheduler's
``replace_existing=True``).

"Now" here (a new job's first fire time, a resume's, a run-now's fire time, the
``created_at``/``updated_at`` stamps) is the database's time, read on the caller's
connection (``store/db.database_now``), unless the caller gives one: a CLI on a host whose
clock is off does not store a first fire time in the past (which the leader would record
as missed) or in the future (docs/DESIGN.md invariant 8). An interval's anchor is the one
exception: ``definitions/triggers.make_spec`` takes it from the client's clock before any
connection, so a client ahead by ``d`` delays an interval job's first fire by ``d``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from qcluster.definitions.jobdefs import JobDef
from qcluster.definitions.policy import NONE, Defaults, from_stored, run_fields
from qcluster.definitions.triggers import build_trigger, describe
from qcluster.errors import InputError, JobExists, JobNotFound
from qcluster.store import calendars, groups, schema
from qcluster.store.db import database_now, now_expr
from qcluster.store.records import RunRecord
from qcluster.store.runs import FireRow, RunStatus, insert_runs

_CHUNK = 500
DEFAULTS = Defaults()


@dataclasses.dataclass
class ApplyResult:
    created: list[str] = dataclasses.field(default_factory=list)
    updated: list[str] = dataclasses.field(default_factory=list)
    unchanged: list[str] = dataclasses.field(default_factory=list)
    removed: list[str] = dataclasses.field(default_factory=list)
    #: Of ``updated``, the jobs whose next fire time the update left as it was (the same
    #: schedule, not paused): for ``store/cancels``, not sent.
    kept_schedule: list[str] = dataclasses.field(default_factory=list)

    def to_wire(self) -> dict[str, list[str]]:
        return {"created": self.created, "updated": self.updated,
                "unchanged": self.unchanged, "removed": self.removed}


def first_fire(jd: JobDef, now: float) -> float | None:
    """The job's first fire time after ``now``, and not before its ``start`` policy."""
    start = jd.policy.start_ts
    since = now if start is None else max(now, start)
    nxt = build_trigger(jd.trigger).get_next_fire_time(None, datetime.fromtimestamp(since, UTC))
    end = jd.policy.end_ts
    if nxt is None or (end is not None and nxt.timestamp() > end):
        return None
    return float(nxt.timestamp())


class _FirstFires:
    """``first_fire`` at one ``now``, computed once per distinct trigger. It runs inside
    the caller's transaction, which the session's idle_in_transaction_session_timeout
    (shorter than the lease, store/db.py) ends if Python keeps it waiting too long:
    10,000 jobs on a hundred schedules cost a hundred computations, not 2 s of them."""

    def __init__(self, now: float, oldest: float | None = None) -> None:
        self.now, self.oldest = now, oldest
        self._known: dict[str, float | None] = {}

    def __call__(self, jd: JobDef) -> float | None:
        key = json.dumps([jd.trigger, jd.policy.start, jd.policy.end], sort_keys=True)
        if key not in self._known:
            self._known[key] = first_fire(jd, self.now)
        first = self._known[key]
        if first is not None and self.oldest is not None and first < self.oldest:
            days = (self.now - self.oldest) / 86400
            when = datetime.fromtimestamp(first, UTC).isoformat()
            raise InputError(f"job {jd.id!r}: its fire time {when} is older than the runs "
                             f"kept ([runs] retention_days = {days:g}); its run could not "
                             "be recorded")
        return first


def _row_values(jd: JobDef) -> dict[str, Any]:
    return {
        "func": jd.func,
        "trigger": json.dumps(jd.trigger, sort_keys=True),
        "args": json.dumps(list(jd.args)),
        "kwargs": json.dumps(dict(jd.kwargs), sort_keys=True),
        "misfire_grace_seconds": jd.misfire_grace_seconds,
        "coalesce": jd.coalesce,
        "recover": jd.recover,
        "max_attempts": jd.max_attempts,
        "policy": jd.policy.stored(),
    }


def upsert_jobs(
    conn: Connection, defs: Sequence[JobDef], *, replace: bool, now: float | None = None,
    retention_seconds: float | None = None,
) -> ApplyResult:
    """Create the new jobs, and (with ``replace``) update the changed ones. ``now``: by
    default the database's time. InputError, nothing written, if a job's first fire time
    is older than ``retention_seconds`` before ``now`` (a one-off ``--at`` long past: its
    ``missed`` row would be pruned as soon as written, and the job would vanish with no
    record), or if a job excludes a
    calendar that does not exist: checked here, in the caller's transaction, so every way
    of writing a job (the leader's control API, the CLI's direct write) checks it, and
    the calendar cannot be removed before this commits (``store/calendars.missing``)."""
    now = database_now(conn) if now is None else now
    j = schema.jobs
    result = ApplyResult()
    _check_unique(defs)
    _check_calendars(conn, defs)
    existing: dict[str, Row[Any]] = {}
    ids = [jd.id for jd in defs]
    for start in range(0, len(ids), _CHUNK):
        for row in conn.execute(sa.select(j).where(j.c.id.in_(ids[start : start + _CHUNK]))):
            existing[row.id] = row
    inserts: list[dict[str, Any]] = []
    next_fire = _FirstFires(now, None if retention_seconds is None else now - retention_seconds)
    for jd in defs:
        values = _row_values(jd)
        found = existing.get(jd.id)
        if found is not None and _same_schedule(found.trigger, jd.trigger):
            values["trigger"] = found.trigger  # keep the stored interval's anchor
        if found is None:
            inserts.append(
                {"id": jd.id, "next_run_time": next_fire(jd), "paused": False,
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
        if _reschedules(row, jd, values):
            changes["next_run_time"] = next_fire(jd)
        conn.execute(j.update().where(j.c.id == jd.id).values(**changes))
        result.updated.append(jd.id)
        if "next_run_time" not in changes and not row.paused and row.next_run_time is not None:
            result.kept_schedule.append(jd.id)
    for start in range(0, len(inserts), _CHUNK):
        conn.execute(j.insert(), inserts[start : start + _CHUNK])
    _write_edges(conn, defs)
    return result


# -- dependent jobs: the qc_job_deps edges, written with their child ---------------------


def _write_edges(conn: Connection, defs: Sequence[JobDef]) -> None:
    """The edges of the jobs ``defs`` wrote: each job's own (as a child) are replaced by
    those of its ``after`` trigger. InputError (the caller's transaction rolls back) if
    a parent is no job, or if an edge closes a cycle. On PostgreSQL a transaction-scoped
    advisory lock serializes the writers of edges, so that two adds that each close half
    of a cycle cannot both pass the check."""
    d = schema.job_deps
    new = {jd.id: jd.trigger["parents"] for jd in defs if jd.trigger["type"] == "after"}
    if not new and conn.execute(sa.select(d.c.child_id).limit(1)).first() is None:
        return  # no dependent jobs anywhere: nothing to replace (the common case)
    if new and conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _EDGES_LOCK})
    ids = [jd.id for jd in defs]
    for start in range(0, len(ids), _CHUNK):
        conn.execute(d.delete().where(d.c.child_id.in_(ids[start : start + _CHUNK])))
    if not new:
        return
    parents = sorted({p["job"] for ps in new.values() for p in ps})
    j = schema.jobs
    known: set[str] = set()
    for start in range(0, len(parents), _CHUNK):
        known.update(conn.execute(sa.select(j.c.id).where(
            j.c.id.in_(parents[start : start + _CHUNK]))).scalars())
    for child, ps in new.items():
        for p in ps:
            if p["job"] not in known:
                raise InputError(f"job {child!r} runs after {p['job']!r}, which is no job "
                                 "(add it first, or in the same file)")
    rows = [{"child_id": c, "parent_id": p["job"], "condition": p["on"]}
            for c, ps in new.items() for p in ps]
    for start in range(0, len(rows), _CHUNK):
        conn.execute(d.insert(), rows[start : start + _CHUNK])
    _check_acyclic(conn, list(new))


#: The advisory lock key of edge writers (any fixed 64-bit number: "qcdeps" in ASCII).
_EDGES_LOCK = 0x716364657073


def _check_acyclic(conn: Connection, children: Sequence[str]) -> None:
    """InputError naming the cycle if one of ``children`` is its own ancestor. The graph
    was acyclic before, so a cycle goes through a new edge, from a child written now."""
    d = schema.job_deps
    up: dict[str, list[str]] = {}
    for child, parent in conn.execute(sa.select(d.c.child_id, d.c.parent_id)):
        up.setdefault(child, []).append(parent)
    for child in children:
        path = _path_up(up, child, child)
        if path is not None:
            raise InputError("a cycle of dependent jobs: " + " -> ".join(
                repr(x) for x in [child, *path]) + " (each runs after the next)")


def _path_up(up: Mapping[str, list[str]], start: str, target: str) -> list[str] | None:
    """The ancestors from ``start`` up to ``target`` (a depth-first walk, each job once)."""
    stack: list[tuple[str, list[str]]] = [(start, [])]
    seen: set[str] = set()
    while stack:
        node, path = stack.pop()
        for parent in up.get(node, ()):
            if parent == target:
                return [*path, parent]
            if parent not in seen:
                seen.add(parent)
                stack.append((parent, [*path, parent]))
    return None


def children_of(conn: Connection, job_ids: Sequence[str]) -> dict[str, list[str]]:
    """Of ``job_ids``, each one's children (the jobs that run after it)."""
    d = schema.job_deps
    out: dict[str, list[str]] = {}
    ids = list(job_ids)
    for start in range(0, len(ids), _CHUNK):
        for child, parent in conn.execute(
                sa.select(d.c.child_id, d.c.parent_id)
                .where(d.c.parent_id.in_(ids[start : start + _CHUNK]))
                .order_by(d.c.child_id)):
            out.setdefault(parent, []).append(child)
    return out


def _check_no_orphans(conn: Connection, removed: Sequence[str]) -> None:
    """InputError if a job that stays runs after one of ``removed``."""
    gone = set(removed)
    for parent, children in children_of(conn, removed).items():
        staying = [c for c in children if c not in gone]
        if staying:
            raise InputError(f"job {staying[0]!r} runs after {parent!r}: remove or change "
                             f"{staying[0]!r} first (or both in one jobs apply --prune)")


def _check_unique(defs: Sequence[JobDef]) -> None:
    seen: set[str] = set()
    for jd in defs:
        if jd.id in seen:
            raise InputError(f"job {jd.id!r} is given twice")
        seen.add(jd.id)


def _reschedules(row: Row[Any], jd: JobDef, values: dict[str, Any]) -> bool:
    """Whether an update computes the job's next fire time again (not paused): a new
    trigger, new start/end bounds, or a new policy for a job that had no fire time left."""
    return not row.paused and bool(
        values["trigger"] != row.trigger
                or _bounds(row.policy) != (jd.policy.start, jd.policy.end)
                or (row.next_run_time is None and values["policy"] != row.policy))


def _bounds(stored: str | None) -> tuple[str | None, str | None]:
    try:
        policy = from_stored(stored)
    except InputError:
        return None, None
    return policy.start, policy.end

def _check_calendars(conn: Connection, defs: Sequence[JobDef]) -> None:
    absent = set(calendars.missing(conn, {n for jd in defs for n in jd.policy.exclude}))
    for jd in defs:
        for name in jd.policy.exclude:
            if name in absent:
                raise InputError(f"job {jd.id!r} excludes calendar {name!r}, which does not "
                                 "exist (add it first: qcluster calendars add)")


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
    _check_no_orphans(conn, gone)
    d = schema.job_deps
    for start in range(0, len(gone), _CHUNK):
        conn.execute(j.delete().where(j.c.id.in_(gone[start : start + _CHUNK])))
        conn.execute(d.delete().where(d.c.child_id.in_(gone[start : start + _CHUNK])))
    return gone


def job_row(conn: Connection, job_id: str) -> Row[Any]:
    """The stored row of ``job_id``; JobNotFound if there is none."""
    j = schema.jobs
    row = conn.execute(sa.select(j).where(j.c.id == job_id)).one_or_none()
    if row is None:
        raise JobNotFound(f"no job {job_id!r}")
    return row


def pause_job(conn: Connection, job_id: str) -> None:
    j = schema.jobs
    row = job_row(conn, job_id)
    conn.execute(
        j.update().where(j.c.id == job_id)
        .values(paused=True, next_run_time=None, version=row.version + 1,
                updated_at=now_expr(conn.dialect.name))
    )


def resume_job(conn: Connection, job_id: str, now: float | None = None) -> None:
    """Resume from now (by default the database's time): fire times that fell inside the
    pause are skipped, not made up."""
    j = schema.jobs
    now = database_now(conn) if now is None else now
    row = job_row(conn, job_id)
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
    """Remove a job a user named: InputError if another job runs after it."""
    job_row(conn, job_id)
    _check_no_orphans(conn, [job_id])
    delete_job(conn, job_id)


# -- the job store's writes (qcluster/store/jobstore.py), in its fenced transactions ------


@dataclasses.dataclass(frozen=True)
class Advance:
    """Move a job to its next fire time, adding ``runs`` to its ``runs_made``. ``None``:
    no fire time left: the job is removed, unless ``keep`` (it ended by its ``end`` or
    ``max_runs`` policy: the row stays, with no next fire time, to be seen)."""

    job_id: str
    version: int
    next_run_time: float | None
    runs: int = 0
    keep: bool = False


def apply_advances(conn: Connection, advances: Sequence[Advance]) -> None:
    """Apply each advance only if the job's row is still at the version it read (a job
    changed meanwhile keeps its new schedule); a job with no fire time left is deleted
    (unless the advance keeps it). Rows are taken in job id order, as every writer of
    many job rows takes them (no deadlock between two such writers)."""
    ordered = sorted(advances, key=lambda a: a.job_id)
    moves = [a for a in ordered if a.next_run_time is not None or a.keep]
    done = [a for a in ordered if a.next_run_time is None and not a.keep]
    if conn.dialect.name == "postgresql":
        # One statement of column arrays, whatever the count: a pass advances up to
        # [scheduler] batch_size jobs, and one UPDATE per job (executemany) was 15% of the
        # leader's CPU at 2,000 fires/s (issue 18).
        if moves:
            conn.execute(_ADVANCE, {"ids": [a.job_id for a in moves],
                                    "versions": [a.version for a in moves],
                                    "nexts": [a.next_run_time for a in moves],
                                    "runs": [a.runs for a in moves]})
        if done:
            conn.execute(_ENDED, {"ids": [a.job_id for a in done],
                                  "versions": [a.version for a in done]})
        return
    j = schema.jobs
    if moves:
        conn.execute(
            j.update()
            .where(j.c.id == sa.bindparam("b_id"), j.c.version == sa.bindparam("b_version"))
            .values(next_run_time=sa.bindparam("b_next"),
                    runs_made=j.c.runs_made + sa.bindparam("b_runs")),
            [{"b_id": a.job_id, "b_version": a.version, "b_next": a.next_run_time,
              "b_runs": a.runs} for a in moves],
        )
    if done:  # one statement for a burst of one-off jobs, not one per job
        conn.execute(
            j.delete().where(j.c.id == sa.bindparam("b_id"),
                             j.c.version == sa.bindparam("b_version")),
            [{"b_id": a.job_id, "b_version": a.version} for a in done],
        )


_ADVANCE = sa.text(
    "UPDATE qc_jobs AS j SET next_run_time = v.next, runs_made = j.runs_made + v.runs "
    "FROM unnest(CAST(:ids AS text[]), CAST(:versions AS int[]), CAST(:nexts AS float8[]), "
    "CAST(:runs AS int[])) AS v(id, version, next, runs) "
    "WHERE j.id = v.id AND j.version = v.version")
_ENDED = sa.text(
    "DELETE FROM qc_jobs AS j USING unnest(CAST(:ids AS text[]), CAST(:versions AS int[])) "
    "AS v(id, version) WHERE j.id = v.id AND j.version = v.version")


def changed_jobs(conn: Connection, versions: Mapping[str, int]) -> set[str]:
    """Of the jobs of ``versions`` (id: the version a pass read), those changed or gone
    since, their rows locked until the caller's transaction ends (PostgreSQL ``FOR
    UPDATE``, in id order; SQLite's one writer holds them anyway): a change that commits
    first is seen here, one that commits later waits for this transaction, then sees its
    runs (``store/cancels``)."""
    j = schema.jobs
    ids = sorted(versions)
    now_at: dict[str, int] = {}
    for start in range(0, len(ids), _CHUNK):
        now_at.update((row.id, row.version) for row in conn.execute(
            sa.select(j.c.id, j.c.version).where(j.c.id.in_(ids[start : start + _CHUNK]))
            .order_by(j.c.id).with_for_update()))
    return {i for i in ids if now_at.get(i) != versions[i]}


def set_next_run_time(conn: Connection, job_id: str, next_run_time: float | None) -> bool:
    """Set a job's next fire time as a job change (``version`` + 1); whether it exists."""
    j = schema.jobs
    done = conn.execute(
        j.update()
        .where(j.c.id == job_id)
        .values(next_run_time=next_run_time, version=j.c.version + 1,
                updated_at=now_expr(conn.dialect.name))
    ).rowcount
    return bool(done)


def delete_job(conn: Connection, job_id: str) -> bool:
    """Delete one job and its edges as a child; whether it existed. Its edges as a parent
    stay: a one-off parent's row goes once it has fired, and its children still run after
    that run."""
    d = schema.job_deps
    conn.execute(d.delete().where(d.c.child_id == job_id))
    return bool(conn.execute(schema.jobs.delete().where(schema.jobs.c.id == job_id)).rowcount)


def delete_all_jobs(conn: Connection) -> None:
    conn.execute(schema.job_deps.delete())
    conn.execute(schema.jobs.delete())


def set_broken(conn: Connection, broken: Sequence[tuple[str, str]]) -> None:
    """Set these jobs aside: ``broken`` holds why (at most 2,000 characters); the rows are
    kept, and a job change (``upsert_jobs``) clears it."""
    j = schema.jobs
    for job_id, reason in broken:
        conn.execute(j.update().where(j.c.id == job_id).values(broken=reason[:2000]))


def fire_row(row: Row[Any], at: float, status: RunStatus, defaults: Defaults,
             **fields: Any) -> FireRow:
    """A run of the job of ``row`` (a ``qc_jobs`` row) at fire time ``at``, with the job's
    timeout, retries and grace (``defaults`` for those it leaves out); ``fields``: the
    other :class:`FireRow` fields. InputError if its policy cannot be read."""
    return FireRow(row.id, row.func, row.args, row.kwargs, at, status, bool(row.recover),
                   max_attempts=row.max_attempts, grace=row.misfire_grace_seconds,
                   **run_fields(from_stored(row.policy), defaults), **fields)


def run_now(conn: Connection, job_id: str, epoch: int, leader: str,
            now: float | None = None, defaults: Defaults = DEFAULTS) -> RunRecord:
    """Record a run of ``job_id`` scheduled for now (by default the database's time: a
    worker starts it at once unless its own clock is behind the database's); the caller
    dispatches it. It has the job's timeout and retries (``defaults`` for those it leaves
    out); it is not subject to the overlap policy (it is asked for)."""
    return run_now_all(conn, job_id, epoch, leader, now, defaults)[0]


def run_now_all(conn: Connection, job_id: str, epoch: int, leader: str,
                now: float | None = None, defaults: Defaults = DEFAULTS) -> list[RunRecord]:
    """:func:`run_now`, every run it recorded: one per shard of a sharded job. A
    broadcast job is refused (InputError): its runs are one per live worker, which the
    leader knows when it fires, not a change."""
    row = job_row(conn, job_id)
    policy = from_stored(row.policy)
    if policy.broadcast:
        raise InputError(f"job {job_id!r} is broadcast (a run on every live worker at each "
                         "fire time); it cannot be run by hand")
    at = round(database_now(conn) if now is None else now, 6)
    runs = insert_runs(conn, [fire_row(row, at, RunStatus.SCHEDULED, defaults, slot=slot)
                              for slot in policy.slots()], epoch, leader, now=at)
    if not runs:
        raise InputError(f"job {job_id!r} already has a run at this instant; try again")
    return runs


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
        "max_attempts": row.max_attempts,
        **_policy_view(row.policy),
        "runs_made": int(row.runs_made),
        "broken": row.broken,
    }


def _policy_view(text: str | None) -> dict[str, Any]:
    try:
        return from_stored(text).to_wire()
    except InputError as e:  # shown, not fired: the leader sets such a row aside
        return {**NONE.to_wire(), "policy_error": str(e)}


def list_jobs(conn: Connection, limit: int = 0, offset: int = 0) -> list[dict[str, Any]]:
    j = schema.jobs
    query = sa.select(j).order_by(j.c.id).offset(offset)
    if limit:
        query = query.limit(limit)
    return [job_view(r) for r in conn.execute(query)]


def get_job(conn: Connection, job_id: str) -> dict[str, Any]:
    """One job, with ``children``: the jobs that run after it; and ``group_worker``: the
    worker its affinity group sits on (None: no group, or not placed yet)."""
    view = job_view(job_row(conn, job_id))
    group = view.get("group")
    return {**view, "children": children_of(conn, [job_id]).get(job_id, []),
            "group_worker": groups.placements(conn, [group]).get(group) if group else None}


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
        "cancel_requested": iso(row.cancel_requested),
        "due_at": iso(row.due_at),
        "timeout": row.timeout,
        "retries_left": int(row.retries_left),
        "parent_run": None if row.parent_run is None else int(row.parent_run),
        "slot": row.slot,  # "" but for a shard ("3/8") or a broadcast run ("@w1")
    }


def list_runs(
    conn: Connection,
    *,
    job_id: str | None = None,
    status: str | None = None,
    since: float | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """Runs, newest scheduled time first. ``limit=0`` lists them all. Each says whether
    an attempt of it kept output or a result (``has_output``: ``runs show`` prints them)."""
    r, o = schema.runs, schema.run_output
    has_output = sa.exists().where(o.c.run_id == r.c.id).label("has_output")
    query = sa.select(r, has_output).order_by(r.c.scheduled_at.desc(), r.c.id.desc())
    if job_id is not None:
        query = query.where(r.c.job_id == job_id)
    if status is not None:
        query = query.where(r.c.status == status)
    if since is not None:
        query = query.where(r.c.scheduled_at >= since)
    if limit:
        query = query.limit(limit)
    return [{**run_view(row), "has_output": bool(row.has_output)}
            for row in conn.execute(query)]


def get_run(conn: Connection, run_id: int) -> dict[str, Any]:
    """One run (as :func:`list_runs` gives it) with what each of its attempts kept:
    ``attempts``, a list of ``{"attempt", "output", "result"}`` (only attempts that wrote
    or returned something), oldest first. InputError if there is no such run."""
    r, o = schema.runs, schema.run_output
    row = conn.execute(sa.select(r).where(r.c.id == run_id)).first()
    if row is None:
        raise InputError(f"no run {run_id} (runs list shows the runs kept)")
    kept = conn.execute(
        sa.select(o.c.attempt, o.c.output, o.c.result).where(o.c.run_id == run_id)
        .order_by(o.c.attempt)
    ).all()
    attempts = [{"attempt": int(k.attempt), "output": k.output, "result": k.result}
                for k in kept]
    return {**run_view(row), "has_output": bool(attempts), "attempts": attempts}
