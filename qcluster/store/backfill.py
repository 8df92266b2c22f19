"""Backfill: run each fire time of a job's trigger in a past range once.

A backfill is a request for runs that the live schedule will never make: fire times in
``[start, end]``, ``end`` not later than now (later ones are the live schedule's). Each
becomes one ``qc_runs`` row keyed (job id, fire time), inserted by
:func:`qcluster.store.runs.insert_runs` (``ON CONFLICT DO NOTHING``), so a fire time that
already has a row, whether the live leader or an earlier backfill made it, gets no second
one: a backfill made twice writes nothing the second time, and says so.

Rules:

* ``start`` and ``end`` are ISO 8601 times; one without an offset is read in the job's
  zone (its trigger's ``tz``), as ``--at`` is (``definitions/triggers.make_spec``).
  ``start`` after ``end``, or ``end`` later than the database's now, is refused.
* The range is also bounded by the job's own ``start``/``end`` policy: no run outside the
  job's window. At most :data:`MAX_FIRE_TIMES` fire times per call; a range with more is
  refused, saying about how many it holds.
* A new row is ``scheduled`` with ``due_at`` = now (it runs at once, not at its fire
  time), with the job's timeout, retries, ``recover`` and ``max_attempts``; a fire time
  whose local date lies in a calendar the job excludes is recorded ``skipped``, "excluded
  by calendar NAME", the row a live leader writes for it.
* Not subject to the overlap policy or ``max_runs``: it is an explicit request, as a
  run now is (``catalog.run_now``); ``runs_made`` is not counted up.

:func:`window` reads what a plan needs and :func:`compute` computes it (up to 10,000 fire
times of a cron take ~0.4 s of CPU) with no transaction open, so that none is idle that
long (a session idle in a transaction past ``idle_in_transaction_session_timeout`` is
ended); :func:`plan` does both. :func:`record` then writes, in the caller's transaction
fenced on its epoch, after checking that the job still has the trigger the plan was made
from. :func:`backfill` plans and records on one connection.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from qcluster.definitions.policy import Defaults, from_stored, run_fields
from qcluster.definitions.triggers import fire_times, make_spec, parse_zone
from qcluster.errors import InputError
from qcluster.store import calendars, catalog, schema
from qcluster.store.db import database_now
from qcluster.store.records import RunRecord
from qcluster.store.runs import FireRow, RunStatus, insert_runs

MAX_FIRE_TIMES = 10_000
MAX_TIME_TEXT = 100


@dataclasses.dataclass(frozen=True)
class Plan:
    """The fire times to record for ``job_id``, and the stored trigger they follow."""

    job_id: str
    trigger: str
    start: float
    end: float
    times: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Counts:
    """What a backfill did: of ``fire_times`` in the range, ``new`` runs were scheduled,
    ``skipped`` recorded excluded by a calendar, and ``already`` had a row (as read in the
    writing transaction)."""

    job_id: str
    start: str
    end: str
    fire_times: int
    new: int
    skipped: int
    already: int

    def to_wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Window:
    """What :func:`compute` needs, read from the database: the job's stored trigger, the
    range asked for, and the part of it inside the job's own ``start``/``end``."""

    job_id: str
    trigger: str
    first: float
    last: float
    low: float
    high: float


def window(conn: Connection, job_id: str, start: str, end: str, *,
           now: float | None = None, retention_seconds: float | None = None) -> Window:
    """Read what a plan of ``job_id`` in ``[start, end]`` needs (see the module doc).
    ``now``: by default the database's time. InputError, one line, for a bad range, and
    for a ``start`` older than ``retention_seconds``: pruning (by fire time) would delete
    its runs, and the same backfill would then run those fire times a second time."""
    row = catalog.job_row(conn, job_id)
    spec = json.loads(row.trigger)
    if spec.get("type") == "after":
        raise InputError(f"job {job_id!r} runs after other jobs and has no fire times of its "
                         "own: backfill its parents, and it runs after each of their runs")
    if from_stored(row.policy).broadcast:
        raise InputError(f"job {job_id!r} is broadcast: its runs are one per worker live at "
                         "each fire time, which a backfill cannot know")
    tz = spec["tz"]
    first, last = _instant("--from", start, tz), _instant("--to", end, tz)
    now = database_now(conn) if now is None else now
    if first > last:
        raise InputError(f"--from {_iso(first)} is after --to {_iso(last)}")
    if last > now:
        raise InputError(f"--to {_iso(last)} is later than now ({_iso(now)}): a backfill "
                         "runs past fire times; later ones are the live schedule's")
    if retention_seconds is not None and first < now - retention_seconds:
        raise InputError(
            f"--from {_iso(first)} is older than the runs kept ([runs] retention_days = "
            f"{retention_seconds / 86400:g}): its runs would be pruned, and the same "
            "backfill would run those fire times again")
    policy = from_stored(row.policy)
    low = first if policy.start_ts is None else max(first, policy.start_ts)
    high = last if policy.end_ts is None else min(last, policy.end_ts)
    return Window(row.id, row.trigger, first, last, low, high)


def compute(w: Window) -> Plan:
    """The fire times of a :func:`window`, with no connection held: 10,000 fire times of a
    cron take ~0.4 s of CPU, more on a loaded host, longer than a transaction may sit idle
    (``idle_in_transaction_session_timeout``). InputError for more than
    :data:`MAX_FIRE_TIMES`."""
    found: list[datetime] = []
    if w.low <= w.high:
        found = fire_times(json.loads(w.trigger), _dt(w.low), _dt(w.high), MAX_FIRE_TIMES + 1)
    if len(found) > MAX_FIRE_TIMES:
        raise InputError(f"job {w.job_id!r} has more than {MAX_FIRE_TIMES:,} fire times from "
                         f"{_iso(w.first)} to {_iso(w.last)} (about {_about(found, w.high):,})"
                         f": backfill at most {MAX_FIRE_TIMES:,} at a time")
    return Plan(w.job_id, w.trigger, w.first, w.last, tuple(t.timestamp() for t in found))


def plan(conn: Connection, job_id: str, start: str, end: str, *,
         now: float | None = None) -> Plan:
    """:func:`window` then :func:`compute` (the callers that hold a transaction read the
    window in it and compute after it)."""
    return compute(window(conn, job_id, start, end, now=now))


def record(conn: Connection, planned: Plan, epoch: int, leader: str, *,
           now: float | None = None, defaults: Defaults = catalog.DEFAULTS
           ) -> tuple[list[RunRecord], Counts]:
    """Insert the planned fire times that have no row yet, in the caller's transaction
    (fenced on ``epoch``); the new ``scheduled`` runs, for the caller to send once it has
    committed, and the counts. InputError if the job's trigger changed since the plan, or
    it excludes a calendar that does not exist."""
    row = catalog.job_row(conn, planned.job_id)
    if row.trigger != planned.trigger:
        raise InputError(f"job {planned.job_id!r} changed its trigger during the backfill; "
                         "try again")
    policy = from_stored(row.policy)
    if policy.broadcast:
        raise InputError(f"job {planned.job_id!r} became broadcast during the backfill")
    found = calendars.load_calendars(conn) if policy.exclude else {}
    absent = [n for n in policy.exclude if n not in found]
    if absent:
        raise InputError(f"job {planned.job_id!r} excludes calendar {absent[0]!r}, which "
                         "does not exist")
    now = database_now(conn) if now is None else now
    zone = parse_zone(json.loads(row.trigger)["tz"])
    have = _recorded(conn, planned)
    fields = run_fields(policy, defaults)
    fires: list[FireRow] = []
    for at in planned.times:
        if at in have:
            continue
        why = calendars.exclusion(found, policy.exclude,
                                  datetime.fromtimestamp(at, zone).date())
        fires.extend(FireRow(
            row.id, row.func, row.args, row.kwargs, at,
            RunStatus.SKIPPED if why else RunStatus.SCHEDULED, bool(row.recover), error=why,
            max_attempts=row.max_attempts, due_at=None if why else round(now, 6),
            backfill=True, grace=row.misfire_grace_seconds, slot=slot, **fields)
            for slot in ([""] if why else policy.slots()))
    runs = insert_runs(conn, fires, epoch, leader, now=now)
    skipped = sum(f.status == RunStatus.SKIPPED for f in fires)
    new = len({run["scheduled_at"] for run in runs})  # fire times: a shard's are several runs
    counts = Counts(row.id, _iso(planned.start), _iso(planned.end), len(planned.times),
                    new, skipped, len(planned.times) - new - skipped)
    return runs, counts


def backfill(conn: Connection, job_id: str, start: str, end: str, epoch: int, leader: str,
             *, now: float | None = None, defaults: Defaults = catalog.DEFAULTS
             ) -> tuple[list[RunRecord], Counts]:
    """:func:`plan` and :func:`record` on one connection (the caller's fenced one)."""
    return record(conn, plan(conn, job_id, start, end, now=now), epoch, leader, now=now,
                  defaults=defaults)


def check_time_text(value: object, what: str) -> str:
    """``value`` if it is text short enough to be a time; InputError otherwise (what a
    caller over the wire sends is checked before anything is read)."""
    if not isinstance(value, str) or len(value) > MAX_TIME_TEXT:
        raise InputError(f"{what} must be an ISO 8601 time such as 2026-12-01T09:00+01:00")
    return value


def _instant(what: str, text: str, tz: str) -> float:
    check_time_text(text, what)
    try:
        spec = make_spec(at=text, tz=tz)
    except InputError as e:
        raise InputError(f"{what}: {e}") from None
    return datetime.fromisoformat(spec["at"]).timestamp()


def _recorded(conn: Connection, planned: Plan) -> set[float]:
    if not planned.times:
        return set()
    r = schema.runs
    query = sa.select(r.c.scheduled_at).where(
        r.c.job_id == planned.job_id,
        r.c.scheduled_at.between(planned.times[0], planned.times[-1]))
    return {float(t) for t in conn.execute(query).scalars()}


def _about(found: list[datetime], high: float) -> int:
    """How many fire times there are up to ``high``, from the rate of the first ones
    (counted from the first found: a range may start years before its trigger's first)."""
    first, last = found[0].timestamp(), found[-1].timestamp()
    if last <= first:
        return len(found)
    return max(len(found), 1 + round((len(found) - 1) * (high - first) / (last - first)))


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _iso(ts: float) -> str:
    return catalog.iso(ts) or ""

