"""The leader's writes to ``qc_runs``, on the caller's connection, in the transaction it
fenced on its epoch (docs/DESIGN.md invariants 1, 3, 6, 7). Part of
:mod:`qcluster.store.runs`, the table's one owner."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Connection

from qcluster.errors import InputError
from qcluster.store import schema
from qcluster.store.db import database_now
from qcluster.store.records import RunRecord, run_record
from qcluster.store.runs.states import (
    CANCEL_FROM,
    CREATES,
    LOST_FROM,
    MISSED_FROM,
    PRUNE_FROM,
    REPORTED_ENDS,
    REPORTED_FROM,
    RETRIABLE,
    RETRY_FAILED_FROM,
    RETRY_FROM,
    REVIVE_FROM,
    UNBUFFER_FROM,
    UNCLAIM_FROM,
    WITHDRAW_FROM,
    WITHDRAWN,
    RunStatus,
    Writer,
    retries_kept,
    sql_status,
    status_is,
)

_S, _L, _W = RunStatus, Writer.LEADER, Writer.WORKER


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
    due_at: float | None = None  # when it is to start; None: at scheduled_at
    timeout: float | None = None
    retries: int = 0
    retry_backoff: float | None = None
    retry_max_backoff: float | None = None
    backfill: bool = False  # written by `jobs backfill` (schema.runs.c.backfill)
    grace: int | None = None  # the job's own misfire grace; None: [scheduler]'s
    parent_run: int | None = None  # a dependent job's run: the parent run that decided it
    routing: str | None = None  # where it may go (definitions/policy.routing_text)
    slot: str = ""  # which run of its fire time: a shard, a broadcast worker (schema)


def insert_runs(
    conn: Connection, fires: Sequence[FireRow], epoch: int, leader: str, *,
    now: float | None = None,
) -> list[RunRecord]:
    """Insert run rows (none → ``scheduled``, ``missed``, ``skipped`` or ``buffered``),
    skipping fire times already recorded; return the new ``scheduled`` runs, to be sent
    once the caller commits. A fire time whose row was withdrawn (:func:`withdraw`) is
    recorded again in that row, at its attempt + 1 (a worker that held the withdrawn
    attempt drops it; the new one is new to every worker).

    ``now`` is ``created_at`` (and a ``missed`` row's ``finished_at``): the leader gives
    the time of its clock that judged the fires (``leader/clock.py``); by default the
    database's time, read on ``conn``. Either is the database's clock, which recovery
    compares ``created_at`` with (docs/DESIGN.md invariant 8)."""
    if not fires:
        return []
    refused = {f.status for f in fires} - CREATES
    if refused:
        raise ValueError(f"a run is not recorded as {', '.join(sorted(map(str, refused)))}")
    if now is None:
        now = database_now(conn)
    # The jobs that have children now: their runs are marked for the chain pass (a child
    # added after this read runs from its parent's next recorded fire time on).
    parents = set(conn.execute(sa.select(schema.job_deps.c.parent_id).distinct()).scalars())
    rows = [
        {"job_id": f.job_id, "scheduled_at": f.scheduled_at, "func": f.func,
         "args": f.args_json, "kwargs": f.kwargs_json, "status": f.status, "attempt": 1,
         "recover": f.recover, "epoch": epoch, "leader": leader, "created_at": now,
         "finished_at": None if f.status in _UNFINISHED else now, "error": f.error,
         "max_attempts": f.max_attempts, "due_at": f.due_at, "timeout": f.timeout,
         "retries_left": f.retries if f.status in _UNFINISHED else 0,  # ended: none
         "retry_backoff": f.retry_backoff,
         "retry_max_backoff": f.retry_max_backoff, "backfill": f.backfill,
         "grace": f.grace, "parent_run": f.parent_run,
         "chain": True if f.job_id in parents else None, "routing": f.routing,
         "slot": f.slot}
        for f in fires
    ]
    by_key = {(f.job_id, f.scheduled_at, f.slot): f for f in fires}
    out: list[RunRecord] = []
    for start in range(0, len(rows), 500):
        for row in _insert_returning(conn, rows[start : start + 500]):
            if row.status != _S.SCHEDULED:
                continue
            f = by_key[(row.job_id, row.scheduled_at, row.slot)]
            out.append(run_record(row.id, f.job_id, f.func, f.args_json, f.kwargs_json,
                                  f.scheduled_at, row.attempt, epoch, f.recover, f.routing))
    return out


_RUN_COLUMNS = (
    ("job_id", "text"), ("scheduled_at", "float8"), ("func", "text"), ("args", "text"),
    ("kwargs", "text"), ("status", "text"), ("attempt", "int"), ("recover", "bool"),
    ("epoch", "bigint"), ("leader", "text"), ("created_at", "float8"),
    ("finished_at", "float8"), ("error", "text"), ("max_attempts", "int"),
    ("due_at", "float8"), ("timeout", "float8"), ("retries_left", "int"),
    ("retry_backoff", "float8"), ("retry_max_backoff", "float8"), ("backfill", "bool"),
    ("grace", "int"), ("parent_run", "bigint"), ("chain", "bool"), ("routing", "text"),
    ("slot", "text"),
)
_UNFINISHED = (_S.SCHEDULED, _S.BUFFERED)
#: What a withdrawn row gets when its fire time is recorded again: the new row's values,
#: one attempt more, and no claim, start or cancel of the withdrawn attempt.
_REVIVED = [c for c, _ in _RUN_COLUMNS
            if c not in ("job_id", "scheduled_at", "slot", "attempt")]
_CLEARED = ("worker", "worker_session", "dispatched_at", "started_at", "duration",
            "cancel_requested")
_UNNEST_INSERT = sa.text(
    f"INSERT INTO qc_runs AS r ({', '.join(c for c, _ in _RUN_COLUMNS)}) "
    f"SELECT * FROM unnest({', '.join(f'CAST(:{c} AS {t}[])' for c, t in _RUN_COLUMNS)}) "
    "ON CONFLICT (job_id, scheduled_at, slot) DO UPDATE SET "
    + ", ".join([*(f"{c} = EXCLUDED.{c}" for c in _REVIVED), "attempt = r.attempt + 1",
                 "deaths = 0", *(f"{c} = NULL" for c in _CLEARED)])
    + f" WHERE r.status {sql_status(REVIVE_FROM)} AND r.error LIKE '{WITHDRAWN}%' "
    "RETURNING id, job_id, scheduled_at, slot, status, attempt"
)


def _insert_returning(conn: Connection, rows: list[dict[str, Any]]) -> Any:
    """Insert ``rows``, skipping recorded fire times; the inserted rows come back. On
    PostgreSQL one column array per parameter (``unnest``): 23 parameters whatever the
    batch size, so the driver prepares the statement once, where a multi-row VALUES list
    of 11,500 parameters is parsed again for every batch."""
    if conn.dialect.name == "postgresql":
        return conn.execute(_UNNEST_INSERT, {c: [row[c] for row in rows] for c, _ in _RUN_COLUMNS})
    r = schema.runs
    new = sqlite.insert(r)
    stmt = new.on_conflict_do_update(
        index_elements=["job_id", "scheduled_at", "slot"],
        set_={**{c: new.excluded[c] for c in _REVIVED}, "attempt": r.c.attempt + 1,
              "deaths": 0, **dict.fromkeys(_CLEARED)},
        where=sa.and_(status_is(REVIVE_FROM), r.c.error.startswith(WITHDRAWN, autoescape=True)),
    ).returning(r.c.id, r.c.job_id, r.c.scheduled_at, r.c.slot, r.c.status, r.c.attempt)
    return conn.execute(stmt, rows)


def chain_decided(conn: Connection, run_ids: Sequence[int]) -> None:
    """Clear the ``chain`` mark of these runs: every child of theirs has its run row
    (``leader/chains.py``). Any status: the mark says nothing about the run itself."""
    r = schema.runs
    ids = list(run_ids)
    for start in range(0, len(ids), 500):
        conn.execute(r.update().where(r.c.id.in_(ids[start:start + 500])).values(chain=None))


def mark_missed(conn: Connection, run_id: int, attempt: int, status: RunStatus, *,
                now: float, error: str) -> bool:
    """``scheduled`` → ``missed`` (never sent within its grace) or ``dispatched`` →
    ``missed`` (claimed, but no worker started it within its grace). Only while the row is
    still at ``attempt`` and in ``status`` (what the caller read): a worker's :func:`start`
    filters on ``dispatched`` too, so of the two only one writes. Whether it wrote."""
    if status not in MISSED_FROM:
        raise ValueError(f"a {status} run does not become missed")
    r = schema.runs
    return conn.execute(
        r.update().where(r.c.id == run_id, r.c.attempt == attempt, r.c.status == status)
        .values(status=_S.MISSED, finished_at=now, error=error, retries_left=0)
    ).rowcount > 0


def mark_lost(conn: Connection, run_id: int, attempt: int, status: RunStatus, *,
              now: float, error: str, keep_retries: bool = False) -> bool:
    """``dispatched``/``running`` → ``lost``: the claim's worker left. Only while the row
    is still at ``attempt`` and in ``status`` (what the caller read). A worker gone while
    the run was ``running`` adds one to ``deaths`` (the job's code may have killed it).
    ``retries_left`` becomes 0 unless ``keep_retries`` (a ``recover`` run about to be
    made again keeps them for its next attempt). Whether it wrote."""
    if status not in LOST_FROM:
        raise ValueError(f"a {status} run does not become lost")
    r = schema.runs
    died = 1 if status == _S.RUNNING else 0
    return conn.execute(
        r.update().where(r.c.id == run_id, r.c.attempt == attempt, r.c.status == status)
        .values(status=_S.LOST, finished_at=now, error=error, deaths=r.c.deaths + died,
                **({} if keep_retries else {"retries_left": 0}))
    ).rowcount > 0


def retry(conn: Connection, run_id: int, attempt: int, *, epoch: int, now: float,
          error: str) -> bool:
    """``lost`` → ``scheduled`` with ``attempt + 1`` and no claim, recorded by ``epoch``:
    the run of a ``recover`` job, to be sent again. Never for a run whose cancel was
    asked (the filter reads the row as it is now, after any cancel that committed first).
    The caller decides the bound (attempts, deaths). Whether it wrote."""
    r = schema.runs
    return conn.execute(
        r.update().where(r.c.id == run_id, r.c.attempt == attempt, status_is(RETRY_FROM),
                         r.c.cancel_requested.is_(None))
        .values(status=_S.SCHEDULED, attempt=attempt + 1, worker=None, worker_session=None,
                dispatched_at=None, started_at=None, finished_at=None, duration=None,
                epoch=epoch, created_at=now, error=error)
    ).rowcount > 0


def retry_failed(conn: Connection, run_id: int, attempt: int, *, epoch: int, now: float,
                 due_at: float, error: str) -> bool:
    """``failed``/``timed_out`` → ``scheduled`` with ``attempt + 1``, no claim, one retry
    fewer left, to start at ``due_at`` (after its backoff), recorded by ``epoch``; the
    last attempt's error is kept in ``error``. Only while the row is at ``attempt`` with a
    retry left and no cancel asked. Whether it wrote."""
    r = schema.runs
    return conn.execute(
        r.update().where(r.c.id == run_id, r.c.attempt == attempt,
                         status_is(RETRY_FAILED_FROM), r.c.retries_left > 0,
                         r.c.cancel_requested.is_(None))
        .values(status=_S.SCHEDULED, attempt=attempt + 1, worker=None, worker_session=None,
                dispatched_at=None, started_at=None, finished_at=None, duration=None,
                epoch=epoch, created_at=now, due_at=due_at, error=error,
                retries_left=r.c.retries_left - 1)
    ).rowcount > 0


def give_up_retries(conn: Connection, run_id: int, attempt: int | None, why: str) -> bool:
    """A ``failed``/``timed_out`` run with retries left gets none (its job is gone, its
    cancel was asked, or a later fire replaced it): ``retries_left = 0``, ``why`` added to
    its error. The status stays. Only at ``attempt`` (None: whatever its attempt). Whether
    it wrote."""
    r = schema.runs
    at = [] if attempt is None else [r.c.attempt == attempt]
    return conn.execute(
        r.update().where(r.c.id == run_id, *at, status_is(RETRIABLE), r.c.retries_left > 0)
        .values(retries_left=0,
                error=sa.func.coalesce(r.c.error, "") + f" (no retry: {why})")
    ).rowcount > 0


def withdraw(conn: Connection, job_ids: Sequence[str], *, now: float, reason: str
             ) -> dict[str, float]:
    """Take back the runs of ``job_ids`` sent ahead of their fire time (``[scheduler]
    fire_ahead_seconds``): first attempts whose fire time is after ``now`` and that have
    not started (``scheduled``/``dispatched``/``buffered``) → ``cancelled``, with
    ``error`` = WITHDRAWN + ``reason``. A worker that holds one drops it at its start (its
    start filters on ``dispatched``), and the fire time may be recorded again, in the same
    row (:func:`insert_runs`). The earliest fire time withdrawn, per job."""
    if not job_ids:
        return {}
    r = schema.runs
    taken = conn.execute(
        r.update().where(r.c.job_id.in_(list(job_ids)), status_is(WITHDRAW_FROM),
                         r.c.attempt == 1, r.c.scheduled_at > now)
        .values(status=_S.CANCELLED, finished_at=now, cancel_requested=now, retries_left=0,
                error=WITHDRAWN + reason)
        .returning(r.c.job_id, r.c.scheduled_at)
    ).all()
    first: dict[str, float] = {}
    for job_id, at in taken:
        first[job_id] = min(at, first.get(job_id, at))
    return first


def ahead(conn: Connection, job_id: str, *, now: float) -> list[tuple[int, float]]:
    """The runs of ``job_id`` that :func:`withdraw` would take back at ``now``: (run id,
    fire time), earliest first."""
    r = schema.runs
    rows = conn.execute(
        sa.select(r.c.id, r.c.scheduled_at)
        .where(r.c.job_id == job_id, status_is(WITHDRAW_FROM), r.c.attempt == 1,
               r.c.scheduled_at > now)
        .order_by(r.c.scheduled_at)
    ).all()
    return [(int(run_id), float(at)) for run_id, at in rows]


def give_up_job_retries(conn: Connection, job_ids: Sequence[str], why: str) -> int:
    """:func:`give_up_retries` for every run of ``job_ids`` with a retry to come (their
    jobs were removed); how many."""
    if not job_ids:
        return 0
    r = schema.runs
    return int(conn.execute(
        r.update().where(r.c.job_id.in_(list(job_ids)), status_is(RETRIABLE),
                         r.c.retries_left > 0)
        .values(retries_left=0, error=sa.func.coalesce(r.c.error, "") + f" (no retry: {why})")
    ).rowcount)


def unbuffer(conn: Connection, run_id: int, *, epoch: int, now: float) -> RunRecord | None:
    """``buffered`` → ``scheduled``, to start now (or at its fire time, if that is still
    to come: one buffered ahead of its time, fire-ahead): the open run of its job has
    ended. The record to send, or None if the row moved on (cancelled meanwhile)."""
    r = schema.runs
    row = conn.execute(
        r.update().where(r.c.id == run_id, status_is(UNBUFFER_FROM))
        .values(status=_S.SCHEDULED, epoch=epoch, created_at=now,
                due_at=sa.case((r.c.scheduled_at > now, r.c.scheduled_at), else_=now))
        .returning(r.c.id, r.c.job_id, r.c.func, r.c.args, r.c.kwargs, r.c.scheduled_at,
                   r.c.attempt, r.c.recover, r.c.routing)
    ).one_or_none()
    if row is None:
        return None
    return run_record(row.id, row.job_id, row.func, row.args, row.kwargs, row.scheduled_at,
                      row.attempt, epoch, row.recover, row.routing)


def record_reported(conn: Connection, run_id: int, attempt: int, session: str, *,
                    status: RunStatus, started: float, finished: float,
                    error: str | None) -> bool:
    """``running`` → ``succeeded``/``failed``/``interrupted``, as the worker of the claim
    (``session``, ``attempt``) reported it over RPC: it could not write it itself (cut
    off from the database). The same filter as the worker's own write. Whether it
    wrote."""
    if status not in REPORTED_ENDS:
        raise ValueError(f"a worker's run does not end as {status}")
    r = schema.runs
    note = "outcome reported to the leader: its worker could not reach the database"
    return conn.execute(
        r.update().where(r.c.id == run_id, r.c.attempt == attempt,
                         r.c.worker_session == session, status_is(REPORTED_FROM))
        .values(status=status, started_at=started, finished_at=finished,
                duration=finished - started, retries_left=retries_kept(sa.literal(status)),
                error=note if error is None else f"{error} ({note})")
    ).rowcount > 0


def unclaim(conn: Connection, run_id: int, attempt: int, session: str) -> bool:
    """``dispatched`` → ``scheduled``, no claim, same attempt: the claim of ``session``,
    whose worker is known to have stopped before it started the run (its code never ran),
    is undone, so that the run is sent again like any unsent one (or recorded missed past
    its grace). A start of ``session`` can no longer commit (it filters on the claim).
    Whether it wrote."""
    r = schema.runs
    return conn.execute(
        r.update().where(r.c.id == run_id, r.c.attempt == attempt,
                         r.c.worker_session == session, status_is(UNCLAIM_FROM))
        .values(status=_S.SCHEDULED, worker=None, worker_session=None, dispatched_at=None)
    ).rowcount > 0


class Cancelled(NamedTuple):
    """What :func:`cancel` did: ``cancelled`` (it will never start) or ``running`` (marked:
    its worker stops it within about a heartbeat and records it ``cancelled``, see
    :func:`~qcluster.store.runs.worker.cancel_asked`; it gets no further attempt)."""

    run_id: int
    status: RunStatus
    attempt: int


def cancel(conn: Connection, run_id: int, *, now: float, reason: str) -> Cancelled:
    """Stop any further attempt of one run. ``scheduled``/``dispatched`` → ``cancelled``
    (with ``reason``); a ``running`` one is marked (``cancel_requested``), which its
    worker reads to stop it (its process group killed, recorded ``cancelled``), and which
    stops any new attempt. InputError (nothing written) for a run that does not exist or
    has already finished."""
    r = schema.runs
    done = conn.execute(
        r.update().where(r.c.id == run_id, status_is(CANCEL_FROM))
        .values(status=_S.CANCELLED, finished_at=now, error=reason, cancel_requested=now,
                retries_left=0)
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


def cancel_job_runs(conn: Connection, job_ids: Sequence[str], *, now: float,
                    reason: str) -> int:
    """:func:`cancel` every open run of ``job_ids`` (removed jobs); how many it reached."""
    if not job_ids:
        return 0
    r = schema.runs
    of = r.c.job_id.in_(list(job_ids))
    cancelled = conn.execute(
        r.update().where(of, status_is(CANCEL_FROM))
        .values(status=_S.CANCELLED, finished_at=now, error=reason, cancel_requested=now,
                retries_left=0)
    ).rowcount
    marked = conn.execute(
        r.update().where(of, r.c.status == _S.RUNNING, r.c.cancel_requested.is_(None))
        .values(cancel_requested=now)
    ).rowcount
    return int(cancelled) + int(marked)


def prune(conn: Connection, *, older_than: float) -> int:
    """Delete the finished runs scheduled before ``older_than``, and their output; how
    many runs."""
    r, o = schema.runs, schema.run_output
    old = (r.c.scheduled_at < older_than, r.c.status.in_(PRUNE_FROM))
    conn.execute(o.delete().where(o.c.run_id.in_(sa.select(r.c.id).where(*old))))
    return int(conn.execute(r.delete().where(*old)).rowcount)
