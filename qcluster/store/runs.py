"""The owner of ``qc_runs``: the run state machine and every write to the table. Promises:

* Nothing else in qcluster writes ``qc_runs`` (tests/store/test_runs.py checks); reading is fine.
* A write makes only the transitions of :data:`TRANSITIONS`, for the writer named there:
  its SQL filters on the statuses they start from, so a row in any other state is left
  alone (the function says it wrote nothing); a status it cannot make is a ValueError.
* The leader's writes (:func:`insert_runs`, :func:`mark_missed`, :func:`mark_lost`,
  :func:`retry`, :func:`cancel`, :func:`cancel_job_runs`, :func:`prune`) run on the
  caller's connection, in the transaction it fenced on its epoch (docs/DESIGN.md
  invariants 1, 3, 6, 7). A worker's writes (:func:`claim`, :func:`start`,
  :func:`write_outcomes`, :func:`release`) are not fenced (invariant 4): each is its own
  transaction, only over the worker's claim (the attempt; after the claim, its session).
* A run's code starts only after :func:`start` moved its row ``dispatched`` ->
  ``running``: the leader's ``dispatched`` -> ``missed``/``cancelled`` and the worker's
  start filter on the same source status, so exactly one of them wins, and a run recorded
  missed or cancelled never starts.
* The record of a run that a leader sends to a worker, :class:`RunRecord`, and its wire
  functions are in :mod:`qcluster.store.records`.
"""

from __future__ import annotations

import dataclasses
import operator
import time
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection

from qcluster.errors import InputError
from qcluster.store import schema
from qcluster.store.db import Database
from qcluster.store.records import RunRecord, run_record


class RunStatus(StrEnum):
    """The ``status`` of a ``qc_runs`` row; the values are what the column stores."""

    SCHEDULED = "scheduled"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    MISSED = "missed"
    LOST = "lost"
    #: Asked by ``runs cancel`` or ``jobs remove`` before it started: it never starts.
    CANCELLED = "cancelled"
    #: Its worker stopped (SIGTERM) before it finished, and said so; no new attempt.
    INTERRUPTED = "interrupted"


#: Not finished yet: what recovery looks after.
OPEN = (RunStatus.SCHEDULED, RunStatus.DISPATCHED, RunStatus.RUNNING)
#: Finished: what retention may delete.
FINISHED = tuple(s for s in RunStatus if s not in OPEN)


class Writer(StrEnum):
    LEADER = "leader"  # fenced on its epoch (or a client with no leader, on the one it read)
    WORKER = "worker"  # over its own claim, not fenced


@dataclasses.dataclass(frozen=True)
class Transition:
    source: RunStatus | None  # None: the row is inserted
    target: RunStatus | None  # None: the row is deleted
    by: Writer
    via: str  # the function of this module that makes it


_S, _L, _W = RunStatus, Writer.LEADER, Writer.WORKER

#: Every change a run row may go through, who may make it, and the function that does.
TRANSITIONS: tuple[Transition, ...] = (
    Transition(None, _S.SCHEDULED, _L, "insert_runs"),  # a fire, or run now
    Transition(None, _S.MISSED, _L, "insert_runs"),  # past the grace, or coalesced
    Transition(_S.SCHEDULED, _S.MISSED, _L, "mark_missed"),  # never sent within the grace
    Transition(_S.DISPATCHED, _S.MISSED, _L, "mark_missed"),  # never started within it
    Transition(_S.SCHEDULED, _S.CANCELLED, _L, "cancel"),
    Transition(_S.DISPATCHED, _S.CANCELLED, _L, "cancel"),  # claimed, not started
    Transition(_S.SCHEDULED, _S.DISPATCHED, _W, "claim"),
    Transition(_S.DISPATCHED, _S.RUNNING, _W, "start"),  # before the job's code runs
    Transition(_S.DISPATCHED, _S.SCHEDULED, _W, "release"),  # a stopping worker's, unstarted
    Transition(_S.RUNNING, _S.SUCCEEDED, _W, "write_outcomes"),
    Transition(_S.RUNNING, _S.FAILED, _W, "write_outcomes"),
    Transition(_S.RUNNING, _S.INTERRUPTED, _W, "write_outcomes"),  # stopped past its grace
    Transition(_S.DISPATCHED, _S.LOST, _L, "mark_lost"),  # its worker left
    Transition(_S.RUNNING, _S.LOST, _L, "mark_lost"),
    Transition(_S.LOST, _S.SCHEDULED, _L, "retry"),  # a recover job: attempt + 1, bounded
    *(Transition(s, None, _L, "prune") for s in FINISHED),  # past the retention window
)


def sources(target: RunStatus | None, by: Writer, via: str | None = None
            ) -> tuple[RunStatus, ...]:
    """The statuses from which ``by`` (through ``via``, if given) may make ``target``
    (None: delete), in enum order."""
    found = {t.source for t in TRANSITIONS
             if t.target == target and t.by == by and via in (None, t.via)}
    return tuple(s for s in RunStatus if s in found)


_CREATES = frozenset(t.target for t in TRANSITIONS if t.source is None and t.by == _L)
_ENDS = frozenset(t.target for t in TRANSITIONS if t.via == "write_outcomes")
_CLAIM_FROM = sources(_S.DISPATCHED, _W)
_START_FROM = sources(_S.RUNNING, _W)
_RELEASE_FROM = sources(_S.SCHEDULED, _W)
_END_FROM = sources(_S.SUCCEEDED, _W)
_MISSED_FROM = sources(_S.MISSED, _L, "mark_missed")
_CANCEL_FROM = sources(_S.CANCELLED, _L)
_LOST_FROM = sources(_S.LOST, _L)
_RETRY_FROM = sources(_S.SCHEDULED, _L)
_PRUNE_FROM = sources(None, _L)
assert all(sources(s, _W) == _END_FROM for s in _ENDS)  # one outcome statement for all


def _status_is(statuses: Sequence[RunStatus]) -> sa.ColumnElement[bool]:
    return sa.or_(*(schema.runs.c.status == s for s in statuses))


def _sql_status(statuses: Sequence[RunStatus]) -> str:
    """``= 'a'`` or ``IN ('a', 'b')``, for SQL text (constants of this module, never input)."""
    if len(statuses) == 1:
        return f"= '{statuses[0]}'"
    return "IN (" + ", ".join(f"'{s}'" for s in statuses) + ")"


# -- the leader's writes, inside the caller's fenced transaction --------------------------


@dataclasses.dataclass(frozen=True)
class FireRow:
    """One fire time to record: ``status`` is ``scheduled`` (to run) or ``missed``."""

    job_id: str
    func: str
    args_json: str
    kwargs_json: str
    scheduled_at: float
    status: RunStatus
    recover: bool
    error: str | None = None
    max_attempts: int | None = None  # the job's bound; None: [runs] max_attempts


def insert_runs(
    conn: Connection, fires: Sequence[FireRow], epoch: int, leader: str
) -> list[RunRecord]:
    """Insert run rows (none → ``scheduled``/``missed``), skipping fire times already
    recorded; return the new ``scheduled`` runs, to be sent once the caller commits."""
    if not fires:
        return []
    refused = {f.status for f in fires} - _CREATES
    if refused:
        raise ValueError(f"a run is not recorded as {', '.join(sorted(map(str, refused)))}")
    now = time.time()
    rows = [
        {"job_id": f.job_id, "scheduled_at": f.scheduled_at, "func": f.func,
         "args": f.args_json, "kwargs": f.kwargs_json, "status": f.status, "attempt": 1,
         "recover": f.recover, "epoch": epoch, "leader": leader, "created_at": now,
         "finished_at": now if f.status == _S.MISSED else None, "error": f.error,
         "max_attempts": f.max_attempts}
        for f in fires
    ]
    by_key = {(f.job_id, f.scheduled_at): f for f in fires}
    out: list[RunRecord] = []
    for start in range(0, len(rows), 500):
        for row in _insert_returning(conn, rows[start : start + 500]):
            if row.status != _S.SCHEDULED:
                continue
            f = by_key[(row.job_id, row.scheduled_at)]
            out.append(run_record(row.id, f.job_id, f.func, f.args_json, f.kwargs_json,
                                  f.scheduled_at, 1, epoch, f.recover))
    return out


_RUN_COLUMNS = (
    ("job_id", "text"), ("scheduled_at", "float8"), ("func", "text"), ("args", "text"),
    ("kwargs", "text"), ("status", "text"), ("attempt", "int"), ("recover", "bool"),
    ("epoch", "bigint"), ("leader", "text"), ("created_at", "float8"),
    ("finished_at", "float8"), ("error", "text"), ("max_attempts", "int"),
)
_UNNEST_INSERT = sa.text(
    f"INSERT INTO qc_runs ({', '.join(c for c, _ in _RUN_COLUMNS)}) "
    f"SELECT * FROM unnest({', '.join(f'CAST(:{c} AS {t}[])' for c, t in _RUN_COLUMNS)}) "
    "ON CONFLICT (job_id, scheduled_at) DO NOTHING "
    "RETURNING id, job_id, scheduled_at, status"
)


def _insert_returning(conn: Connection, rows: list[dict[str, Any]]) -> Any:
    """Insert ``rows``, skipping recorded fire times; the inserted rows come back. On
    PostgreSQL one column array per parameter (``unnest``): 14 parameters whatever the
    batch size, so the driver prepares the statement once, where a multi-row VALUES list
    of 6,500 parameters is parsed again for every batch."""
    if conn.dialect.name == "postgresql":
        return conn.execute(_UNNEST_INSERT, {c: [row[c] for row in rows] for c, _ in _RUN_COLUMNS})
    r = schema.runs
    stmt = (
        sqlite.insert(r)
        .on_conflict_do_nothing(index_elements=["job_id", "scheduled_at"])
        .returning(r.c.id, r.c.job_id, r.c.scheduled_at, r.c.status)
    )
    return conn.execute(stmt, rows)


def mark_missed(conn: Connection, run_id: int, attempt: int, status: RunStatus, *,
                now: float, error: str) -> bool:
    """``scheduled`` → ``missed`` (never sent within its grace) or ``dispatched`` →
    ``missed`` (claimed, but no worker started it within its grace). Only while the row is
    still at ``attempt`` and in ``status`` (what the caller read): a worker's :func:`start`
    filters on ``dispatched`` too, so of the two only one writes. Whether it wrote."""
    if status not in _MISSED_FROM:
        raise ValueError(f"a {status} run does not become missed")
    r = schema.runs
    return conn.execute(
        r.update().where(r.c.id == run_id, r.c.attempt == attempt, r.c.status == status)
        .values(status=_S.MISSED, finished_at=now, error=error)
    ).rowcount > 0


def mark_lost(conn: Connection, run_id: int, attempt: int, status: RunStatus, *,
              now: float, error: str) -> bool:
    """``dispatched``/``running`` → ``lost``: the claim's worker left. Only while the row
    is still at ``attempt`` and in ``status`` (what the caller read). A worker gone while
    the run was ``running`` adds one to ``deaths`` (the job's code may have killed it).
    Whether it wrote."""
    if status not in _LOST_FROM:
        raise ValueError(f"a {status} run does not become lost")
    r = schema.runs
    died = 1 if status == _S.RUNNING else 0
    return conn.execute(
        r.update().where(r.c.id == run_id, r.c.attempt == attempt, r.c.status == status)
        .values(status=_S.LOST, finished_at=now, error=error, deaths=r.c.deaths + died)
    ).rowcount > 0


def retry(conn: Connection, run_id: int, attempt: int, *, epoch: int, now: float,
          error: str) -> bool:
    """``lost`` → ``scheduled`` with ``attempt + 1`` and no claim, recorded by ``epoch``:
    the run of a ``recover`` job, to be sent again. Never for a run whose cancel was
    asked (the filter reads the row as it is now, after any cancel that committed first).
    The caller decides the bound (attempts, deaths). Whether it wrote."""
    r = schema.runs
    return conn.execute(
        r.update().where(r.c.id == run_id, r.c.attempt == attempt, _status_is(_RETRY_FROM),
                         r.c.cancel_requested.is_(None))
        .values(status=_S.SCHEDULED, attempt=attempt + 1, worker=None, worker_session=None,
                dispatched_at=None, started_at=None, finished_at=None, duration=None,
                epoch=epoch, created_at=now, error=error)
    ).rowcount > 0


class Cancelled(NamedTuple):
    """What :func:`cancel` did: ``cancelled`` (it will never start) or ``running`` (it
    goes on, Python threads cannot be killed, but gets no further attempt)."""

    run_id: int
    status: RunStatus
    attempt: int


def cancel(conn: Connection, run_id: int, *, now: float, reason: str) -> Cancelled:
    """Stop any further attempt of one run. ``scheduled``/``dispatched`` → ``cancelled``
    (with ``reason``); a ``running`` one keeps running and is marked so that no new
    attempt is made (``cancel_requested``). InputError (nothing written) for a run that
    does not exist or has already finished."""
    r = schema.runs
    done = conn.execute(
        r.update().where(r.c.id == run_id, _status_is(_CANCEL_FROM))
        .values(status=_S.CANCELLED, finished_at=now, error=reason, cancel_requested=now)
        .returning(r.c.attempt)
    ).all()
    if done:
        return Cancelled(run_id, _S.CANCELLED, int(done[0].attempt))
    # Not cancellable as it stood: running (mark it), or finished, or absent. Marked with
    # a filter on `running` too: a run that ends meanwhile is reported finished.
    marked = conn.execute(
        r.update().where(r.c.id == run_id, r.c.status == _S.RUNNING)
        .values(cancel_requested=sa.func.coalesce(r.c.cancel_requested, now))
        .returning(r.c.attempt)
    ).all()
    if marked:
        return Cancelled(run_id, _S.RUNNING, int(marked[0].attempt))
    found = conn.execute(sa.select(r.c.status).where(r.c.id == run_id)).one_or_none()
    if found is None:
        raise InputError(f"no run {run_id}")
    raise InputError(f"run {run_id} has already finished ({found.status})")


def cancel_job_runs(conn: Connection, job_id: str, *, now: float, reason: str) -> int:
    """:func:`cancel` every open run of ``job_id`` (a removed job); how many it reached."""
    r = schema.runs
    cancelled = conn.execute(
        r.update().where(r.c.job_id == job_id, _status_is(_CANCEL_FROM))
        .values(status=_S.CANCELLED, finished_at=now, error=reason, cancel_requested=now)
    ).rowcount
    marked = conn.execute(
        r.update().where(r.c.job_id == job_id, r.c.status == _S.RUNNING,
                         r.c.cancel_requested.is_(None))
        .values(cancel_requested=now)
    ).rowcount
    return int(cancelled) + int(marked)


def prune(conn: Connection, *, older_than: float) -> int:
    """Delete the finished runs scheduled before ``older_than``; how many."""
    r = schema.runs
    return int(conn.execute(
        r.delete().where(r.c.scheduled_at < older_than, r.c.status.in_(_PRUNE_FROM))
    ).rowcount)


# -- a worker's writes, each its own transaction, over its own claim ----------------------


def _id_in(db: Database, ids: list[int]) -> sa.ColumnElement[bool]:
    """``id IN ids``; on PostgreSQL as ``id = ANY(:array)``, one parameter whatever the
    batch size, so the driver prepares the statement once."""
    r = schema.runs
    if db.dialect == "postgresql":
        return r.c.id == sa.any_(sa.bindparam("ids", ids, type_=ARRAY(sa.BigInteger())))
    return r.c.id.in_(ids)


def claim(db: Database, runs: Iterable[RunRecord], *, worker: str,
          session: str) -> dict[tuple[int, int], RunRecord]:
    """``scheduled`` → ``dispatched`` for ``worker``/``session``, at each run's attempt, in
    one transaction. Only one claim of a run attempt can commit.

    Returns what it took, keyed by (run id, attempt): each run as its row holds it
    (``UPDATE ... RETURNING`` the job, function, arguments, fire time, epoch and
    ``recover``), which is what the worker must run, whatever the caller said. Of ``runs``
    only the run id and the attempt are read."""
    r = schema.runs
    by_attempt: dict[int, list[int]] = {}
    for run in runs:
        by_attempt.setdefault(run["attempt"], []).append(run["run_id"])
    claimed: dict[tuple[int, int], RunRecord] = {}
    if not by_attempt:
        return claimed
    with db.write() as conn:
        now = db.now_expr()
        for attempt, ids in by_attempt.items():
            rows = conn.execute(
                r.update()
                .where(_id_in(db, ids), r.c.attempt == attempt, _status_is(_CLAIM_FROM))
                .values(status=_S.DISPATCHED, worker=worker, worker_session=session,
                        dispatched_at=now)
                .returning(r.c.id, r.c.job_id, r.c.func, r.c.args, r.c.kwargs,
                           r.c.scheduled_at, r.c.attempt, r.c.epoch, r.c.recover)
            )
            for row in rows:
                stored = run_record(row.id, row.job_id, row.func, row.args, row.kwargs,
                                    row.scheduled_at, row.attempt, row.epoch, row.recover)
                claimed[(stored["run_id"], stored["attempt"])] = stored
    return claimed


def start(db: Database, keys: Iterable[tuple[int, int]], *, session: str,
          now: float) -> set[tuple[int, int]]:
    """``dispatched`` → ``running`` (``started_at = now``) over the claim of ``session``,
    for each (run id, attempt) of ``keys``, in one transaction; the keys it moved. The
    worker runs a run's code only if its key is returned: a run the leader recorded
    ``missed`` or ``cancelled`` meanwhile (same source status) is not."""
    r = schema.runs
    by_attempt: dict[int, list[int]] = {}
    for run_id, attempt in keys:
        by_attempt.setdefault(attempt, []).append(run_id)
    moved: set[tuple[int, int]] = set()
    if not by_attempt:
        return moved
    with db.write() as conn:
        for attempt, ids in by_attempt.items():
            rows = conn.execute(
                r.update()
                .where(_id_in(db, ids), r.c.attempt == attempt, r.c.worker_session == session,
                       _status_is(_START_FROM))
                .values(status=_S.RUNNING, started_at=now)
                .returning(r.c.id, r.c.attempt)
            )
            moved.update((int(row.id), int(row.attempt)) for row in rows)
    return moved


def release(db: Database, *, session: str,
            keys: Iterable[tuple[int, int]] | None = None) -> int:
    """``dispatched`` → ``scheduled``, no claim: the runs ``session`` claimed and did not
    start (all of them, or those of ``keys``, (run id, attempt) pairs), given back by a
    stopping worker so that the leader sends them elsewhere, at the same attempt: they
    never started. How many."""
    r = schema.runs
    mine = [r.c.worker_session == session, _status_is(_RELEASE_FROM)]
    if keys is not None:
        wanted = list(keys)
        if not wanted:
            return 0
        mine.append(sa.or_(*(sa.and_(r.c.id == i, r.c.attempt == a) for i, a in wanted)))
    with db.write() as conn:
        return int(conn.execute(
            r.update().where(*mine)
            .values(status=_S.SCHEDULED, worker=None, worker_session=None, dispatched_at=None)
        ).rowcount)


class Outcome(NamedTuple):
    """How a run attempt ended, on the worker's clock."""

    status: RunStatus  # succeeded or failed
    started: float
    finished: float
    error: str | None


def check_outcome(status: RunStatus) -> None:
    if status not in _ENDS:
        raise ValueError(f"a worker's run does not end as {status}")


def write_outcomes(db: Database, session: str,
                   finished: Mapping[tuple[int, int], Outcome]) -> None:
    """In one transaction: ``running`` → ``succeeded``/``failed``/``interrupted`` for
    ``finished`` (keyed by run id and attempt), only over the claim of ``session``: a run
    declared ``lost`` meanwhile, or claimed again for a later attempt, is left alone."""
    for status in {o.status for o in finished.values()}:
        check_outcome(status)
    if not finished:
        return
    with db.write() as conn:
        if db.dialect == "postgresql":
            _outcomes_unnest(conn, session, finished)
        else:
            _outcomes_many(conn, session, finished)


def _outcomes_many(conn: Connection, session: str,
                   finished: Mapping[tuple[int, int], Outcome]) -> None:
    r = schema.runs
    mine = (r.c.id == sa.bindparam("b_id"), r.c.attempt == sa.bindparam("b_attempt"),
            r.c.worker_session == session)
    conn.execute(
        r.update().where(*mine, _status_is(_END_FROM))
        .values(status=sa.bindparam("b_status"), started_at=sa.bindparam("b_started"),
                finished_at=sa.bindparam("b_finished"),
                duration=sa.bindparam("b_duration"), error=sa.bindparam("b_error")),
        [{"b_id": k[0], "b_attempt": k[1], "b_status": o.status, "b_started": o.started,
          "b_finished": o.finished, "b_duration": o.finished - o.started,
          "b_error": o.error} for k, o in finished.items()],
    )


def _outcomes_unnest(conn: Connection, session: str,
                     finished: Mapping[tuple[int, int], Outcome]) -> None:
    """The update as one statement, with one array per column: building per-row
    parameters was a third of a busy worker's CPU."""
    statuses, starts, ends, errors = map(list, zip(*finished.values(), strict=True))
    conn.execute(_UNNEST_FINISHED, {
        "ids": [k[0] for k in finished], "attempts": [k[1] for k in finished],
        "statuses": statuses, "started": starts, "finished": ends,
        "durations": list(map(operator.sub, ends, starts)), "errors": errors,
        "session": session,
    })


_UNNEST_FINISHED = sa.text(
    "UPDATE qc_runs AS r SET status = v.status, started_at = v.started, "
    "finished_at = v.finished, duration = v.duration, error = v.error "
    "FROM unnest(CAST(:ids AS bigint[]), CAST(:attempts AS int[]), CAST(:statuses AS text[]), "
    "CAST(:started AS float8[]), CAST(:finished AS float8[]), CAST(:durations AS float8[]), "
    "CAST(:errors AS text[])) AS v(id, attempt, status, started, finished, duration, error) "
    "WHERE r.id = v.id AND r.attempt = v.attempt AND r.worker_session = :session "
    f"AND r.status {_sql_status(_END_FROM)}"
)
