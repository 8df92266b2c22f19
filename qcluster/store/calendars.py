"""Exclusion calendars: named sets of dates, the owner of ``qc_calendars``.

A calendar is a list of date ranges (a single date is a range of one day), kept merged and
sorted. A job names calendars in its ``exclude`` policy; a fire time whose date, in the
job's own zone, lies in one of them is recorded ``skipped``, naming the calendar
(``leader/scheduler.py``). Dates, not instants: "2026-12-25" excludes that whole local day
wherever the job runs, as Quartz's HolidayCalendar does.

Every write is a function of this module, on the caller's connection, in the transaction
it opened (fenced on the epoch, like every job change: a calendar changes what fires).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
from collections.abc import Iterable, Sequence
from datetime import date, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from qcluster.definitions.cron import quote
from qcluster.definitions.policy import check_calendar_name, from_stored
from qcluster.errors import InputError
from qcluster.store import schema
from qcluster.store.db import database_now

MAX_RANGES = 10_000
_EARLIEST, _LATEST = date(1970, 1, 1), date(9999, 12, 31)


@dataclasses.dataclass(frozen=True)
class Calendar:
    """A named, sorted list of disjoint, inclusive date ranges."""

    name: str
    ranges: tuple[tuple[date, date], ...]
    version: int = 1

    def excludes(self, day: date) -> bool:
        i = bisect.bisect_right(self.ranges, (day, _LATEST)) - 1
        return i >= 0 and self.ranges[i][0] <= day <= self.ranges[i][1]

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version,
                "dates": [_text(a, b) for a, b in self.ranges],
                "days": sum((b - a).days + 1 for a, b in self.ranges)}


def _text(first: date, last: date) -> str:
    return first.isoformat() if first == last else f"{first.isoformat()}..{last.isoformat()}"


def parse_dates(items: Iterable[object]) -> tuple[tuple[date, date], ...]:
    """Ranges from ``2026-12-25`` or ``2026-12-24..2026-12-26`` items (also comma lists):
    merged and sorted. InputError (one line, quoting the item) for anything else, an empty
    or blank item too (``a,,b``, ``a,``, ``a, ,b``, ``""``)."""
    ranges: list[tuple[date, date]] = []
    for item in items:
        if not isinstance(item, str):
            raise InputError(f"a calendar date must be text such as 2026-12-25, not "
                             f"{type(item).__name__}")
        for part in item.split(","):
            part = part.strip()
            if not part:
                raise InputError(f"calendar dates {quote(item, 40)} have an empty item: "
                                 "each item, between commas, must be a date or range")
            first_text, sep, last_text = part.partition("..")
            first = _day(first_text, part)
            last = _day(last_text, part) if sep else first
            if last < first:
                raise InputError(f"calendar range {part[:40]!r} ends before it begins")
            ranges.append((first, last))
            if len(ranges) > MAX_RANGES:
                raise InputError(f"a calendar holds at most {MAX_RANGES} dates or ranges")
    if not ranges:
        raise InputError("a calendar needs at least one date")
    ranges.sort()
    merged = [ranges[0]]
    for first, last in ranges[1:]:
        if first <= merged[-1][1] + timedelta(days=1):
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return tuple(merged)


def _day(text: str, item: str) -> date:
    try:
        day = date.fromisoformat(text.strip())
    except ValueError:
        raise InputError(f"cannot read calendar date {item[:40]!r}: use YYYY-MM-DD or "
                         "YYYY-MM-DD..YYYY-MM-DD") from None
    if not _EARLIEST <= day <= _LATEST:
        raise InputError(f"calendar date {item[:40]!r} is out of range")
    return day


def _from_row(row: Any) -> Calendar:
    return Calendar(row.name, tuple((date.fromisoformat(a), date.fromisoformat(b))
                                    for a, b in json.loads(row.dates)), int(row.version))


def put_calendar(conn: Connection, name: str, ranges: Sequence[tuple[date, date]], *,
                 replace: bool, now: float | None = None) -> str:
    """Create calendar ``name`` (or, with ``replace``, set its dates); ``created``,
    ``replaced`` or ``unchanged``. InputError if it exists and ``replace`` is not given."""
    check_calendar_name(name)
    c = schema.calendars
    now = database_now(conn) if now is None else now
    dates = json.dumps([[a.isoformat(), b.isoformat()] for a, b in ranges])
    row = conn.execute(sa.select(c).where(c.c.name == name)).one_or_none()
    if row is None:
        conn.execute(c.insert().values(name=name, dates=dates, version=1, created_at=now,
                                       updated_at=now))
        return "created"
    if not replace:
        raise InputError(f"calendar {name!r} exists (use --replace to change its dates)")
    if row.dates == dates:
        return "unchanged"
    conn.execute(c.update().where(c.c.name == name)
                 .values(dates=dates, version=row.version + 1, updated_at=now))
    return "replaced"


def remove_calendar(conn: Connection, name: str) -> None:
    """Delete calendar ``name``. InputError if there is none, or if a job excludes it
    (name them: a job would otherwise fire on the dates it was meant to skip).

    The row is locked ``FOR UPDATE`` before the jobs are read, and :func:`missing` reads
    it ``FOR SHARE`` (PostgreSQL; SQLite's writers are serialized anyway): a job written
    in a concurrent transaction that names this calendar either commits first, and is
    seen here (the removal is refused), or waits, and then finds no calendar (the job is
    refused). Neither order leaves a job excluding a calendar that does not exist."""
    c = schema.calendars
    found = conn.execute(sa.select(c.c.name).where(c.c.name == name)
                         .with_for_update()).one_or_none()
    if found is None:
        raise InputError(f"no calendar {name!r}")
    users = jobs_using(conn, name)
    if users:
        shown = ", ".join(repr(u) for u in users[:5]) + (" ..." if len(users) > 5 else "")
        raise InputError(f"calendar {name!r} is excluded by {len(users)} jobs ({shown}): "
                         "change them first")
    conn.execute(c.delete().where(c.c.name == name))


def jobs_using(conn: Connection, name: str) -> list[str]:
    """The ids of the jobs whose ``exclude`` names calendar ``name``."""
    j = schema.jobs
    rows = conn.execute(sa.select(j.c.id, j.c.policy)
                        .where(j.c.policy.like(f"%{_like_escape(name)}%", escape="\\")))
    found = []
    for row in rows:
        try:
            if name in from_stored(row.policy).exclude:
                found.append(row.id)
        except InputError:
            continue
    return sorted(found)


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def missing(conn: Connection, names: Iterable[str]) -> list[str]:
    """Those of ``names`` that are no calendar, sorted. The calendars found are locked
    ``FOR SHARE`` until the caller's transaction ends, so that none of them is removed
    before the job that names it is committed (see :func:`remove_calendar`)."""
    wanted = set(names)
    if not wanted:
        return []
    c = schema.calendars
    have = set(conn.execute(sa.select(c.c.name).where(c.c.name.in_(sorted(wanted)))
                            .with_for_update(read=True)).scalars())
    return sorted(wanted - have)


def get_calendar(conn: Connection, name: str) -> Calendar:
    c = schema.calendars
    row = conn.execute(sa.select(c).where(c.c.name == name)).one_or_none()
    if row is None:
        raise InputError(f"no calendar {name!r}")
    return _from_row(row)


def load_calendars(conn: Connection) -> dict[str, Calendar]:
    """Every calendar, by name."""
    return {row.name: _from_row(row) for row in conn.execute(sa.select(schema.calendars))}


def versions(conn: Connection) -> dict[str, int]:
    """Each calendar's version: what a leader's cache compares."""
    c = schema.calendars
    return {row.name: int(row.version) for row in conn.execute(sa.select(c.c.name,
                                                                          c.c.version))}


# -- what the read commands show ---------------------------------------------------------


def list_calendars(conn: Connection) -> list[dict[str, Any]]:
    """Every calendar, by name: its version, how many ranges and days, its first and last
    date, and how many jobs exclude it."""
    out = []
    for cal in sorted(load_calendars(conn).values(), key=lambda c: c.name):
        wire = cal.to_wire()
        out.append({"name": cal.name, "version": cal.version, "ranges": len(cal.ranges),
                    "days": wire["days"], "first": cal.ranges[0][0].isoformat(),
                    "last": cal.ranges[-1][1].isoformat(),
                    "jobs": len(jobs_using(conn, cal.name))})
    return out


def show_calendar(conn: Connection, name: str) -> dict[str, Any]:
    """One calendar (:meth:`Calendar.to_wire`) and the ids of the jobs that exclude it.
    InputError if there is none."""
    return {**get_calendar(conn, name).to_wire(), "jobs": jobs_using(conn, name)}


def exclusion(found: dict[str, Calendar], names: Iterable[str], day: date) -> str | None:
    """The error of a ``skipped`` run whose local date is ``day``, for a job that excludes
    ``names``: ``"excluded by calendar NAME"`` for the first of them (in the job's order)
    that holds ``day``; None if none does. A name missing from ``found`` holds no date."""
    for name in names:
        cal = found.get(name)
        if cal is not None and cal.excludes(day):
            return f"excluded by calendar {name}"
    return None
