"""Exclusion calendars, as the CLI and Client change and read them.

A change (add, replace, remove) is made as a job change is (:func:`changes.change`):
through the leader's control API while a leader is alive, else written directly, fenced
on the epoch read beforehand. A calendar changes what fires, so it is fenced like a job.
Reads come from the database.

A calendar file holds one date (``2026-12-25``) or inclusive range
(``2026-12-24..2026-12-26``) per line; ``#`` starts a comment, blank lines are ignored.
It is read with :func:`qcluster.settings.read_bounded` (at most :data:`MAX_FILE_BYTES`).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime
from pathlib import Path
from typing import Any

from qcluster.client.changes import Outcome, change
from qcluster.client.reads import read
from qcluster.definitions.policy import check_calendar_name
from qcluster.errors import InputError
from qcluster.settings import Settings, read_bounded
from qcluster.store import calendars

#: 10,000 ranges of 22 characters, with room for comments.
MAX_FILE_BYTES = 1024 * 1024


def read_file(path: Path) -> list[str]:
    """The dates and ranges of a calendar file, each checked; InputError naming the file
    and the line of the first bad one."""
    text = read_bounded(path, MAX_FILE_BYTES, "calendar file", error=InputError)
    items: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        item = line.partition("#")[0].strip()
        if not item:
            continue
        try:
            calendars.parse_dates([item])
        except InputError as e:
            raise InputError(f"{path}: line {n}: {e}") from None
        items.append(item)
        if len(items) > calendars.MAX_RANGES:
            raise InputError(f"{path}: more than {calendars.MAX_RANGES} dates or ranges")
    if not items:
        raise InputError(f"{path}: no dates (one date or range per line)")
    return items


def wire_items(dates: Iterable[object]) -> list[str]:
    """Texts from what a Python caller may give: ``"2026-12-25"``, ``"a..b"``, comma
    lists, :class:`datetime.date` objects and ``(first, last)`` pairs of them."""
    if isinstance(dates, str | bytes) or not isinstance(dates, Iterable):
        raise InputError("dates must be a list of dates or ranges")
    out: list[str] = []
    for item in dates:
        if isinstance(item, tuple) and len(item) == 2 and all(_is_day(d) for d in item):
            out.append(f"{item[0].isoformat()}..{item[1].isoformat()}")
        elif _is_day(item):
            assert isinstance(item, date)
            out.append(item.isoformat())
        elif isinstance(item, str):
            out.append(item)
        else:
            raise InputError(f"a calendar date must be text such as 2026-12-25 or a date, "
                             f"not {type(item).__name__}")
    return out


def _is_day(value: object) -> bool:
    return isinstance(value, date) and not isinstance(value, datetime)


def add_calendar(settings: Settings, name: str, items: list[str], *,
                 replace: bool) -> Outcome:
    """Create calendar ``name`` (with ``replace``, set its dates); the result is
    ``created``, ``replaced`` or ``unchanged``."""
    check_calendar_name(name)
    ranges = calendars.parse_dates(items)
    wire = calendars.Calendar(name, ranges).to_wire()["dates"]
    return change(settings, "add_calendar", (name, wire, replace),
                  lambda conn, _epoch: calendars.put_calendar(conn, name, ranges,
                                                              replace=replace))


def remove_calendar(settings: Settings, name: str) -> Outcome:
    """Remove calendar ``name``; refused while a job excludes it."""
    check_calendar_name(name)
    return change(settings, "remove_calendar", (name,),
                  lambda conn, _epoch: calendars.remove_calendar(conn, name))


def list_calendars(settings: Settings) -> list[dict[str, Any]]:
    return read(settings, calendars.list_calendars)


def show_calendar(settings: Settings, name: str) -> dict[str, Any]:
    check_calendar_name(name)
    return read(settings, lambda conn: calendars.show_calendar(conn, name))
