"""Crons across daylight saving time, by cron(8)'s rule (cronie, src/cron.c).

A fixed-time cron (no ``*`` first in its second, minute or hour field) fires a wall time
skipped by a spring-forward change once, at the change, and a repeated wall time in the
first pass only; a wall-clock cron (``*`` first) skips the skipped times and repeats the
repeated ones. The transition dates are 2026's, from the tz database (``TRANSITIONS``).
"""

from __future__ import annotations

import pytest

from qcluster.definitions.cron import is_fixed
from qcluster.errors import InputError

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
