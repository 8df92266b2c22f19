"""Cron triggers on a zone's wall clock, with cron(8)'s rule for daylight saving time.

:class:`WallClockCronTrigger` keeps APScheduler 3.11's CronTrigger for matching and does
its own placing in time. The wall times a cron matches are found by a CronTrigger in UTC
(a clock without DST, on which APScheduler's field walk is exact), then each is put on the
zone's timeline by the rule of :mod:`qcluster.definitions.triggers` (cronie's, src/cron.c):

* fixed-time (``fixed=True``): a wall time fires at the first instant at which the zone's
  clock shows it or a later one. A time in the first pass of a repeated hour, or an
  ordinary one, fires when the clock shows it; a time skipped by a gap fires at the first
  instant after the gap. So a repeated time never fires in its second pass, and every
  skipped time of one gap fires at the same instant, once.
* wall-clock (``fixed=False``): every instant whose wall time matches fires, once each: none
  for a skipped time, both passes of a repeated one.

Promises: a trigger returns each instant once and in order (given the previous fire time,
the next is strictly later; ``tests/definitions/test_dst.py`` walks whole years), answers
depend on the instants given and not on their zones, and no local day is lost (stock
APScheduler 3.11.3 makes ``@daily`` lose the day after a spring-forward change, issue
#529). Times come back aware, in the trigger's zone.

The next-fire search looks at most :data:`SEARCH_YEARS` past ``max(previous, now)``, then
raises :class:`SearchExhausted`: APScheduler 3.11 walks an impossible date (Feb 31) year by
year to 9999 (0.26 s of CPU a call). Year 9999 or an ended ``year=`` gives None.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.combining import OrTrigger
from apscheduler.triggers.cron import CronTrigger

from qcluster.errors import InputError

_When = datetime | None
_MICROSECOND = timedelta(microseconds=1)
_SECOND = timedelta(seconds=1)

SEARCH_YEARS = 5  # how far ahead a cron's next fire time is looked for
SEARCH_WINDOW = timedelta(days=366 * SEARCH_YEARS)
# A wall time is within a day of its instant (UTC offsets stay below 24 h), so the walk of
# wall times may stop a day past the bound; the instant found is then held to the bound.
_WALL_MARGIN = timedelta(days=1)
_search = threading.local()  # .limit: the bound, as a wall time, of this thread's search


class SearchExhausted(InputError, ValueError):
    """No fire time within :data:`SEARCH_YEARS`: one line at the edge, set aside by the
    leader's pass (which catches ValueError). ``bound``: the instant (UTC) up to which
    the search found none; a walk over a range may go on from there
    (``definitions/triggers.fire_times``)."""

    def __init__(self, message: str, bound: datetime | None = None) -> None:
        super().__init__(message)
        self.bound = bound


class _PastLimit(Exception):
    """The walk of one search went past its bound (internal)."""


def _utc(dt: datetime) -> datetime:
    return dt.astimezone(UTC)


# --- a zone's clock ------------------------------------------------------------------------
# Instants are aware UTC datetimes; wall times are naive datetimes of the zone's clock.


def _wall(instant: datetime, zone: tzinfo) -> datetime:
    return instant.astimezone(zone).replace(tzinfo=None, fold=0)


def _shown(wall: datetime, zone: tzinfo) -> list[datetime]:
    """The instants at which the clock shows ``wall``: none (a gap), one, or two (a repeated
    hour; the first pass first)."""
    found = []
    for fold in (0, 1):
        instant = _utc(wall.replace(tzinfo=zone, fold=fold))
        if _wall(instant, zone) == wall and instant not in found:
            found.append(instant)
    return sorted(found)


def _change(lo: datetime, hi: datetime, zone: tzinfo) -> datetime:
    """The first instant in (lo, hi] whose UTC offset is not lo's (one change lies there)."""
    offset = lo.astimezone(zone).utcoffset()
    while hi - lo > _MICROSECOND:
        mid = lo + (hi - lo) // 2
        if mid.astimezone(zone).utcoffset() == offset:
            lo = mid
        else:
            hi = mid
    return hi


def _gap_end(wall: datetime, zone: tzinfo) -> datetime:
    """The first instant after the gap that skips ``wall``."""
    # PEP 495: fold=1 reads a skipped time with the offset after the change (an instant
    # before it), fold=0 with the offset before (an instant after it).
    return _change(_utc(wall.replace(tzinfo=zone, fold=1)),
                   _utc(wall.replace(tzinfo=zone, fold=0)), zone)


def _repeat(instant: datetime, zone: tzinfo) -> tuple[datetime, datetime] | None:
    """For an instant in a repeated hour, (the change, the wall time at which the repeat
    ends); else None."""
    wall = _wall(instant, zone)
    first, second = (_utc(wall.replace(tzinfo=zone, fold=f)) for f in (0, 1))
    if first == second:
        return None
    change = _change(first, second, zone)
    return change, wall + (change - first)


# --- triggers ------------------------------------------------------------------------------


class _WallTimes(CronTrigger):  # type: ignore[misc]
    """The wall times a cron matches: its fields walked on a clock without DST. The walk
    stops at the bound of the search under way (``_search.limit``).

    Relies on ``CronTrigger._increment_field_value`` and ``__setstate__``; pyproject pins
    APScheduler < 3.12, and tests/definitions/test_limits.py guards the bound.
    """

    __slots__ = ()

    def __init__(self, fields: list[Any]) -> None:
        # The cron's own parsed fields (they match calendar values, whatever the zone), set
        # as unpickling sets them: no second parse.
        self.__setstate__({"version": 2, "timezone": UTC, "start_date": None,
                           "end_date": None, "fields": fields, "jitter": None})

    def next_wall(self, wall: datetime) -> datetime | None:
        """The first matching wall time at or after ``wall`` (whole seconds)."""
        found: datetime | None = self.get_next_fire_time(None, wall.replace(tzinfo=UTC))
        return None if found is None else found.replace(tzinfo=None)

    def _increment_field_value(self, dateval: datetime, fieldnum: int) -> tuple[datetime, int]:
        candidate, fieldnum = super()._increment_field_value(dateval, fieldnum)
        # Every step that moves the walk into a later month or year comes through here:
        # the one place to stop a search that would walk to the year 9999.
        limit: datetime | None = getattr(_search, "limit", None)
        if limit is not None and candidate > limit:
            raise _PastLimit
        return candidate, fieldnum


class WallClockCronTrigger(CronTrigger):  # type: ignore[misc]
    """A cron on the wall clock of ``timezone``, fixed-time or wall-clock across DST (module
    doc). ``fields`` are CronTrigger's keywords; ``fixed`` is
    :func:`qcluster.definitions.cron.is_fixed` of the expression they come from.

    Like CronTrigger, the search starts at ``now`` without a previous fire time, else one
    microsecond after it (or at ``now``, if that is earlier), rounded up to the second.
    """

    __slots__ = ("_walls", "fixed")

    def __init__(self, *, fixed: bool, timezone: tzinfo, **fields: str) -> None:
        super().__init__(**fields, timezone=timezone)
        self.fixed = fixed
        self._walls = _WallTimes(self.fields)

    def get_next_fire_time(self, previous_fire_time: _When, now: datetime) -> _When:
        # All in UTC: aware times sharing a tzinfo compare by wall time, which is wrong in a
        # repeated hour (PEP 495), and a previous time may come back in any zone.
        origin = start = _utc(now)
        if previous_fire_time is not None:
            previous = _utc(previous_fire_time)
            origin = max(origin, previous)
            if start >= previous:  # CronTrigger: min(now, previous + 1 us), never previous
                start = previous + _MICROSECOND
        outer = getattr(_search, "limit", None)
        try:
            bound: datetime | None = origin + SEARCH_WINDOW
            _search.limit = origin + SEARCH_WINDOW + _WALL_MARGIN
        except OverflowError:  # within 5 years of 9999: the walk ends there anyway
            bound = _search.limit = None
        try:
            if start.microsecond:
                start = start.replace(microsecond=0) + _SECOND
            found = self._fixed_time(start) if self.fixed else self._wall_clock(start)
            if found is not None and bound is not None and found > bound:
                raise _PastLimit  # jumped there in one step (``year=2040``): the same rule
        except OverflowError:  # walked off year 9999
            return None
        except _PastLimit:
            raise SearchExhausted(
                f"no fire time within {SEARCH_YEARS} years after {origin:%Y-%m-%d}",
                bound) from None
        finally:
            _search.limit = outer
        return None if found is None else found.astimezone(self.timezone)

    def _fixed_time(self, start: datetime) -> datetime | None:
        """The first instant at or after ``start`` at which the clock first shows a matching
        wall time or a later one. The walk of wall times starts at the earliest one whose
        instant is not before ``start``: ``start``'s own, unless noted below."""
        zone = self.timezone
        wall = _wall(start, zone)
        repeat = _repeat(start, zone)
        before = _wall(start - _MICROSECOND, zone) + _MICROSECOND
        if repeat is not None and start >= repeat[0]:
            wall = repeat[1]  # a second pass: its times were first shown in the first pass
        elif before < wall:
            wall = before  # the first instant after a gap: the skipped times fire here
        match = self._walls.next_wall(wall)
        if match is None:
            return None
        shown = _shown(match, zone)
        return shown[0] if shown else _gap_end(match, zone)

    def _wall_clock(self, start: datetime) -> datetime | None:
        """The first instant at or after ``start`` whose wall time matches."""
        zone = self.timezone
        while True:
            wall = _wall(start, zone)
            match = self._walls.next_wall(wall)
            if match is None:
                return None
            repeat = _repeat(start, zone)
            if repeat is not None and start < repeat[0]:  # a first pass, then the second
                change, end = repeat
                if match < end:
                    return _utc(match.replace(tzinfo=zone, fold=0))
                again = self._walls.next_wall(_wall(change, zone))
                if again is not None and again < end:
                    return _utc(again.replace(tzinfo=zone, fold=1))
            later = [t for t in _shown(match, zone) if t >= start]
            if later:
                return later[0]
            start = _gap_end(match, zone)  # skipped: go on after the gap


class EitherCronTrigger(OrTrigger):  # type: ignore[misc]
    """Fires when any child fires: crontab's dom-OR-dow rule.

    Unlike OrTrigger it compares UTC instants (datetimes sharing a tzinfo compare by wall
    time, which is wrong in the autumn fold); on a tie the first child's time wins, and the
    instant is returned once.
    """

    __slots__ = ("timezone",)

    def __init__(self, triggers: list[BaseTrigger], timezone: tzinfo) -> None:
        super().__init__(triggers)
        self.timezone = timezone

    def get_next_fire_time(self, previous_fire_time: _When, now: datetime) -> _When:
        # A child with no time within the bound (the Feb 31 half of ``0 0 31 2 1``) does not
        # count when another has one: that one is within the bound, so it is the earliest.
        found: list[datetime] = []
        exhausted: SearchExhausted | None = None
        for trigger in self.triggers:
            try:
                t = trigger.get_next_fire_time(previous_fire_time, now)
            except SearchExhausted as e:
                exhausted = e
                continue
            if t is not None:
                found.append(t)
        if found:
            return min(found, key=_utc)
        if exhausted is not None:
            raise exhausted
        return None
