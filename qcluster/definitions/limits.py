"""What a schedule may ask for: a minimum interval between two fires, and a fire time
within the bounded search (:data:`~qcluster.definitions.crontrigger.SEARCH_YEARS`).

:func:`check_schedule` is the one check, run by ``definitions/jobdefs.validate_job`` on
every job the CLI, the client or the control API is given; :func:`interval_problem` is
what the leader's job store asks of a stored job (one stored before these checks, or under
another setting), which it sets aside rather than fires.

The fastest a spec fires (:func:`min_gap`):

* an interval: its ``seconds``;
* a cron: from its seconds field, the shortest step between two allowed seconds, the
  wrap from the last to the first of the next minute included (so ``0,59 * * * * *``
  counts 1 s, even where its minute field would not allow the next minute: a cautious
  reading); a cron without a seconds field (five fields) fires at most once a minute;
* a date: it fires once.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

from apscheduler.triggers.cron import CronTrigger

from qcluster.definitions.cron import quote
from qcluster.definitions.crontrigger import EitherCronTrigger
from qcluster.definitions.triggers import (
    TriggerSpec,
    build_trigger,
    check_fires,
    format_duration,
)
from qcluster.errors import InputError

#: ``[scheduler] min_interval_seconds`` by default (settings/model.py says the same).
DEFAULT_MIN_INTERVAL = 1.0
_SECONDS = range(60)


def min_gap(spec: TriggerSpec) -> float | None:
    """The shortest time between two fires of ``spec`` (see the module doc), or None for a
    spec that fires once."""
    if spec["type"] == "interval":
        return float(spec["seconds"])
    if spec["type"] != "cron":
        return None
    trigger = build_trigger(spec)
    children = trigger.triggers if isinstance(trigger, EitherCronTrigger) else [trigger]
    allowed: set[int] = set()
    for child in children:
        assert isinstance(child, CronTrigger)
        field = next(f for f in child.fields if f.name == "second")
        for s in _SECONDS:  # the field's own matcher: the next allowed second from s is s
            if field.get_next_value(datetime(2000, 1, 1, 0, 0, s)) == s:
                allowed.add(s)
    ordered = sorted(allowed)
    if len(ordered) < 2:
        return 60.0
    steps = [b - a for a, b in itertools.pairwise(ordered)]
    steps.append(60 - ordered[-1] + ordered[0])
    return float(min(steps))


#: Fire times a cron is followed for when its minute-level gap matters.
_SAMPLED_FIRES = 100


def sampled_gap(spec: TriggerSpec, *, fires: int = _SAMPLED_FIRES) -> float | None:
    """The shortest time between two of a cron's next ``fires`` fire times (from now):
    what a minimum interval above a minute is checked against, since the seconds field
    alone says only "at most once a minute" (``0 * * * *`` fires hourly). None if it has
    fewer than two fire times within the bounded search."""
    key = repr(sorted(spec.items()))
    found = _SAMPLED.get(key)
    if found is None and key not in _SAMPLED:
        trigger = build_trigger(spec)
        times: list[datetime] = []
        prev = None
        now = datetime.now(UTC)
        while len(times) < fires:
            nxt = trigger.get_next_fire_time(prev, times[-1] if times else now)
            if nxt is None or (times and nxt <= times[-1]):
                break
            times.append(nxt)
            prev = nxt
            now = nxt + timedelta(microseconds=1)
        gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
        found = min(gaps) if gaps else None
        if len(_SAMPLED) > 10_000:
            _SAMPLED.clear()
        _SAMPLED[key] = found
    return found


_SAMPLED: dict[str, float | None] = {}


def interval_problem(spec: TriggerSpec, min_interval: float) -> str | None:
    """Why ``spec`` fires too often for ``min_interval`` seconds, or None. A cron whose
    seconds allow at most one fire a minute is followed for its next fire times when the
    minimum is above a minute."""
    gap = min_gap(spec)
    if gap is not None and spec["type"] == "cron" and gap >= 60 and min_interval > 60:
        gap = sampled_gap(spec)
    if gap is None or gap >= min_interval - 1e-9:
        return None
    what = (f"every {format_duration(gap)}" if spec["type"] == "interval"
            else f"cron {quote(spec['expr'])} fires {format_duration(gap)} apart,")
    return (f"{what} is below the minimum interval of {format_duration(min_interval)} "
            "([scheduler] min_interval_seconds)")


def check_schedule(spec: TriggerSpec, *, min_interval: float = DEFAULT_MIN_INTERVAL,
                   now: datetime | None = None) -> None:
    """InputError (one line) if ``spec`` fires more often than ``min_interval`` seconds,
    or is a cron with no fire time within the bounded search."""
    problem = interval_problem(spec, min_interval)
    if problem:
        raise InputError(problem)
    check_fires(spec, now)
