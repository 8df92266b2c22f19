"""The bounded next-fire search and the minimum interval (issue 14, points 5 and 6).

A cron's next fire time is looked for at most ``SEARCH_YEARS`` ahead: ``0 0 31 2 1``
(crontab's Feb 31 OR a Monday) costs a millisecond, not the quarter second that walking
the impossible half to the year 9999 takes; a cron with no fire time within the bound
(``0 0 30 2 *``) is refused with one line. An interval, or a cron whose seconds fire closer
together, below ``[scheduler] min_interval_seconds`` is refused too.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from apscheduler.triggers.cron import CronTrigger

from qcluster.definitions.crontrigger import SEARCH_YEARS, SearchExhausted
from qcluster.definitions.jobdefs import validate_job
from qcluster.definitions.limits import check_schedule, interval_problem, min_gap
from qcluster.definitions.triggers import build_trigger, fire_times, make_spec
from qcluster.errors import InputError

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
ALLOW = ["jobs.*"]


def _cpu(call: object) -> float:
    assert callable(call)
    start = time.process_time()
    call()
    return time.process_time() - start


def test_an_impossible_day_of_month_half_costs_a_millisecond_not_a_walk_to_9999() -> None:
    spec = make_spec(cron="0 0 31 2 1", now=NOW)  # fires: every Monday in February
    trigger = build_trigger(spec)
    assert trigger.get_next_fire_time(None, NOW) == datetime(2027, 2, 1, tzinfo=UTC)
    cost = _cpu(lambda: [trigger.get_next_fire_time(None, NOW) for _ in range(20)]) / 20
    assert cost < 0.02, f"{cost:.3f}s of CPU per next-fire computation"
    # The stock trigger walks the impossible half to the year 9999 (what the bound removes).
    stock = CronTrigger(month=2, day=31, timezone=UTC)
    assert _cpu(lambda: stock.get_next_fire_time(None, NOW)) > 5 * cost
    times = fire_times(trigger, NOW, NOW + timedelta(days=800), 100)
    assert len(times) == 4 + 5 and all(t.weekday() == 0 and t.month == 2 for t in times)


@pytest.mark.parametrize("expr", ["0 0 30 2 *", "0 0 31 2 *", "0 0 31 4,6,9,11 *",
                                  "day=30 month=2", "year=2040"])
def test_a_cron_without_a_fire_time_within_the_bound_is_refused_in_one_line(expr: str) -> None:
    with pytest.raises(InputError) as e:
        make_spec(cron=expr, now=NOW)
    text = str(e.value)
    assert "\n" not in text and "never fires" in text and expr in text
    assert f"within {SEARCH_YEARS} years" in text


def test_a_stored_cron_that_cannot_fire_raises_search_exhausted_quickly() -> None:
    """What the leader gets for a job stored before the check: a ValueError, so the pass
    sets the job aside (leader/scheduler.FireExecutor.fire), within milliseconds."""
    trigger = build_trigger({"type": "cron", "expr": "0 0 30 2 *", "tz": "UTC"})
    start = time.process_time()
    with pytest.raises(SearchExhausted) as e:
        trigger.get_next_fire_time(NOW - timedelta(days=3000), NOW)
    assert time.process_time() - start < 0.05
    assert isinstance(e.value, ValueError) and isinstance(e.value, InputError)


def test_leap_day_crons_and_far_crons_within_the_bound_still_fire() -> None:
    assert build_trigger(make_spec(cron="0 0 29 2 *", now=NOW)).get_next_fire_time(
        None, NOW) == datetime(2028, 2, 29, tzinfo=UTC)
    assert build_trigger(make_spec(cron="year=2030 month=6", now=NOW)).get_next_fire_time(
        None, NOW) == datetime(2030, 6, 1, tzinfo=UTC)


def test_fire_times_over_a_range_is_not_cut_by_the_search_bound() -> None:
    """The bound guards against a trigger that never fires, not against a long range: a
    range whose start lies years before the trigger's first fire time (a cron's first
    year is 1970; a ``year=`` field) is walked whole, and a gap longer than the bound with
    no fire time after it in the range ends the walk with what was found."""
    weekdays = make_spec(cron="0 9 * * 1-5", tz="UTC")
    times = fire_times(weekdays, datetime(1960, 1, 1, tzinfo=UTC),
                       datetime(1971, 1, 1, tzinfo=UTC), 1000)
    assert times[0] == datetime(1970, 1, 1, 9, tzinfo=UTC) and len(times) == 261
    later = {"type": "cron", "expr": "year=2040 month=6", "tz": "UTC"}
    assert fire_times(later, datetime(2020, 1, 1, tzinfo=UTC), NOW, 10) == []
    assert fire_times(later, datetime(2020, 1, 1, tzinfo=UTC),
                      datetime(2040, 6, 1, tzinfo=UTC), 10) == [datetime(2040, 6, 1, tzinfo=UTC)]
    never = {"type": "cron", "expr": "0 0 30 2 *", "tz": "UTC"}
    start = time.process_time()
    assert fire_times(never, datetime(1970, 1, 1, tzinfo=UTC), NOW, 10) == []
    assert time.process_time() - start < 0.5


@pytest.mark.parametrize(("kw", "gap"), [
    ({"every": "1ms"}, 0.001), ({"every": "2s"}, 2.0), ({"cron": "* * * * *"}, 60.0),
    ({"cron": "*/5 * * * * *"}, 5.0), ({"cron": "0,59 * * * * *"}, 1.0),
    ({"cron": "second=*/10 day_of_week=mon-fri"}, 10.0), ({"at": "2030-01-01T00:00"}, None),
])  # fmt: skip
def test_min_gap_is_the_interval_or_the_closest_seconds_of_a_cron(
    kw: dict[str, str], gap: float | None
) -> None:
    assert min_gap(make_spec(**kw, now=NOW)) == gap


@pytest.mark.parametrize(("kw", "minimum"), [
    ({"every": "1ms"}, 1.0), ({"every": "999ms"}, 1.0), ({"every": "4s"}, 5.0),
    ({"cron": "*/2 * * * * *"}, 5.0), ({"cron": "second=*/10"}, 30.0),
])  # fmt: skip
def test_a_schedule_below_the_minimum_interval_is_refused_in_one_line(
    kw: dict[str, str], minimum: float
) -> None:
    spec = make_spec(**kw, now=NOW)
    with pytest.raises(InputError) as e:
        validate_job({"id": "fast", "func": "jobs.examples:hello", "trigger": spec}, ALLOW,
                     min_interval=minimum)
    text = str(e.value)
    assert "\n" not in text and "fast" in text and "min_interval_seconds" in text
    assert interval_problem(spec, minimum) is not None


def test_schedules_at_the_minimum_interval_are_accepted() -> None:
    for kw in ({"every": "1s"}, {"cron": "* * * * * *"}, {"cron": "*/5 * * * *"}):
        check_schedule(make_spec(**kw, now=NOW), min_interval=1.0)
    check_schedule(make_spec(every="250ms", now=NOW), min_interval=0.25)


@pytest.mark.parametrize("expr,minimum,refused", [
    ("0 * * * *", 120, False), ("*/3 * * * *", 120, False), ("*/3 * * * *", 300, True),
    ("0 0 1 * *", 86400, False), ("* * * * *", 120, True), ("0 * * * *", 7200, True),
    ("0 9-17 * * 1-5", 3600, False),
])
def test_a_minimum_above_a_minute_is_checked_against_the_crons_own_fire_times(
    expr: str, minimum: float, refused: bool
) -> None:
    """An attack found every cron refused (and stored ones set aside) with
    ``min_interval_seconds = 120``: a five-field cron was counted as firing every minute.
    Above a minute, its next fire times say how often it fires."""
    problem = interval_problem({"type": "cron", "expr": expr, "tz": "UTC"}, minimum)
    assert (problem is not None) == refused, problem
