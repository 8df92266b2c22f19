"""Unit tests for qcluster.definitions.triggers: crontab dialect, specs, zones, DST, round trips."""

from __future__ import annotations

import json
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from apscheduler.triggers.combining import OrTrigger
from apscheduler.triggers.cron import CronTrigger
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcluster.definitions.crontrigger import EitherCronTrigger, WallClockCronTrigger
from qcluster.definitions.triggers import (
    AlignedIntervalTrigger,
    build_trigger,
    describe,
    fire_times,
    format_duration,
    make_spec,
    parse_duration,
    parse_zone,
    validate_spec,
)
from qcluster.errors import InputError

NOW = datetime(2026, 3, 25, 12, 0, tzinfo=UTC)  # a Wednesday
FAR = datetime(2100, 1, 1, tzinfo=UTC)
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def cron_times(expr: str, n: int = 5, tz: str = "UTC", start: datetime = NOW) -> list[datetime]:
    """The first n fire times of a --cron job, as wall times of its zone."""
    spec = make_spec(cron=expr, tz=tz, now=start)
    return [t.astimezone(ZoneInfo(tz)) for t in fire_times(spec, start, FAR, n)]


def walls(times: list[datetime]) -> list[str]:
    return [t.strftime("%a %Y-%m-%d %H:%M:%S%z") for t in times]


# --- crontab weekday numbering --------------------------------------------------------------


def test_crontab_1_is_monday_where_apschedulers_from_crontab_says_tuesday() -> None:
    ours = cron_times("0 9 * * 1")
    assert all(t.strftime("%a %H:%M") == "Mon 09:00" for t in ours)
    assert ours[0] == datetime(2026, 3, 30, 9, tzinfo=UTC)
    # The trap this module exists to avoid: stock APScheduler maps 0 to Monday.
    stock = CronTrigger.from_crontab("0 9 * * 1", timezone=UTC).get_next_fire_time(None, NOW)
    assert stock.strftime("%a") == "Tue"


@pytest.mark.parametrize("dow", ["0", "7", "sun", "SUN", "Sun", "0,7", "7-7"])
def test_sunday_is_0_and_7_and_sun_in_any_case(dow: str) -> None:
    times = cron_times(f"0 9 * * {dow}", n=3)
    assert [t.day for t in times] == [29, 5, 12]
    assert {t.strftime("%a") for t in times} == {"Sun"}


@pytest.mark.parametrize("dow", ["mon-fri", "1-5", "MON-FRI", "mon,tue,wed,thu,fri", "1-5/1"])
def test_mon_fri_fires_on_weekdays_only(dow: str) -> None:
    times = cron_times(f"30 8 * * {dow}", n=10)
    assert [t.strftime("%a") for t in times[:5]] == ["Thu", "Fri", "Mon", "Tue", "Wed"]
    assert {t.strftime("%a") for t in times} == {"Mon", "Tue", "Wed", "Thu", "Fri"}


@pytest.mark.parametrize(
    ("dow", "days"),
    [
        ("fri-mon", ["Fri", "Sat", "Sun", "Mon"]),
        ("5-1", ["Fri", "Sat", "Sun", "Mon"]),
        ("fri-sun", ["Fri", "Sat", "Sun"]),
        ("5-7", ["Fri", "Sat", "Sun"]),
        ("sat-sun", ["Sat", "Sun"]),
        ("fri-tue/2", ["Fri", "Sun", "Tue"]),
        ("*/2", ["Sun", "Tue", "Thu", "Sat"]),
        ("1/2", ["Mon", "Wed", "Fri", "Sun"]),
        ("0-7", ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]),
    ],
)
def test_day_of_week_ranges_wrap_round_the_week(dow: str, days: list[str]) -> None:
    times = cron_times(f"0 12 * * {dow}", n=len(days) * 3, start=datetime(2026, 3, 23, tzinfo=UTC))
    assert {t.strftime("%a") for t in times} == set(days)


# --- macros, seconds, APScheduler syntax ---------------------------------------------------


@pytest.mark.parametrize(
    ("macro", "first", "second"),
    [
        ("@yearly", "2027-01-01 00:00", "2028-01-01 00:00"),
        ("@annually", "2027-01-01 00:00", "2028-01-01 00:00"),
        ("@monthly", "2026-04-01 00:00", "2026-05-01 00:00"),
        ("@weekly", "2026-03-29 00:00", "2026-04-05 00:00"),  # Sundays
        ("@daily", "2026-03-26 00:00", "2026-03-27 00:00"),
        ("@midnight", "2026-03-26 00:00", "2026-03-27 00:00"),
        ("@hourly", "2026-03-25 12:00", "2026-03-25 13:00"),
        ("@DAILY", "2026-03-26 00:00", "2026-03-27 00:00"),
    ],
)
def test_macros(macro: str, first: str, second: str) -> None:
    assert [t.strftime("%Y-%m-%d %H:%M") for t in cron_times(macro, n=2)] == [first, second]


@pytest.mark.parametrize("macro", ["@reboot", "@fortnightly", "@", "@daily 5"])
def test_reboot_and_unknown_macros_are_refused(macro: str) -> None:
    with pytest.raises(InputError, match="invalid cron expression"):
        make_spec(cron=macro, now=NOW)


def test_six_fields_put_seconds_first() -> None:
    times = cron_times("*/20 * * * * *", n=4)
    assert [t.strftime("%M:%S") for t in times] == ["00:00", "00:20", "00:40", "01:00"]
    times = cron_times("15 30 9 * * mon-fri", n=2)
    assert walls(times) == ["Thu 2026-03-26 09:30:15+0000", "Fri 2026-03-27 09:30:15+0000"]


def test_apscheduler_keyword_syntax_passes_through_with_its_own_weekdays() -> None:
    times = cron_times("second=*/10 minute=5 day_of_week=mon-fri", n=3)
    assert [t.strftime("%H:%M:%S") for t in times] == ["12:05:00", "12:05:10", "12:05:20"]
    # Here day_of_week=0 is APScheduler's Monday, unlike crontab's Sunday.
    assert cron_times("day_of_week=0 hour=9", n=1)[0].strftime("%a %H:%M") == "Mon 09:00"
    # A bare word continues the previous value.
    assert walls(cron_times("day=last fri hour=9", n=2)) == [
        "Fri 2026-03-27 09:00:00+0000", "Fri 2026-04-24 09:00:00+0000"]


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("minute=99", "minute='99' is not a valid APScheduler expression"),
        ("timezone=UTC", "unknown field 'timezone'"),
        ("hour=1 hour=2", "hour given twice"),
        ("fri day=1", "expected key=value"),
        ("day=2nd blursday", "day='2nd blursday' is not a valid"),
    ],
)
def test_bad_keyword_syntax_gives_our_message(expr: str, message: str) -> None:
    with pytest.raises(InputError) as info:
        make_spec(cron=expr, now=NOW)
    assert message in str(info.value)
    assert str(info.value).startswith(f"invalid cron expression '{expr}': ")


# --- day-of-month OR day-of-week, steps, ranges --------------------------------------------


def test_dom_and_dow_both_restricted_fire_when_either_matches() -> None:
    times = cron_times("0 0 13 * 5", n=6)  # every 13th, and every Friday
    assert walls(times) == [
        "Fri 2026-03-27 00:00:00+0000", "Fri 2026-04-03 00:00:00+0000",
        "Fri 2026-04-10 00:00:00+0000", "Mon 2026-04-13 00:00:00+0000",
        "Fri 2026-04-17 00:00:00+0000", "Fri 2026-04-24 00:00:00+0000",
    ]
    assert isinstance(build_trigger(make_spec(cron="0 0 13 * 5", now=NOW)), EitherCronTrigger)


def test_a_field_starting_with_star_is_unrestricted_so_dom_and_dow_are_anded() -> None:
    times = cron_times("0 0 */2 * mon", n=3)  # odd days that are Mondays (Vixie rule)
    assert walls(times) == ["Mon 2026-04-13 00:00:00+0000", "Mon 2026-04-27 00:00:00+0000",
                            "Mon 2026-05-11 00:00:00+0000"]
    assert all(t.day % 2 == 1 for t in cron_times("0 0 */2 * mon", n=20))


@pytest.mark.parametrize(
    ("expr", "minutes"),
    [
        ("*/15 12 * * *", [0, 15, 30, 45]),
        ("5/20 12 * * *", [5, 25, 45]),
        ("10-30/10 12 * * *", [10, 20, 30]),
        ("1,2,58-59 12 * * *", [1, 2, 58, 59]),
        ("*/60 12 * * *", [0]),
        ("0-10/20 12 * * *", [0]),
        ("07 12 * * *", [7]),
    ],
)
def test_minute_steps_lists_and_ranges(expr: str, minutes: list[int]) -> None:
    assert [t.minute for t in cron_times(expr, n=len(minutes))] == minutes
    assert cron_times(expr, n=len(minutes) + 1)[-1].day == 26  # and then tomorrow


def test_hour_and_month_steps_and_month_names() -> None:
    midnight = datetime(2026, 3, 25, tzinfo=UTC)
    assert [t.hour for t in cron_times("0 1-5/2 * * *", n=3, start=midnight)] == [1, 3, 5]
    assert [t.month for t in cron_times("0 0 1 */3 *", n=4)] == [4, 7, 10, 1]
    assert [t.month for t in cron_times("0 0 1 JAN-mar,dec *", n=4)] == [12, 1, 2, 3]


def test_leap_day_fires_only_in_leap_years() -> None:
    assert [t.year for t in cron_times("0 0 29 2 *", n=3)] == [2028, 2032, 2036]


@pytest.mark.parametrize(
    ("expr", "reason"),
    [
        ("61 * * * *", "minute value 61 out of range 0-59"),
        ("0 24 * * *", "hour value 24 out of range 0-23"),
        ("0 0 0 * *", "day-of-month value 0 out of range 1-31"),
        ("0 0 * 13 *", "month value 13 out of range 1-12"),
        ("0 9 * * 8", "day-of-week value 8 out of range 0-7"),
        ("30-10 * * * *", "minute range 30-10 is reversed"),
        ("*/0 * * * *", "minute: step must be at least 1"),
        ("0 0 L * *", "(Quartz L/W/#/? are not supported)"),
        ("0 0 ? * 1", "(Quartz L/W/#/? are not supported)"),
        ("0 9 * * blursday", "day-of-week: unknown value 'blursday'"),
        ("0 9 * *", "expected 5 fields, or 6 with seconds first, got 4"),
        ("0 0 9 * * * 2026", "got 7"),
        ("0 0 31 2 *", "it never fires"),
        ("year=2020", "it never fires"),
        ("1,,2 * * * *", "minute: cannot read ''"),
        ("99999999999999999999 * * * *", "out of range 0-59"),
    ],
)
def test_malformed_cron_says_what_is_wrong_in_one_line(expr: str, reason: str) -> None:
    with pytest.raises(InputError) as info:
        make_spec(cron=expr, now=NOW)
    assert str(info.value).startswith(f"invalid cron expression {expr!r}: ")
    assert reason in str(info.value) and "\n" not in str(info.value)


def test_the_briefs_example_message() -> None:
    with pytest.raises(InputError) as info:
        make_spec(cron="61 * * * *")
    message = "invalid cron expression '61 * * * *': minute value 61 out of range 0-59"
    assert str(info.value) == message


# --- cron against a brute-force crontab(5) matcher ----------------------------------------


def _render(values: list[int], names: list[str] | None, draw: Any) -> str:
    if draw(st.booleans()) and names:
        return ",".join(names[v] for v in values)
    return ",".join(str(v) for v in values)


@st.composite
def crontab_lines(draw: Any) -> tuple[str, list[set[int]], bool, bool]:
    """A 5-field line drawn from value sets, the sets (Sunday = 0), and the two star flags."""
    limits = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 6)]
    month_names = ["", "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov",
                   "dec"]
    day_names = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
    parts, sets, stars = [], [], []
    for i, (lo, hi) in enumerate(limits):
        star = draw(st.booleans()) if i in (2, 4) else draw(st.integers(0, 3)) == 0
        if star:
            parts.append("*")
            sets.append(set(range(lo, hi + 1)))
        else:
            values = sorted(draw(st.sets(st.integers(lo, hi), min_size=1, max_size=4)))
            names = month_names if i == 3 else day_names if i == 4 else None
            text = _render(values, names, draw)
            if i == 4 and 0 in values and draw(st.booleans()):
                text = text.replace("sun", "7") if "sun" in text else ",".join(
                    "7" if v == 0 else str(v) for v in values)
            parts.append(text)
            sets.append(set(values))
        stars.append(star)
    return " ".join(parts), sets, stars[2], stars[4]


def _reference(sets: list[set[int]], dom_star: bool, dow_star: bool, start: datetime,
               days: int) -> list[datetime]:
    minutes, hours, doms, months, dows = sets
    out = []
    for d in range(days):
        day = start + timedelta(days=d)
        dom_ok, dow_ok = day.day in doms, (day.isoweekday() % 7) in dows
        day_ok = (dom_ok and dow_ok) if (dom_star or dow_star) else (dom_ok or dow_ok)
        if day_ok and day.month in months:
            out += [day.replace(hour=h, minute=m) for h in sorted(hours) for m in sorted(minutes)]
    return out


@settings(max_examples=60, deadline=None)
@given(crontab_lines())
def test_cron_agrees_with_a_brute_force_crontab_matcher(
    line: tuple[str, list[set[int]], bool, bool],
) -> None:
    expr, sets, dom_star, dow_star = line
    start, days = datetime(2026, 1, 1, tzinfo=UTC), 100
    expected = _reference(sets, dom_star, dow_star, start, days)
    end = start + timedelta(days=days) - timedelta(seconds=1)
    spec = {"type": "cron", "expr": expr, "tz": "UTC"}  # validate, without the never-fires check
    limit = 150  # enough to cross many days for sparse lines; dense ones stop early
    assert fire_times(spec, start, end, limit) == expected[:limit]


# --- intervals -----------------------------------------------------------------------------


def test_interval_start_is_now_truncated_to_the_whole_second() -> None:
    a = make_spec(every="1s", now=datetime(2026, 1, 1, 12, 0, 0, 100, tzinfo=UTC))
    b = make_spec(every=1, now=datetime(2026, 1, 1, 12, 0, 0, 999_999, tzinfo=UTC))
    assert a == b == {"type": "interval", "seconds": 1.0,
                      "start": "2026-01-01T12:00:00+00:00", "tz": "UTC"}
    times = fire_times(a, datetime(2026, 1, 1, 12, 0, 0, 500_000, tzinfo=UTC), FAR, 5)
    assert [t.strftime("%H:%M:%S.%f") for t in times] == [
        "12:00:01.000000", "12:00:02.000000", "12:00:03.000000", "12:00:04.000000",
        "12:00:05.000000"]


def test_sub_second_intervals_stay_on_the_grid() -> None:
    spec = make_spec(every="250ms", now=datetime(2026, 1, 1, 12, 0, 0, 300_000, tzinfo=UTC))
    times = fire_times(spec, datetime(2026, 1, 1, 12, 0, 7, 1, tzinfo=UTC), FAR, 4)
    assert [t.microsecond for t in times] == [250_000, 500_000, 750_000, 0]


def test_interval_pulls_a_misaligned_previous_time_back_onto_the_grid() -> None:
    trigger = build_trigger(make_spec(every="10s", now=datetime(2026, 1, 1, tzinfo=UTC)))
    assert isinstance(trigger, AlignedIntervalTrigger)
    odd = datetime(2026, 1, 1, 0, 0, 13, 123, tzinfo=UTC)
    assert trigger.get_next_fire_time(odd, odd) == datetime(2026, 1, 1, 0, 0, 20, tzinfo=UTC)
    on_grid = datetime(2026, 1, 1, 0, 0, 20, tzinfo=UTC)
    assert trigger.get_next_fire_time(on_grid, on_grid) == on_grid + timedelta(seconds=10)


def test_interval_counts_real_time_across_dst() -> None:
    spec = make_spec(every="1h", tz="Europe/Berlin", now=datetime(2026, 3, 28, 22, tzinfo=UTC))
    times = fire_times(spec, datetime(2026, 3, 28, 22, tzinfo=UTC), FAR, 6)
    assert all(b - a == timedelta(hours=1) for a, b in pairwise(times))
    trigger_time = build_trigger(spec).get_next_fire_time(None, times[2])
    assert trigger_time.tzinfo == BERLIN and trigger_time.utcoffset() == timedelta(hours=1)


# --- dates ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tz", "stored"),
    [
        ("2026-12-01T09:00", "Europe/Paris", "2026-12-01T09:00:00+01:00"),
        ("2026-12-01 09:00:00", "Europe/Paris", "2026-12-01T09:00:00+01:00"),
        ("2026-12-01T09:00+05:00", "Europe/Paris", "2026-12-01T05:00:00+01:00"),
        ("2026-12-01T09:00:00Z", "UTC", "2026-12-01T09:00:00+00:00"),
        ("2026-12-01T09:00Z", "Europe/Paris", "2026-12-01T10:00:00+01:00"),
        ("  2026-07-01T09:00  ", "Europe/Paris", "2026-07-01T09:00:00+02:00"),
        ("2026-10-25T02:30", "Europe/Berlin", "2026-10-25T02:30:00+02:00"),  # first of two
    ],
)
def test_dates_without_offset_are_read_in_the_jobs_zone(text: str, tz: str, stored: str) -> None:
    spec = make_spec(at=text, tz=tz, now=NOW)
    assert spec == {"type": "date", "at": stored, "tz": tz}
    when = datetime.fromisoformat(stored)
    assert fire_times(spec, NOW, FAR, 5) == [when.astimezone(UTC)]
    assert build_trigger(spec).get_next_fire_time(None, NOW) == when


@pytest.mark.parametrize("text", ["tomorrow", "2026-13-01T09:00", "", "2026-12-01T25:00"])
def test_bad_dates_are_refused(text: str) -> None:
    with pytest.raises(InputError, match="invalid date"):
        make_spec(at=text, now=NOW)


def test_a_local_time_in_the_spring_gap_is_refused() -> None:
    with pytest.raises(InputError, match="does not exist in Europe/Berlin"):
        make_spec(at="2026-03-29T02:30", tz="Europe/Berlin", now=NOW)


def test_fire_times_keeps_a_past_date_out_of_a_later_window() -> None:
    spec = make_spec(at="2026-01-01T00:00Z", now=NOW)
    assert fire_times(spec, NOW, FAR, 3) == []


# --- time zones and DST --------------------------------------------------------------------


def test_new_york_nine_am_is_14_utc_in_winter_and_13_in_summer() -> None:
    spec = make_spec(cron="0 9 * * *", tz="America/New_York", now=NOW)
    winter = fire_times(spec, datetime(2026, 1, 10, tzinfo=UTC), FAR, 1)[0]
    summer = fire_times(spec, datetime(2026, 7, 10, tzinfo=UTC), FAR, 1)[0]
    assert (winter.hour, summer.hour) == (14, 13)
    local = build_trigger(spec).get_next_fire_time(None, datetime(2026, 1, 10, tzinfo=UTC))
    assert local.tzinfo == NEW_YORK and local.hour == 9


def test_unknown_zone() -> None:
    with pytest.raises(InputError) as info:
        parse_zone("Mars/Base")
    assert str(info.value) == "unknown time zone 'Mars/Base'"
    with pytest.raises(InputError, match="unknown time zone"):
        make_spec(cron="@daily", tz="Mars/Base", now=NOW)
    with pytest.raises(InputError, match="unknown time zone"):
        make_spec(cron="@daily", default_tz="../etc/passwd", now=NOW)


BERLIN_SPRING = datetime(2026, 3, 27, 23, tzinfo=UTC)  # 00:00 CET on Saturday 28 March
BERLIN_AUTUMN = datetime(2026, 10, 24, 22, tzinfo=UTC)  # 00:00 CEST on Sunday 25 October


def test_berlin_spring_gap_fixed_time_fires_once_at_the_change() -> None:
    # More in tests/definitions/test_dst.py: cron(8)'s DST rule in five zones.
    times = cron_times("30 2 * * *", n=3, tz="Europe/Berlin", start=BERLIN_SPRING)
    assert walls(times) == ["Sat 2026-03-28 02:30:00+0100", "Sun 2026-03-29 03:00:00+0200",
                            "Mon 2026-03-30 02:30:00+0200"]


def test_berlin_spring_gap_frequent_job_resumes_after_the_gap() -> None:
    start = datetime(2026, 3, 29, 0, 30, tzinfo=UTC)  # 01:30 CET
    times = cron_times("*/15 * * * *", n=4, tz="Europe/Berlin", start=start)
    assert walls(times) == ["Sun 2026-03-29 01:30:00+0100", "Sun 2026-03-29 01:45:00+0100",
                            "Sun 2026-03-29 03:00:00+0200", "Sun 2026-03-29 03:15:00+0200"]


@pytest.mark.parametrize("expr", ["@daily", "0 0 * * 1-5", "0 0 * * *"])
def test_berlin_midnight_jobs_do_not_skip_the_day_after_spring_forward(expr: str) -> None:
    days = [t.day for t in cron_times(expr, n=10, tz="Europe/Berlin", start=BERLIN_SPRING)]
    assert 30 in days and 31 in days


def test_stock_apscheduler_still_skips_that_day_so_our_fix_is_still_needed() -> None:
    stock = CronTrigger(hour=0, minute=0, second=0, timezone=BERLIN)
    ours = WallClockCronTrigger(hour=0, minute=0, second=0, fixed=True, timezone=BERLIN)
    sunday = datetime(2026, 3, 29, tzinfo=BERLIN)
    assert stock.get_next_fire_time(sunday, sunday).day == 31  # Monday 30 March lost
    assert ours.get_next_fire_time(sunday, sunday) == datetime(2026, 3, 30, tzinfo=BERLIN)


def test_berlin_autumn_fold_fires_a_fixed_time_in_the_first_pass_only() -> None:
    times = cron_times("30 2 * * *", n=3, tz="Europe/Berlin", start=BERLIN_AUTUMN)
    assert walls(times) == ["Sun 2026-10-25 02:30:00+0200", "Mon 2026-10-26 02:30:00+0100",
                            "Tue 2026-10-27 02:30:00+0100"]
    assert times[0].astimezone(UTC).strftime("%H:%M") == "00:30"


def test_berlin_autumn_fold_fires_a_wall_clock_time_in_both_passes() -> None:
    times = cron_times("*/30 2 * * *", n=5, tz="Europe/Berlin", start=BERLIN_AUTUMN)
    assert walls(times) == ["Sun 2026-10-25 02:00:00+0200", "Sun 2026-10-25 02:30:00+0200",
                            "Sun 2026-10-25 02:00:00+0100", "Sun 2026-10-25 02:30:00+0100",
                            "Mon 2026-10-26 02:00:00+0100"]


def test_berlin_autumn_fold_hourly_job_fires_every_real_hour() -> None:
    times = fire_times(make_spec(cron="0 * * * *", tz="Europe/Berlin", now=BERLIN_AUTUMN),
                       BERLIN_AUTUMN, FAR, 6)
    assert all(b - a == timedelta(hours=1) for a, b in pairwise(times))


def test_a_utc_previous_time_inside_the_fold_still_moves_forward() -> None:
    first = datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # 02:30 CEST, as a job store returns it
    trigger = build_trigger(make_spec(cron="*/30 2 * * *", tz="Europe/Berlin", now=NOW))
    second = trigger.get_next_fire_time(first, first)
    assert second.astimezone(UTC) == datetime(2026, 10, 25, 1, 0, tzinfo=UTC)  # 02:00 CET
    trigger = build_trigger(make_spec(cron="30 2 * * *", tz="Europe/Berlin", now=NOW))
    second = trigger.get_next_fire_time(first, first)
    assert second.astimezone(UTC) == datetime(2026, 10, 26, 1, 30, tzinfo=UTC)  # Monday's
    stock = CronTrigger(hour=2, minute=30, timezone=BERLIN)
    assert stock.get_next_fire_time(first, first).astimezone(UTC) == first  # stuck


def test_either_trigger_orders_fold_times_by_instant_not_wall_clock() -> None:
    # Wall-clock children (fixed=False): their times fire in both passes of the fold.
    a = WallClockCronTrigger(hour=2, minute=45, fixed=False, timezone=BERLIN)
    b = WallClockCronTrigger(hour=2, minute=15, fixed=False, timezone=BERLIN)
    now = datetime(2026, 10, 25, 0, 20, tzinfo=UTC)  # 02:20 CEST, first pass
    right = datetime(2026, 10, 25, 0, 45, tzinfo=UTC)  # 02:45 CEST, before 02:15 CET
    # Compare in UTC: an aware time inside a fold never equals a time in another zone (PEP 495).
    ours = EitherCronTrigger([a, b], BERLIN).get_next_fire_time(None, now)
    assert ours is not None and ours.astimezone(UTC) == right
    stock = OrTrigger([a, b]).get_next_fire_time(None, now)
    # The stock OrTrigger compares wall times and picks 02:15 CET, losing 02:45 CEST.
    assert stock.astimezone(UTC) == datetime(2026, 10, 25, 1, 15, tzinfo=UTC)


# --- specs: validation, round trips, descriptions ------------------------------------------


ROUND_TRIP_SPECS = [
    make_spec(cron="  0   9 * *   1 ", tz="Europe/Paris", now=NOW),
    make_spec(cron="0 0 13 * fri", tz="America/New_York", now=NOW),
    make_spec(cron="*/7 */5 * * * *", now=NOW),
    make_spec(cron="second=*/10 minute=5 day_of_week=mon-fri", tz="Asia/Kolkata", now=NOW),
    make_spec(cron="@weekly", tz="Europe/Berlin", now=NOW),
    make_spec(every="1h30m", tz="Europe/Berlin", now=NOW.replace(microsecond=123)),
    make_spec(every=0.1, now=NOW),
    make_spec(at="2026-12-01T09:00", tz="Australia/Sydney", now=NOW),
]


@pytest.mark.parametrize("spec", ROUND_TRIP_SPECS, ids=lambda s: describe(s))
def test_spec_round_trips_through_json_with_the_same_fire_times(spec: dict[str, Any]) -> None:
    text = json.dumps(spec)
    again = validate_spec(json.loads(text))
    assert again == spec and json.dumps(again) == text
    ours = fire_times(spec, NOW, FAR, 20)
    assert ours == fire_times(build_trigger(again), NOW, FAR, 20)
    assert len(ours) == (1 if spec["type"] == "date" else 20)
    assert all(t.tzinfo == UTC for t in ours)


def test_make_spec_stores_normalized_whitespace_and_the_default_zone() -> None:
    spec = make_spec(cron=" 0\t9  * * 1\n", default_tz="Europe/Paris", now=NOW)
    assert spec == {"type": "cron", "expr": "0 9 * * 1", "tz": "Europe/Paris"}


@pytest.mark.parametrize(
    "kwargs", [{}, {"cron": "@daily", "every": "1s"}, {"every": "1s", "at": "2026-12-01T09:00"},
               {"cron": "@daily", "every": "1s", "at": "2026-12-01T09:00"}])
def test_make_spec_needs_exactly_one_kind(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InputError) as info:
        make_spec(**kwargs, now=NOW)
    assert str(info.value) == "give exactly one of --cron, --every, --at, --after"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("cron", "must be an object"),
        ({"type": "rrule", "tz": "UTC"}, "unknown trigger type 'rrule'"),
        ({"expr": "@daily", "tz": "UTC"}, "unknown trigger type None"),
        ({"type": "cron", "expr": "@daily"}, "exactly the keys expr, type, tz"),
        ({"type": "cron", "expr": "@daily", "tz": "UTC", "jitter": 5}, "exactly the keys"),
        ({"type": "cron", "expr": 5, "tz": "UTC"}, "expr must be a string"),
        ({"type": "cron", "expr": "@daily", "tz": None}, "tz must be a string"),
        ({"type": "cron", "expr": "61 * * * *", "tz": "UTC"}, "minute value 61"),
        ({"type": "interval", "seconds": True, "start": "2026-01-01T00:00:00+00:00",
          "tz": "UTC"}, "seconds must be a number"),
        ({"type": "interval", "seconds": 0, "start": "2026-01-01T00:00:00+00:00",
          "tz": "UTC"}, "must be between 1ms and 3650d"),
        ({"type": "interval", "seconds": 1.0, "start": "2026-01-01T00:00:00",
          "tz": "UTC"}, "has no UTC offset"),
        ({"type": "date", "at": "2026-01-01T00:00:00", "tz": "UTC"}, "has no UTC offset"),
        ({"type": "date", "at": "soon", "tz": "UTC"}, "invalid date 'soon'"),
    ],
)
def test_validate_spec_refuses_malformed_specs(spec: object, message: str) -> None:
    with pytest.raises(InputError, match=None) as info:
        validate_spec(spec)
    assert message in str(info.value)
    with pytest.raises(InputError):
        build_trigger(spec)  # type: ignore[arg-type]


def test_validate_spec_canonicalizes_offsets() -> None:
    spec = {"type": "interval", "seconds": 5, "start": "2026-01-01T01:00:00+01:00", "tz": "UTC"}
    assert validate_spec(spec) == {"type": "interval", "seconds": 5.0,
                                   "start": "2026-01-01T00:00:00+00:00", "tz": "UTC"}
    spec = {"type": "date", "at": "2026-12-01T08:00:00Z", "tz": "Europe/Paris"}
    assert validate_spec(spec)["at"] == "2026-12-01T09:00:00+01:00"


def test_describe() -> None:
    assert describe(make_spec(cron="0 9 * * 1", tz="Europe/Paris", now=NOW)) == \
        "cron 0 9 * * 1 (Europe/Paris)"
    assert describe(make_spec(every="30s", now=NOW)) == "every 30s"
    assert describe(make_spec(every="5400", now=NOW)) == "every 1h30m"
    assert describe(make_spec(every="250ms", now=NOW)) == "every 250ms"
    assert describe(make_spec(at="2026-12-01T09:00", now=NOW)) == "at 2026-12-01T09:00:00+00:00"


def test_fire_times_window_is_inclusive_and_limited() -> None:
    spec = make_spec(cron="0 * * * *", now=NOW)
    start, end = datetime(2026, 3, 25, 12, tzinfo=UTC), datetime(2026, 3, 25, 15, tzinfo=UTC)
    assert [t.hour for t in fire_times(spec, start, end, 10)] == [12, 13, 14, 15]
    assert [t.hour for t in fire_times(spec, start, end, 2)] == [12, 13]
    assert fire_times(spec, start, end, 0) == []


def test_two_leaders_building_the_same_spec_get_identical_times() -> None:
    spec = make_spec(cron="*/5 0-3 * * sun", tz="Europe/Berlin", now=NOW)
    one = fire_times(build_trigger(spec), BERLIN_AUTUMN, FAR, 40)
    two = fire_times(build_trigger(json.loads(json.dumps(spec))), BERLIN_AUTUMN, FAR, 40)
    assert one == two and len(set(one)) == 40 and one == sorted(one)


# --- durations -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("1d", 86400.0), ("1h30m", 5400.0),
     ("250ms", 0.25), ("2.5s", 2.5), ("90", 90.0), (45, 45.0), (0.5, 0.5), ("1H 30M", 5400.0),
     ("1d2h3m4s5ms", 93784.005), (".5s", 0.5)],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-5", "0s", "5x", "m", "1m1h", "nan", "inf", "0.0001",
                                  "9999d", True, "1.5.5s", "1e400", 10**400, None, [1],
                                  "1e3", "1_000", "+5", "0x10", "Infinity"])
def test_parse_duration_refuses(text: Any) -> None:
    with pytest.raises(InputError):
        parse_duration(text)


@given(st.floats(0.001, 3650 * 86400.0))
def test_format_duration_reads_back(seconds: float) -> None:
    seconds = parse_duration(seconds)
    assert parse_duration(format_duration(seconds)) == seconds


# --- fuzz: bad input only ever raises InputError ------------------------------------------

CRON_WORDS = ["*", "*/0", "*/5", "0", "7", "60", "1-5", "5-1", "mon", "fri-mon", "jan", "L", "?",
              "#", ",", "-", "/", "=", "second=", "day=", "day_of_week=", "last", "1st", "@daily",
              "@reboot", "@", "year=", "2020", "99999999999999999999", "\u0663", "\u00b2", "\x00"]
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.one_of(st.text(), st.lists(st.sampled_from(CRON_WORDS), max_size=7).map(" ".join),
                 st.lists(st.sampled_from(CRON_WORDS), max_size=7).map("".join)))
def test_random_cron_text_only_ever_raises_input_error(text: str) -> None:
    try:
        spec = make_spec(cron=text, now=NOW)
    except InputError as e:
        assert "\n" not in str(e)
        return
    assert fire_times(spec, NOW, FAR, 2)


@FUZZ
@given(st.text(), st.text(max_size=12))
def test_random_every_at_and_zone_only_ever_raise_input_error(text: str, zone: str) -> None:
    for kwargs in ({"every": text}, {"at": text}, {"cron": "@daily", "tz": zone}):
        with suppress(InputError):
            make_spec(**kwargs, now=NOW)


JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                       lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=8)


@FUZZ
@given(st.fixed_dictionaries(
    {"type": st.sampled_from(["cron", "interval", "date", "x"])},
    optional={"expr": JSONISH, "tz": st.sampled_from(["UTC", "Europe/Berlin", "", 3]),
              "seconds": JSONISH, "start": JSONISH | st.just("2026-01-01T00:00:00+00:00"),
              "at": JSONISH}) | JSONISH)
def test_random_specs_only_ever_raise_input_error(spec: object) -> None:
    with suppress(InputError):
        validate_spec(spec)
