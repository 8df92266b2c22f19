"""Crons across daylight saving time, by cron(8)'s rule (cronie, src/cron.c).

A fixed-time cron (no ``*`` first in its second, minute or hour field) fires a wall time
skipped by a spring-forward change once, at the change, and a repeated wall time in the
first pass only; a wall-clock cron (``*`` first) skips the skipped times and repeats the
repeated ones. The transition dates are 2026's, from the tz database (``TRANSITIONS``).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcluster.definitions.cron import is_fixed
from qcluster.definitions.crontrigger import SEARCH_YEARS, SearchExhausted
from qcluster.definitions.triggers import build_trigger, fire_times
from qcluster.errors import InputError

QUARTER = timedelta(minutes=15)

# --- fixed-time or wall-clock ----------------------------------------------------------------


@pytest.mark.parametrize("expr", [
    "0 1,2 * * *", "30 2 * * *", "0-30/5 1 * * *", "1,*/15 2 * * *", "0 0 13 * 5",
    "@daily", "@midnight", "@weekly", "@monthly", "@yearly", "@annually", "@DAILY",
    "10 30 2 * * *", "hour=9", "hour=2 minute=30", "day=1", "day_of_week=mon-fri",
    "year=2030 month=6", "hour=1,*/2",
])  # fmt: skip
def test_a_cron_without_a_star_first_in_second_minute_or_hour_is_fixed(expr: str) -> None:
    assert is_fixed(expr)


@pytest.mark.parametrize("expr", [
    "* * * * *", "*/15 * * * *", "0 * * * *", "* 2 * * *", "30 */2 * * *", "*/60 2 * * *",
    "@hourly", "*/10 30 2 * * *", "* 30 2 * * *", "minute=5", "minute=0 hour=*",
    "hour= * minute=0", "second=*/10 minute=5 day_of_week=mon-fri", "second=0",
])  # fmt: skip
def test_a_cron_with_a_star_first_in_second_minute_or_hour_follows_the_wall_clock(
    expr: str,
) -> None:
    assert not is_fixed(expr)


def test_is_fixed_refuses_what_the_parser_refuses() -> None:
    with pytest.raises(InputError, match="invalid cron expression"):
        is_fixed("61 * * * *")


# --- the 2026 changes, from the tz database ---------------------------------------------------


def changes(tz: str, year: int = 2026) -> list[tuple[str, str]]:
    """The zone's changes in ``year``: (last wall time before, first wall time after), ISO."""
    zone, found = ZoneInfo(tz), []
    t = datetime(year, 1, 1, tzinfo=UTC)
    while t.year == year:
        nxt = t + QUARTER  # every offset of these zones, and every change, is on the quarter
        if nxt.astimezone(zone).utcoffset() != t.astimezone(zone).utcoffset():
            found.append((t.astimezone(zone).isoformat(timespec="minutes"),
                          nxt.astimezone(zone).isoformat(timespec="minutes")))
        t = nxt
    return found


def test_the_2026_changes_are_those_the_tests_below_assume() -> None:
    """If the tz database moves one, the exact lists below are the ones to revisit."""
    assert changes("America/New_York") == [
        ("2026-03-08T01:45-05:00", "2026-03-08T03:00-04:00"),  # 02:00-03:00 skipped
        ("2026-11-01T01:45-04:00", "2026-11-01T01:00-05:00"),  # 01:00-02:00 twice
    ]
    assert changes("Europe/Berlin") == [
        ("2026-03-29T01:45+01:00", "2026-03-29T03:00+02:00"),
        ("2026-10-25T02:45+02:00", "2026-10-25T02:00+01:00"),
    ]
    assert changes("America/Santiago") == [
        ("2026-04-04T23:45-03:00", "2026-04-04T23:00-04:00"),  # 23:00-24:00 twice
        ("2026-09-05T23:45-04:00", "2026-09-06T01:00-03:00"),  # Sunday's midnight skipped
    ]
    assert changes("Australia/Lord_Howe") == [
        ("2026-04-05T01:45+11:00", "2026-04-05T01:30+10:30"),  # 01:30-02:00 twice
        ("2026-10-04T01:45+10:30", "2026-10-04T02:30+11:00"),  # 02:00-02:30 skipped
    ]
    assert changes("UTC") == []


# --- each zone, each change: exact fire times -------------------------------------------------


def fires(expr: str, tz: str, start: str, end: str) -> list[str]:
    """The fire times of ``expr`` in ``tz`` from ``start`` to ``end`` (ISO, with offsets), as
    ISO wall times with their offsets: each string names one UTC instant."""
    spec = {"type": "cron", "expr": expr, "tz": tz}
    times = fire_times(spec, datetime.fromisoformat(start), datetime.fromisoformat(end), 500)
    assert all(a < b for a, b in pairwise(times))
    return [t.astimezone(ZoneInfo(tz)).isoformat(timespec="minutes") for t in times]


def instants(texts: list[str]) -> list[datetime]:
    return [datetime.fromisoformat(text).astimezone(UTC) for text in texts]


CASES = [
    # (zone, expr, window start, window end, the fire times)
    # America/New_York, spring: 02:00-03:00 EST does not exist on 8 March.
    ("America/New_York", "0 1,2 * * *", "2026-03-07T00:00-05:00", "2026-03-09T23:59-04:00", [
        "2026-03-07T01:00-05:00", "2026-03-07T02:00-05:00",
        "2026-03-08T01:00-05:00", "2026-03-08T03:00-04:00",  # 02:00 at the change
        "2026-03-09T01:00-04:00", "2026-03-09T02:00-04:00"]),
    ("America/New_York", "0 2,3 * * *", "2026-03-07T00:00-05:00", "2026-03-09T23:59-04:00", [
        "2026-03-07T02:00-05:00", "2026-03-07T03:00-05:00",
        "2026-03-08T03:00-04:00",  # 02:00 (at the change) and 03:00: the same instant, once
        "2026-03-09T02:00-04:00", "2026-03-09T03:00-04:00"]),
    ("America/New_York", "0 * * * *", "2026-03-08T00:00-05:00", "2026-03-08T05:00-04:00", [
        "2026-03-08T00:00-05:00", "2026-03-08T01:00-05:00", "2026-03-08T03:00-04:00",
        "2026-03-08T04:00-04:00", "2026-03-08T05:00-04:00"]),
    # America/New_York, autumn: 01:00-02:00 happens twice on 1 November.
    ("America/New_York", "0 1 * * *", "2026-10-31T00:00-04:00", "2026-11-02T23:59-05:00", [
        "2026-10-31T01:00-04:00", "2026-11-01T01:00-04:00", "2026-11-02T01:00-05:00"]),
    ("America/New_York", "0 1,2 * * *", "2026-11-01T00:00-04:00", "2026-11-01T23:59-05:00", [
        "2026-11-01T01:00-04:00", "2026-11-01T02:00-05:00"]),
    ("America/New_York", "0 * * * *", "2026-11-01T00:00-04:00", "2026-11-01T03:00-05:00", [
        "2026-11-01T00:00-04:00", "2026-11-01T01:00-04:00", "2026-11-01T01:00-05:00",
        "2026-11-01T02:00-05:00", "2026-11-01T03:00-05:00"]),
    ("America/New_York", "*/30 * * * *", "2026-11-01T00:30-04:00", "2026-11-01T02:00-05:00", [
        "2026-11-01T00:30-04:00", "2026-11-01T01:00-04:00", "2026-11-01T01:30-04:00",
        "2026-11-01T01:00-05:00", "2026-11-01T01:30-05:00", "2026-11-01T02:00-05:00"]),
    # Europe/Berlin, spring: 02:00-03:00 CET does not exist on 29 March.
    ("Europe/Berlin", "30 2 * * *", "2026-03-28T00:00+01:00", "2026-03-30T23:59+02:00", [
        "2026-03-28T02:30+01:00", "2026-03-29T03:00+02:00", "2026-03-30T02:30+02:00"]),
    ("Europe/Berlin", "0,30 2 * * *", "2026-03-28T00:00+01:00", "2026-03-30T23:59+02:00", [
        "2026-03-28T02:00+01:00", "2026-03-28T02:30+01:00",
        "2026-03-29T03:00+02:00",  # both skipped times, together, once
        "2026-03-30T02:00+02:00", "2026-03-30T02:30+02:00"]),
    ("Europe/Berlin", "*/15 * * * *", "2026-03-29T01:30+01:00", "2026-03-29T03:15+02:00", [
        "2026-03-29T01:30+01:00", "2026-03-29T01:45+01:00", "2026-03-29T03:00+02:00",
        "2026-03-29T03:15+02:00"]),
    ("Europe/Berlin", "* 2 * * *", "2026-03-29T00:00+01:00", "2026-03-29T23:59+02:00", []),
    # Europe/Berlin, autumn: 02:00-03:00 happens twice on 25 October.
    ("Europe/Berlin", "30 2 * * *", "2026-10-24T00:00+02:00", "2026-10-26T23:59+01:00", [
        "2026-10-24T02:30+02:00", "2026-10-25T02:30+02:00", "2026-10-26T02:30+01:00"]),
    ("Europe/Berlin", "*/30 * * * *", "2026-10-25T01:30+02:00", "2026-10-25T03:00+01:00", [
        "2026-10-25T01:30+02:00", "2026-10-25T02:00+02:00", "2026-10-25T02:30+02:00",
        "2026-10-25T02:00+01:00", "2026-10-25T02:30+01:00", "2026-10-25T03:00+01:00"]),
    # America/Santiago, spring: Sunday 6 September starts at 01:00 (its midnight is skipped).
    ("America/Santiago", "@daily", "2026-09-04T12:00-04:00", "2026-09-07T12:00-03:00", [
        "2026-09-05T00:00-04:00", "2026-09-06T01:00-03:00", "2026-09-07T00:00-03:00"]),
    ("America/Santiago", "0 0 * * *", "2026-09-05T12:00-04:00", "2026-09-06T12:00-03:00", [
        "2026-09-06T01:00-03:00"]),
    ("America/Santiago", "30 0 * * 0", "2026-08-29T12:00-04:00", "2026-09-13T12:00-03:00", [
        "2026-08-30T00:30-04:00", "2026-09-06T01:00-03:00", "2026-09-13T00:30-03:00"]),
    ("America/Santiago", "@hourly", "2026-09-05T22:00-04:00", "2026-09-06T02:00-03:00", [
        "2026-09-05T22:00-04:00", "2026-09-05T23:00-04:00", "2026-09-06T01:00-03:00",
        "2026-09-06T02:00-03:00"]),
    # America/Santiago, autumn: 23:00-24:00 happens twice on Saturday 4 April.
    ("America/Santiago", "30 23 * * *", "2026-04-03T12:00-03:00", "2026-04-05T23:59-04:00", [
        "2026-04-03T23:30-03:00", "2026-04-04T23:30-03:00", "2026-04-05T23:30-04:00"]),
    ("America/Santiago", "@daily", "2026-04-03T12:00-03:00", "2026-04-06T12:00-04:00", [
        "2026-04-04T00:00-03:00", "2026-04-05T00:00-04:00", "2026-04-06T00:00-04:00"]),
    ("America/Santiago", "0 * * * *", "2026-04-04T22:00-03:00", "2026-04-05T01:00-04:00", [
        "2026-04-04T22:00-03:00", "2026-04-04T23:00-03:00", "2026-04-04T23:00-04:00",
        "2026-04-05T00:00-04:00", "2026-04-05T01:00-04:00"]),
    # Australia/Lord_Howe, spring (30 minutes): 02:00-02:30 does not exist on 4 October.
    ("Australia/Lord_Howe", "15 2 * * *", "2026-10-03T00:00+10:30",
     "2026-10-05T23:59+11:00", [
         "2026-10-03T02:15+10:30", "2026-10-04T02:30+11:00", "2026-10-05T02:15+11:00"]),
    ("Australia/Lord_Howe", "0,15,30 2 * * *", "2026-10-04T00:00+10:30",
     "2026-10-04T23:59+11:00", ["2026-10-04T02:30+11:00"]),  # three times, one instant
    ("Australia/Lord_Howe", "*/15 * * * *", "2026-10-04T01:30+10:30",
     "2026-10-04T02:45+11:00", [
         "2026-10-04T01:30+10:30", "2026-10-04T01:45+10:30", "2026-10-04T02:30+11:00",
         "2026-10-04T02:45+11:00"]),
    # Australia/Lord_Howe, autumn (30 minutes): 01:30-02:00 happens twice on 5 April.
    ("Australia/Lord_Howe", "45 1 * * *", "2026-04-04T00:00+11:00",
     "2026-04-06T23:59+10:30", [
         "2026-04-04T01:45+11:00", "2026-04-05T01:45+11:00", "2026-04-06T01:45+10:30"]),
    ("Australia/Lord_Howe", "*/15 * * * *", "2026-04-05T01:15+11:00",
     "2026-04-05T02:00+10:30", [
         "2026-04-05T01:15+11:00", "2026-04-05T01:30+11:00", "2026-04-05T01:45+11:00",
         "2026-04-05T01:30+10:30", "2026-04-05T01:45+10:30", "2026-04-05T02:00+10:30"]),
    # UTC: no change, on New York's and Berlin's days.
    ("UTC", "0 1,2 * * *", "2026-03-08T00:00Z", "2026-03-08T23:59Z", [
        "2026-03-08T01:00+00:00", "2026-03-08T02:00+00:00"]),
    ("UTC", "*/30 2 * * *", "2026-10-25T00:00Z", "2026-10-25T23:59Z", [
        "2026-10-25T02:00+00:00", "2026-10-25T02:30+00:00"]),
    # The seconds field, APScheduler's key=value syntax, and dom OR dow, by the same rule.
    ("Europe/Berlin", "15 30 2 * * *", "2026-03-29T00:00+01:00", "2026-03-29T23:59+02:00", [
        "2026-03-29T03:00+02:00"]),
    ("Europe/Berlin", "*/20 30 2 * * *", "2026-03-29T00:00+01:00",
     "2026-03-29T23:59+02:00", []),
    ("Europe/Berlin", "hour=2 minute=30", "2026-03-29T00:00+01:00", "2026-03-29T23:59+02:00", [
        "2026-03-29T03:00+02:00"]),
    ("Europe/Berlin", "minute=30", "2026-03-29T01:00+01:00", "2026-03-29T03:30+02:00", [
        "2026-03-29T01:30+01:00", "2026-03-29T03:30+02:00"]),
    ("America/New_York", "hour=1", "2026-11-01T00:00-04:00", "2026-11-01T23:59-05:00", [
        "2026-11-01T01:00-04:00"]),
    ("Europe/Berlin", "30 2 29 * 0", "2026-03-22T00:00+01:00", "2026-04-05T23:59+02:00", [
        "2026-03-22T02:30+01:00", "2026-03-29T03:00+02:00", "2026-04-05T02:30+02:00"]),
    ("America/New_York", "0 1 1 * 0", "2026-10-31T00:00-04:00", "2026-11-08T23:59-05:00", [
        "2026-11-01T01:00-04:00", "2026-11-08T01:00-05:00"]),
]  # fmt: skip


@pytest.mark.parametrize(("tz", "expr", "start", "end", "expected"), CASES,
                         ids=[f"{c[0]}:{c[1]}:{c[2][:10]}" for c in CASES])
def test_fire_times_across_each_change_are_cronies(
    tz: str, expr: str, start: str, end: str, expected: list[str],
) -> None:
    assert fires(expr, tz, start, end) == expected
    spec = {"type": "cron", "expr": expr, "tz": tz}
    got = fire_times(spec, datetime.fromisoformat(start), datetime.fromisoformat(end), 500)
    assert got == instants(expected)  # the exact UTC instants


# --- the leader's walk: each fire time once -------------------------------------------------


def leader_walk(expr: str, tz: str, first: str, n: int, late: timedelta) -> list[str]:
    """``n`` fire times as the leader plans them (leader/scheduler.FireExecutor._plan): each
    from the previous one as the store gives it back (a float timestamp, in UTC), at a
    ``now`` that is ``late`` past it."""
    trigger = build_trigger({"type": "cron", "expr": expr, "tz": tz})
    nxt = trigger.get_next_fire_time(None, datetime.fromisoformat(first))
    out = []
    while len(out) < n:
        out.append(nxt.astimezone(ZoneInfo(tz)).isoformat(timespec="minutes"))
        stored = datetime.fromtimestamp(nxt.timestamp(), UTC)
        nxt = trigger.get_next_fire_time(stored, max(stored, stored + late))
    return out


@pytest.mark.parametrize("late", [timedelta(0), timedelta(seconds=1), timedelta(minutes=40)])
def test_after_a_fire_at_a_change_the_next_is_the_next_days_time(late: timedelta) -> None:
    assert leader_walk("0 1 * * *", "America/New_York", "2026-11-01T00:00-04:00", 2, late) == [
        "2026-11-01T01:00-04:00", "2026-11-02T01:00-05:00"]  # not 01:00 EST
    assert leader_walk("30 2 * * *", "Europe/Berlin", "2026-03-29T00:00+01:00", 2, late) == [
        "2026-03-29T03:00+02:00", "2026-03-30T02:30+02:00"]  # not 03:00 or 03:30 again
    assert leader_walk("0 1,2 * * *", "America/New_York", "2026-03-08T00:00-05:00", 3,
                       late) == [
        "2026-03-08T01:00-05:00", "2026-03-08T03:00-04:00", "2026-03-09T01:00-04:00"]


@pytest.mark.parametrize("expr", ["30 2 * * *", "*/30 2 * * *", "0,30 1-3 * * *"])
@pytest.mark.parametrize("zone", ["UTC", "Europe/Berlin", "Asia/Tokyo", "America/New_York"])
def test_the_previous_fire_time_counts_as_an_instant_whatever_its_zone(
    expr: str, zone: str,
) -> None:
    trigger = build_trigger({"type": "cron", "expr": expr, "tz": "Europe/Berlin"})
    start = datetime(2026, 10, 24, 22, tzinfo=UTC)  # 00:00 CEST on the autumn day
    times, previous = [], None
    while len(times) < 8:
        nxt = trigger.get_next_fire_time(previous, start if previous is None else previous)
        times.append(nxt.astimezone(UTC))
        previous = nxt.astimezone(ZoneInfo(zone))
    assert times == fire_times(trigger, start, start + timedelta(days=30), 8)


def test_a_now_before_the_previous_fire_time_is_searched_from_now_as_cron_trigger_does() -> None:
    trigger = build_trigger({"type": "cron", "expr": "30 2 * * *", "tz": "Europe/Berlin"})
    previous = datetime.fromisoformat("2026-03-30T02:30+02:00")
    now = datetime.fromisoformat("2026-03-29T00:00+01:00")
    assert trigger.get_next_fire_time(previous, now) == instants(["2026-03-29T03:00+02:00"])[0]


def test_the_bounded_search_holds_in_a_zone_with_dst() -> None:
    trigger = build_trigger({"type": "cron", "expr": "30 2 30 2 *", "tz": "Europe/Berlin"})
    with pytest.raises(SearchExhausted, match=f"within {SEARCH_YEARS} years"):
        trigger.get_next_fire_time(None, datetime(2026, 3, 29, tzinfo=UTC))
    leap = build_trigger({"type": "cron", "expr": "30 2 29 2 *", "tz": "America/New_York"})
    found = leap.get_next_fire_time(None, datetime(2026, 3, 8, 7, tzinfo=UTC))
    assert found.isoformat() == "2028-02-29T02:30:00-05:00"


# --- whole years ------------------------------------------------------------------------------

ZONES = ["America/New_York", "Europe/Berlin", "America/Santiago", "Australia/Lord_Howe", "UTC"]
YEAR = (datetime(2025, 12, 31, tzinfo=UTC), datetime(2027, 1, 2, tzinfo=UTC))


def local_days(times: list[datetime], zone: ZoneInfo) -> list[date]:
    return [t.astimezone(zone).date() for t in times]


def first_showing(wall: datetime, zone: ZoneInfo) -> datetime:
    """The first instant at which the clock of ``zone`` shows ``wall`` or a later time."""
    t = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if t.astimezone(zone).replace(tzinfo=None) == wall:
        return t
    # Skipped: from an instant before the gap, minute by minute (changes fall on the minute).
    t = wall.replace(tzinfo=zone, fold=1).astimezone(UTC).replace(second=0, microsecond=0)
    while t.astimezone(zone).replace(tzinfo=None) < wall:
        t += timedelta(minutes=1)
    return t


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(ZONES), st.integers(0, 23), st.integers(0, 59))
def test_a_fixed_daily_cron_fires_once_every_local_day_of_a_year(
    tz: str, hour: int, minute: int,
) -> None:
    zone = ZoneInfo(tz)
    times = fire_times({"type": "cron", "expr": f"{minute} {hour} * * *", "tz": tz}, *YEAR, 800)
    assert all(a < b for a, b in pairwise(times))
    days = [d for d in local_days(times, zone) if d.year == 2026]
    assert days == [date(2026, 1, 1) + timedelta(days=i) for i in range(365)]
    expected = [first_showing(datetime(d.year, d.month, d.day, hour, minute), zone)
                for d in days]
    assert [t for t in times if t.astimezone(zone).year == 2026] == expected


@pytest.mark.parametrize("tz", ZONES)
@pytest.mark.parametrize("expr", ["0,30 1-3 * * *", "0 2,3 * * *", "15 1,2 * * *"])
def test_a_fixed_cron_fires_each_of_its_times_once_over_a_year(tz: str, expr: str) -> None:
    """Over a whole year: strictly increasing (no instant twice), and the instants are the
    first showing each of its wall times, every skipped time of one gap folded into one."""
    zone = ZoneInfo(tz)
    minutes, hours = (sorted(int(v) for v in part.replace("1-3", "1,2,3").split(","))
                      for part in expr.split()[:2])
    times = fire_times({"type": "cron", "expr": expr, "tz": tz}, *YEAR, 10_000)
    assert all(a < b for a, b in pairwise(times))
    walls = [datetime(2026, 1, 1) + timedelta(days=i, hours=h, minutes=m)
             for i in range(365) for h in hours for m in minutes]
    expected = sorted({first_showing(w, zone) for w in walls})
    assert [t for t in times if t.astimezone(zone).year == 2026] == expected


@pytest.mark.parametrize("tz", ZONES)
@pytest.mark.parametrize(("expr", "minutes", "hours"), [
    pytest.param("0 * * * *", {0}, set(range(24)), id="0 * * * *"),
    pytest.param("*/15 1-3 * * *", {0, 15, 30, 45}, {1, 2, 3}, id="*/15 1-3 * * *"),
])  # fmt: skip
def test_a_wall_clock_cron_fires_at_every_instant_whose_wall_time_matches(
    tz: str, expr: str, minutes: set[int], hours: set[int],
) -> None:
    """Against a scan of every quarter hour of the year (these zones' offsets are on the
    quarter): a skipped time never fires, a repeated one fires in both passes."""
    zone = ZoneInfo(tz)
    start, end = YEAR
    expected, t = [], start
    while t <= end:
        wall = t.astimezone(zone)
        if wall.minute in minutes and wall.hour in hours:
            expected.append(t)
        t += QUARTER
    assert fire_times({"type": "cron", "expr": expr, "tz": tz}, start, end, 20_000) == expected


# --- any minute and hour fields, around every change -----------------------------------------


@st.composite
def time_field(draw: st.DrawFn, top: int) -> tuple[str, list[int]]:
    """A minute (top 59) or hour (top 23) field, and the values it allows."""
    kind = draw(st.sampled_from(["star", "step", "list", "range"]))
    if kind == "star":
        return "*", list(range(top + 1))
    if kind == "step":
        step = draw(st.integers(1, top))
        return f"*/{step}", list(range(0, top + 1, step))
    if kind == "list":
        values = sorted(draw(st.sets(st.integers(0, top), min_size=1, max_size=4)))
        return ",".join(map(str, values)), values
    first = draw(st.integers(0, top))
    last, step = draw(st.integers(first, top)), draw(st.integers(1, 10))
    return f"{first}-{last}/{step}", list(range(first, last + 1, step))


def shown(wall: datetime, zone: ZoneInfo) -> list[datetime]:
    """Every instant at which the clock of ``zone`` shows ``wall``."""
    found = {wall.replace(tzinfo=zone, fold=f).astimezone(UTC) for f in (0, 1)}
    return sorted(t for t in found if t.astimezone(zone).replace(tzinfo=None) == wall)


CHANGE_DAYS = [(tz, datetime.fromisoformat(after).date()) for tz in ZONES[:-1]
               for _, after in changes(tz)]


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(CHANGE_DAYS), time_field(59), time_field(23))
def test_any_minute_and_hour_fields_across_a_change_follow_the_rule(
    change: tuple[str, date], minute: tuple[str, list[int]], hour: tuple[str, list[int]],
) -> None:
    """Three local days around a change, against the rule applied wall time by wall time:
    fixed-time, each matching wall time at the first instant showing it or a later one;
    wall-clock, every instant showing a matching wall time."""
    (tz, day), zone = change, ZoneInfo(change[0])
    expr = f"{minute[0]} {hour[0]} * * *"
    first = datetime(day.year, day.month, day.day) - timedelta(days=1)
    walls = [first + timedelta(days=d, hours=h, minutes=m)
             for d in range(3) for h in hour[1] for m in minute[1]]
    if is_fixed(expr):
        expected = sorted({first_showing(w, zone) for w in walls})
    else:
        expected = sorted(t for w in walls for t in shown(w, zone))
    start = first.replace(tzinfo=zone).astimezone(UTC)
    end = (first + timedelta(days=3)).replace(tzinfo=zone).astimezone(UTC) - timedelta(seconds=1)
    spec = {"type": "cron", "expr": expr, "tz": tz}
    assert fire_times(spec, start, end, 10_000) == expected
