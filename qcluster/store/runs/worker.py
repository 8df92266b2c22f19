"""A worker's writes to ``qc_runs``: each its own transaction, not fenced, only over the
worker's claim (docs/DESIGN.md invariant 4); and its one read of the table while runs
run, :func:`cancel_asked`. Part of :mod:`qcluster.store.runs`, the table's one owner."""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection

from qcluster.store import schema
from qcluster.store.db import Database
from qcluster.store.records import MAX_AHEAD, RunRecord, run_record
from qcluster.store.runs.states import (
    CLAIM_FROM,
    END_FROM,
    ENDS,
    RELEASE_FROM,
    RETRIABLE,
    START_FROM,
    RunStatus,
    Writer,
    retries_kept,
    sql_status,
    status_is,
)

_S, _L, _W = RunStatus, Writer.LEADER, Writer.WORKER


# -- a worker's writes, each its own transaction, over its own claim ----------------------


def _id_in(db: Database, ids: list[int]) -> sa.ColumnElement[bool]:
    """``id IN ids``; on PostgreSQL as ``id = ANY(:array)``, one parameter whatever the
    batch size, so the driver prepares the statement once."""
    r = schema.runs
    if db.dialect == "postgresql":
        return r.c.id == sa.any_(sa.bindparam("ids", ids, type_=ARRAY(sa.BigInteger())))
    return r.c.id.in_(ids)


class Claimed(NamedTuple):
    """One run a worker's claim took: the run as its row holds it (the nine keys of the
    dispatch's wire record, unchanged), and what the row says about running it that the
    record does not carry, each bounded by :func:`claim`."""

    record: RunRecord
    #: When to start it (its fire time plus jitter, a retry's backoff, a backfill's now),
    #: worker wall clock; None: at ``scheduled_at``.
    due_at: float | None
    #: Seconds its code may run before it is stopped and recorded ``timed_out``; None: no
    #: bound.
    timeout: float | None
    #: Which run of its fire time (``qc_runs.slot``): ``""``, a shard's ``"3/8"``, a
    #: broadcast run's ``"@w1"``.
    slot: str = ""

    @property
    def key(self) -> tuple[int, int]:
        return self.record["run_id"], self.record["attempt"]

    @property
    def start_at(self) -> float:
        """When it is to start: ``due_at`` if the row has one, else ``scheduled_at``."""
        return self.record["scheduled_at"] if self.due_at is None else self.due_at


def _due_at(value: float | None, now: float) -> float | None:
    """A row's ``due_at`` as the worker may wait for it: None if absent or not finite (then
    ``scheduled_at`` holds), at most :data:`MAX_AHEAD` after ``now`` (the bound
    ``records.from_wire`` puts on ``scheduled_at``: no run holds a queue place longer)."""
    if value is None or not math.isfinite(value):
        return None
    return min(float(value), now + MAX_AHEAD)


def _timeout(value: float | None) -> float | None:
    """A row's ``timeout``: None (no bound) if absent, not finite or not positive."""
    if value is None or not math.isfinite(value) or value <= 0:
        return None
    return float(value)


def claim(db: Database, runs: Iterable[RunRecord], *, worker: str, session: str,
          now: float | None = None) -> dict[tuple[int, int], Claimed]:
    """``scheduled`` → ``dispatched`` for ``worker``/``session``, at each run's attempt, in
    one transaction. Only one claim of a run attempt can commit.

    Returns what it took, keyed by (run id, attempt): each run as its row holds it
    (``UPDATE ... RETURNING`` the job, function, arguments, fire time, epoch and
    ``recover``), which is what the worker must run, whatever the caller said, with the
    row's ``due_at`` (bounded to :data:`MAX_AHEAD` after ``now``, the worker's clock) and
    ``timeout`` (:class:`Claimed`). Of ``runs`` only the run id and the attempt are read."""
    keys = [(run["run_id"], run["attempt"]) for run in runs]
    claimed: dict[tuple[int, int], Claimed] = {}
    if not keys:
        return claimed
    now = time.time() if now is None else now
    with db.write() as conn:
        if db.dialect == "postgresql":
            rows: Iterable[sa.Row[Any]] = conn.execute(_CLAIM, {
                "ids": [k[0] for k in keys], "attempts": [k[1] for k in keys],
                "worker": worker, "session": session}).all()
        else:
            rows = _claim_each(db, conn, keys, worker=worker, session=session)
        for row in rows:
            stored = run_record(row.id, row.job_id, row.func, row.args, row.kwargs,
                                row.scheduled_at, row.attempt, row.epoch, row.recover)
            claimed[(stored["run_id"], stored["attempt"])] = Claimed(
                stored, _due_at(row.due_at, now), _timeout(row.timeout),
                row.slot if isinstance(row.slot, str) else "")
    return claimed


# The worker's hot writes on PostgreSQL as statements built once (sa.text, one array per
# column): building them with the expression language cost more CPU than the round trip
# (start: 590 µs of the worker's CPU per write, against 270 µs; bench/cpu.py).
_CLAIM = sa.text(
    "UPDATE qc_runs AS r SET status = 'dispatched', worker = :worker, "
    "worker_session = :session, dispatched_at = CAST(EXTRACT(EPOCH FROM clock_timestamp()) "
    "AS float8) "
    "FROM unnest(CAST(:ids AS bigint[]), CAST(:attempts AS int[])) AS v(id, attempt) "
    f"WHERE r.id = v.id AND r.attempt = v.attempt AND r.status {sql_status(CLAIM_FROM)} "
    "RETURNING r.id, r.job_id, r.func, r.args, r.kwargs, r.scheduled_at, r.attempt, "
    "r.epoch, r.recover, r.due_at, r.timeout, r.slot"
)
_START = sa.text(
    "UPDATE qc_runs AS r SET status = 'running', started_at = :now "
    "FROM unnest(CAST(:ids AS bigint[]), CAST(:attempts AS int[])) AS v(id, attempt) "
    "WHERE r.id = v.id AND r.attempt = v.attempt AND r.worker_session = :session "
    f"AND r.status {sql_status(START_FROM)} RETURNING r.id, r.attempt"
)


def _claim_each(db: Database, conn: Connection, keys: list[tuple[int, int]], *,
                worker: str, session: str) -> list[sa.Row[Any]]:
    """The claim with the expression language (SQLite), one statement per attempt."""
    r = schema.runs
    rows: list[sa.Row[Any]] = []
    db_now = db.now_expr()
    for attempt, ids in _by_attempt(keys).items():
        rows += conn.execute(
            r.update()
            .where(_id_in(db, ids), r.c.attempt == attempt, status_is(CLAIM_FROM))
            .values(status=_S.DISPATCHED, worker=worker, worker_session=session,
                    dispatched_at=db_now)
            .returning(r.c.id, r.c.job_id, r.c.func, r.c.args, r.c.kwargs,
                       r.c.scheduled_at, r.c.attempt, r.c.epoch, r.c.recover,
                       r.c.due_at, r.c.timeout, r.c.slot)
        ).all()
    return rows


def _by_attempt(keys: Iterable[tuple[int, int]]) -> dict[int, list[int]]:
    by_attempt: dict[int, list[int]] = {}
    for run_id, attempt in keys:
        by_attempt.setdefault(attempt, []).append(run_id)
    return by_attempt


def cancel_asked(db: Database, session: str,
                 keys: Iterable[tuple[int, int]]) -> set[tuple[int, int]]:
    """Of ``keys`` ((run id, attempt) pairs), those whose row is ``running`` over the claim
    of ``session`` with a cancel asked (``cancel_requested``, set by ``runs cancel`` or
    the overlap policy ``cancel-other``): what the worker is to stop. A read, one
    statement; an empty ``keys`` reads nothing."""
    return _running_ours(db, session, keys, cancel_asked=True)


def still_ours(db: Database, session: str,
               keys: Iterable[tuple[int, int]]) -> set[tuple[int, int]]:
    """Of ``keys``, those whose row is still ``running`` over the claim of ``session``
    with no cancel asked: the runs a worker resumed from a pause past its claim lease may
    let go on (a leader has counted the others out: ``lost``, or cancelled them)."""
    return _running_ours(db, session, keys, cancel_asked=False)


def _running_ours(db: Database, session: str, keys: Iterable[tuple[int, int]], *,
                  cancel_asked: bool) -> set[tuple[int, int]]:
    wanted = set(keys)
    if not wanted:
        return set()
    r = schema.runs
    asked = r.c.cancel_requested.is_not(None) if cancel_asked \
        else r.c.cancel_requested.is_(None)
    with db.read() as conn:
        rows = conn.execute(
            sa.select(r.c.id, r.c.attempt)
            .where(_id_in(db, sorted({i for i, _ in wanted})), r.c.worker_session == session,
                   r.c.status == _S.RUNNING, asked)
        ).all()
    return {(int(row.id), int(row.attempt)) for row in rows} & wanted


def start(db: Database, keys: Iterable[tuple[int, int]], *, session: str,
          now: float) -> set[tuple[int, int]]:
    """``dispatched`` → ``running`` (``started_at = now``) over the claim of ``session``,
    for each (run id, attempt) of ``keys``, in one transaction; the keys it moved. The
    worker runs a run's code only if its key is returned: a run the leader recorded
    ``missed`` or ``cancelled`` meanwhile (same source status) is not."""
    wanted = list(keys)
    moved: set[tuple[int, int]] = set()
    if not wanted:
        return moved
    with db.write() as conn:
        if db.dialect == "postgresql":
            rows = conn.execute(_START, {
                "ids": [k[0] for k in wanted], "attempts": [k[1] for k in wanted],
                "session": session, "now": now})
            moved.update((int(row.id), int(row.attempt)) for row in rows)
            return moved
        r = schema.runs
        for attempt, ids in _by_attempt(wanted).items():
            rows = conn.execute(
                r.update()
                .where(_id_in(db, ids), r.c.attempt == attempt, r.c.worker_session == session,
                       status_is(START_FROM))
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
    mine = [r.c.worker_session == session, status_is(RELEASE_FROM)]
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

    status: RunStatus  # one of states.ENDS: succeeded, failed, timed_out, cancelled, ...
    started: float
    finished: float
    error: str | None
    output: str | None = None  # the tail of what it wrote (qcluster/worker/output.py)
    result: str | None = None  # the short repr of its return value


def check_outcome(status: RunStatus) -> None:
    if status not in ENDS:
        raise ValueError(f"a worker's run does not end as {status}")


def write_outcomes(db: Database, session: str,
                   finished: Mapping[tuple[int, int], Outcome]) -> None:
    """In one transaction: ``running`` → ``succeeded``/``failed``/``interrupted`` for
    ``finished`` (keyed by run id and attempt), only over the claim of ``session``: a run
    declared ``lost`` meanwhile, or claimed again for a later attempt, is left alone.
    With it, the output and result of those that have any, in ``qc_run_output``, only
    where the outcome is the row's (the same attempt, session, status and end time), and
    once: written again (a commit whose answer was lost), it is left as it is."""
    for status in {o.status for o in finished.values()}:
        check_outcome(status)
    if not finished:
        return
    with db.write() as conn:
        if db.dialect == "postgresql":
            _outcomes_unnest(conn, session, finished)
        else:
            _outcomes_many(conn, session, finished)
        said = [{"id": k[0], "attempt": k[1], "session": session, "status": str(o.status),
                 "finished": o.finished, "output": o.output, "result": o.result}
                for k, o in finished.items() if o.output is not None or o.result is not None]
        if said:
            conn.execute(_OUTPUT, said)


_OUTPUT = sa.text(
    "INSERT INTO qc_run_output (run_id, attempt, output, result) "
    "SELECT id, attempt, :output, :result FROM qc_runs WHERE id = :id AND attempt = :attempt "
    "AND worker_session = :session AND status = :status AND finished_at = :finished "
    "ON CONFLICT (run_id, attempt) DO NOTHING"
)


def _outcomes_many(conn: Connection, session: str,
                   finished: Mapping[tuple[int, int], Outcome]) -> None:
    r = schema.runs
    mine = (r.c.id == sa.bindparam("b_id"), r.c.attempt == sa.bindparam("b_attempt"),
            r.c.worker_session == session)
    conn.execute(
        r.update().where(*mine, status_is(END_FROM))
        .values(status=sa.bindparam("b_status"), started_at=sa.bindparam("b_started"),
                finished_at=sa.bindparam("b_finished"),
                duration=sa.bindparam("b_duration"), error=sa.bindparam("b_error"),
                retries_left=retries_kept(sa.bindparam("b_status", type_=sa.String))),
        [{"b_id": k[0], "b_attempt": k[1], "b_status": o.status, "b_started": o.started,
          "b_finished": o.finished, "b_duration": o.finished - o.started,
          "b_error": o.error} for k, o in finished.items()],
    )


def _outcomes_unnest(conn: Connection, session: str,
                     finished: Mapping[tuple[int, int], Outcome]) -> None:
    """The update as one statement, with one array per column: building per-row
    parameters was a third of a busy worker's CPU."""
    statuses, starts, ends, errors = (list(c) for c in zip(
        *(o[:4] for o in finished.values()), strict=True))
    conn.execute(_UNNEST_FINISHED, {
        "ids": [k[0] for k in finished], "attempts": [k[1] for k in finished],
        "statuses": statuses, "started": starts, "finished": ends,
        "durations": list(map(operator.sub, ends, starts)), "errors": errors,
        "session": session,
    })


_UNNEST_FINISHED = sa.text(
    "UPDATE qc_runs AS r SET status = v.status, started_at = v.started, "
    "finished_at = v.finished, duration = v.duration, error = v.error, "
    f"retries_left = CASE WHEN v.status {sql_status(RETRIABLE)} THEN r.retries_left ELSE 0 END "
    "FROM unnest(CAST(:ids AS bigint[]), CAST(:attempts AS int[]), CAST(:statuses AS text[]), "
    "CAST(:started AS float8[]), CAST(:finished AS float8[]), CAST(:durations AS float8[]), "
    "CAST(:errors AS text[])) AS v(id, attempt, status, started, finished, duration, error) "
    "WHERE r.id = v.id AND r.attempt = v.attempt AND r.worker_session = :session "
    f"AND r.status {sql_status(END_FROM)}"
)
