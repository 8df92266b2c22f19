"""Trigger specs: what a user types, as JSON-able data, and the APScheduler 3.11 trigger for it.

Job state is stored without pickle; a :data:`TriggerSpec` (a flat dict of str and float) is
what goes in the database. Promises:

* ``validate_spec`` returns a spec's canonical form and is idempotent, so
  ``validate_spec(json.loads(json.dumps(spec))) == spec`` for every spec made here.
* ``build_trigger`` is a pure function of the spec: two leaders holding the same spec get
  identical fire times (given the same tz database version on every node).
* Every bad input raises InputError, one line quoting it; APScheduler's texts never escape.
* Fire times are aware: in the job's zone from a trigger, in UTC from ``fire_times``.
The cron dialect (crontab(5), or APScheduler's own ``key=value`` syntax) is described and
read in :mod:`qcluster.definitions.cron`.

Daylight saving time: a cron follows its zone's wall clock by cron(8)'s rule (cronie,
src/cron.c, which tells "fixed-time" jobs from "wildcard" ones; see
:func:`qcluster.definitions.cron.is_fixed`):

* A fixed-time cron (no ``*`` first in its second, minute or hour field: ``30 2 * * *``,
  ``0 1,2 * * *``, ``@daily``) fires at the first instant the clock shows its time or a
  later one. A time skipped by a spring-forward change fires once, at the change: in
  Europe/Berlin ``30 2 * * *`` fires at 03:00 CEST; in America/New_York ``0 1,2 * * *``
  fires at 01:00 EST, then 03:00 EDT, and ``0 2,3 * * *`` fires once at 03:00 EDT. A time
  repeated by a fall-back change fires in the first pass only (``0 1 * * *`` in New York at
  01:00 EDT, not at 01:00 EST). America/Santiago skips its midnight: ``@daily`` fires at
  01:00 that day.
* A wall-clock cron (``*`` first: ``*/15 * * * *``, ``0 * * * *``, ``@hourly``) fires at
  every instant whose wall time matches: a skipped time does not fire (``*/15`` in Berlin:
  01:45 CET, then 03:00 CEST) and a repeated one fires in both passes (``0 * * * *`` in
  New York: 01:00 EDT and 01:00 EST).

No day is lost (stock APScheduler 3.11.3, issue #529, makes ``@daily`` lose the day after a
spring-forward change) and no instant fires twice. cronie applies the rule to jumps of up to
three hours (a longer one it takes for a clock reset); here it holds for every change in the
tz database. :mod:`qcluster.definitions.crontrigger` implements it. A zone without DST (UTC)
has neither case.

Intervals fire at ``start + k * interval`` in real time, in whole microseconds, unaffected
by DST.

An ``after`` spec (``jobs add B --after A``) has no fire time of its own: its job runs when
its parents' runs end (``parents``: each a job id and a condition, :data:`CONDITIONS`), as
the leader's chain pass decides (``leader/chains.py``, docs/DESIGN.md "Dependent jobs").

A cron's next-fire search looks at most
:data:`~qcluster.definitions.crontrigger.SEARCH_YEARS` past ``max(previous, now)``, then
raises :class:`~qcluster.definitions.crontrigger.SearchExhausted` (its module says why).
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from qcluster.definitions.cron import cron_fields, is_fixed, quote, quote_value
from qcluster.definitions.crontrigger import (
    EitherCronTrigger,
    SearchExhausted,
    WallClockCronTrigger,
)
from qcluster.errors import InputError

TriggerSpec = dict[str, Any]  # JSON-able: {"type": ..., "tz": ..., ...}; see validate_spec

_MICROSECOND = timedelta(microseconds=1)
MIN_INTERVAL = 0.001  # seconds; a finer schedule is a busy loop, not a job
MAX_INTERVAL = 3650 * 86400.0  # ten years; longer ones belong in a cron or a date

_DURATION = re.compile(r"(?:(?P<d>{n})d)?(?:(?P<h>{n})h)?(?:(?P<m>{n})m(?!s))?(?:(?P<s>{n})s)?"
                       r"(?:(?P<ms>{n})ms)?".format(n=r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+"))
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")  # plain seconds: 30, 2.5, .5
_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_SPEC_KEYS = {"cron": {"type", "expr", "tz"}, "interval": {"type", "seconds", "start", "tz"},
              "date": {"type", "at", "tz"}, "after": {"type", "parents", "tz"}}
#: A job id (``definitions/jobdefs.check_job_id`` says so to the user).
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,199}$")
#: When a child runs after a parent's run: it succeeded; it ended failed, timed out, lost
#: or interrupted (its code ran and did not succeed); or either.
CONDITIONS = ("success", "failure", "always")
MAX_PARENTS = 20
_When = datetime | None


def _utc(dt: datetime) -> datetime:
    return dt.astimezone(UTC)


def _normalize(dt: datetime) -> datetime:
    """The same instant, spelled as a real wall time of its zone (a gap time moves forward)."""
    return dt.astimezone(UTC).astimezone(dt.tzinfo)


def parse_zone(name: str) -> tzinfo:
    """The IANA zone ``name`` (exact spelling, e.g. ``Europe/Paris``), or InputError."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError, OSError, UnicodeError):
        raise InputError(f"unknown time zone {quote(str(name))}") from None


def parse_duration(text: str | float) -> float:
    """Seconds in ``text``: ``30s 5m 1h 1d 1h30m 250ms 2.5s``, or a plain number of seconds.

    The result is rounded to whole microseconds and lies in [MIN_INTERVAL, MAX_INTERVAL].
    """
    if isinstance(text, bool) or not isinstance(text, str | int | float):
        raise InputError(f"invalid duration {text!r}")
    if isinstance(text, str):
        clean = "".join(text.lower().split())
        if _NUMBER.fullmatch(clean):
            seconds = float(clean)
        else:  # not float(): it takes 1e3, 1_000, inf and nan too
            match = _DURATION.fullmatch(clean)
            if not clean or not match or not any(match.groups()):
                hint = "use e.g. 30s, 5m, 1h30m, 250ms"
                raise InputError(f"invalid duration {quote(text)}: {hint}") from None
            seconds = sum(float(v) * _UNITS[k] for k, v in match.groupdict().items() if v)
    else:
        seconds = float(max(-1, min(text, MAX_INTERVAL + 1)))  # a huge int overflows float()
    if not math.isfinite(seconds) or not MIN_INTERVAL <= round(seconds, 6) <= MAX_INTERVAL:
        raise InputError(f"duration {quote_value(text)} must be between 1ms and 3650d")
    return round(seconds, 6)


def _decimal(value: float) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".")


def format_duration(seconds: float) -> str:
    """Text that parse_duration reads back as ``seconds``: 30s, 1h30m, 250ms, 2.5s."""
    if seconds < 1:
        return f"{_decimal(seconds * 1000)}ms"
    whole, frac = divmod(round(seconds, 6), 1)
    out, rest = "", int(whole)
    for unit in ("d", "h", "m"):
        count, rest = divmod(rest, int(_UNITS[unit]))
        out += f"{count}{unit}" if count else ""
    if rest or frac:
        out += f"{_decimal(rest + frac)}s"
    return out


# --- triggers ------------------------------------------------------------------------------


class AlignedIntervalTrigger(IntervalTrigger):  # type: ignore[misc]
    """Fires at ``start_date + k * interval`` (k >= 0) in real time, in whole microseconds.

    The next time is the first such time after ``previous_fire_time``, or at/after ``now``
    when there is none, so a misaligned previous time is pulled back onto the grid.
    """

    __slots__ = ()

    def get_next_fire_time(self, previous_fire_time: _When, now: datetime) -> _When:
        start = _utc(self.start_date)
        if previous_fire_time is not None:
            base = _utc(previous_fire_time) + _MICROSECOND
        else:
            base = max(_utc(now), start)
        interval: timedelta = self.interval
        steps = max(0, -((start - base) // interval))  # ceil, in integer microseconds
        try:
            found: datetime = (start + interval * steps).astimezone(self.timezone)
        except OverflowError:
            return None
        return found


def _parse_at(text: str, zone: tzinfo, *, need_offset: bool) -> datetime:
    try:
        at = datetime.fromisoformat(text.strip())
    except (ValueError, TypeError, AttributeError):
        hint = "use ISO 8601, e.g. 2026-12-01T09:00 or 2026-12-01T09:00+01:00"
        raise InputError(f"invalid date {quote(str(text))}: {hint}") from None
    if at.tzinfo is None and need_offset:
        raise InputError(f"date {quote(text)} has no UTC offset")
    try:
        if at.tzinfo is None:
            at = at.replace(tzinfo=zone)  # fold=0: an ambiguous autumn time is the first one
            if _normalize(at).replace(tzinfo=None) != at.replace(tzinfo=None):
                raise InputError(f"{quote(text)} does not exist in {zone} (skipped by DST)")
        at = at.astimezone(zone)
        # Stored and compared as a float timestamp: it must come back as a datetime
        # (9999-12-31T23:59:59.99999 rounds to year 10000).
        datetime.fromtimestamp(at.timestamp(), UTC)
    except (OverflowError, ValueError, OSError):
        raise InputError(f"date {quote(text)} is out of range") from None
    return at


def _string(spec: dict[Any, Any], key: str) -> str:
    value = spec[key]
    if not isinstance(value, str):
        raise InputError(f"trigger spec: {key} must be a string, got {type(value).__name__}")
    return value


def validate_spec(spec: object) -> TriggerSpec:
    """The canonical form of ``spec`` (from a file, an RPC or the database), or InputError.

    Canonical: cron ``expr`` with single spaces, interval ``seconds`` a float and ``start`` in
    UTC, date ``at`` in the job's zone, both ISO 8601 with an offset. Unknown keys are errors.
    """
    if not isinstance(spec, dict):
        raise InputError(f"trigger spec must be an object, got {type(spec).__name__}")
    kind = spec.get("type")
    if not isinstance(kind, str) or kind not in _SPEC_KEYS:
        raise InputError(f"unknown trigger type {kind!r} (expected cron, interval, date or "
                         "after)")
    if set(spec) != _SPEC_KEYS[kind]:
        raise InputError(f"a {kind} trigger spec has exactly the keys "
                         f"{', '.join(sorted(_SPEC_KEYS[kind]))}")
    tz = _string(spec, "tz")
    zone = parse_zone(tz)
    if kind == "cron":
        expr = " ".join(_string(spec, "expr").split())
        cron_fields(expr)
        return {"type": "cron", "expr": expr, "tz": tz}
    if kind == "interval":
        seconds = spec["seconds"]
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise InputError("trigger spec: seconds must be a number")
        start = _parse_at(_string(spec, "start"), UTC, need_offset=True)
        _parse_at(spec["start"], zone, need_offset=True)  # build_trigger moves it into tz
        return {"type": "interval", "seconds": parse_duration(seconds),
                "start": start.isoformat(), "tz": tz}
    if kind == "after":
        return {"type": "after", "parents": _parents(spec["parents"]), "tz": tz}
    at = _parse_at(_string(spec, "at"), zone, need_offset=True)
    return {"type": "date", "at": at.isoformat(), "tz": tz}


def _parents(value: object) -> list[dict[str, str]]:
    """The canonical parents of an ``after`` spec: ``{"job", "on"}`` each, by job id."""
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_PARENTS:
        raise InputError(f"an after trigger names 1 to {MAX_PARENTS} parent jobs")
    out: dict[str, str] = {}
    for item in value:
        if not isinstance(item, dict) or set(item) != {"job", "on"}:
            raise InputError('each parent of an after trigger is {"job": ID, "on": CONDITION}')
        job, on = item["job"], item["on"]
        if not isinstance(job, str) or not JOB_ID_RE.fullmatch(job):
            raise InputError(f"invalid parent job id {quote_value(job)}")
        if on not in CONDITIONS:
            raise InputError(f"invalid condition {quote_value(on)} for parent {job!r}: "
                             f"use {', '.join(CONDITIONS)}")
        if job in out:
            raise InputError(f"parent job {job!r} is given twice")
        out[job] = on
    return [{"job": job, "on": out[job]} for job in sorted(out)]


def parse_after(text: str) -> dict[str, str]:
    """``A`` or ``A:success|failure|always`` (what ``--after`` takes) as a parent. A job
    id may hold ``:``; the part after the last one is a condition only if it is one."""
    job, sep, on = text.strip().rpartition(":")
    if sep and on not in CONDITIONS and on.lower() in CONDITIONS:
        raise InputError(f"invalid condition {quote_value(on)} in {quote_value(text)}: "
                         f"conditions are lowercase ({', '.join(CONDITIONS)})")
    if not sep or on not in CONDITIONS:
        job, on = text.strip(), "success"
    return {"job": job, "on": on}


class AfterTrigger(BaseTrigger):  # type: ignore[misc]
    """No fire time of its own: an ``after`` job's runs are recorded by the chain pass."""

    __slots__ = ()

    def get_next_fire_time(self, previous_fire_time: _When, now: datetime) -> _When:
        return None


def build_trigger(spec: TriggerSpec) -> BaseTrigger:
    """The APScheduler trigger for ``spec`` (validated first), in the spec's zone."""
    spec = validate_spec(spec)
    zone = parse_zone(spec["tz"])
    if spec["type"] == "cron":
        fixed = is_fixed(spec["expr"])
        triggers = [WallClockCronTrigger(**fields, fixed=fixed, timezone=zone)
                    for fields in cron_fields(spec["expr"])]
        return triggers[0] if len(triggers) == 1 else EitherCronTrigger(triggers, zone)
    if spec["type"] == "interval":
        start = datetime.fromisoformat(spec["start"]).astimezone(zone)
        return AlignedIntervalTrigger(seconds=spec["seconds"], start_date=start, timezone=zone)
    if spec["type"] == "after":
        return AfterTrigger()
    return DateTrigger(run_date=datetime.fromisoformat(spec["at"]), timezone=zone)


def make_spec(*, cron: str | None = None, every: str | float | None = None,
              at: str | None = None, after: list[str] | None = None, tz: str | None = None,
              default_tz: str = "UTC", now: datetime | None = None) -> TriggerSpec:
    """A canonical spec from what a user typed (exactly one of cron, every, at).

    ``tz`` (default ``default_tz``) is the job's zone: crons run on its wall clock and an
    ``at`` without an offset is read in it. An interval starts at ``now`` truncated to the
    whole second, so every node's 1 s job fires on whole seconds. A cron that can never fire
    after ``now`` (``0 0 31 2 *``) is refused. A date in the past is allowed; the scheduler's
    misfire policy deals with it.
    """
    if sum(x is not None for x in (cron, every, at, after or None)) != 1:
        raise InputError("give exactly one of --cron, --every, --at, --after")
    if now is None:
        now = datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    zone_name = (default_tz if tz is None else tz).strip()
    zone = parse_zone(zone_name)
    if after:
        return validate_spec({"type": "after", "parents": [parse_after(a) for a in after],
                              "tz": zone_name})
    if cron is not None:
        spec = validate_spec({"type": "cron", "expr": cron, "tz": zone_name})
        check_fires(spec, now)
        return spec
    if every is not None:
        start = _utc(now).replace(microsecond=0)
        return validate_spec({"type": "interval", "seconds": parse_duration(every),
                              "start": start.isoformat(), "tz": zone_name})
    assert at is not None
    when = _parse_at(at, zone, need_offset=False)
    return validate_spec({"type": "date", "at": when.isoformat(), "tz": zone_name})


def check_fires(spec: TriggerSpec, now: datetime | None = None) -> None:
    """InputError unless a cron ``spec`` has a fire time within :data:`SEARCH_YEARS` years
    of ``now`` (intervals always have one; a date in the past is allowed)."""
    if spec["type"] != "cron":
        return
    when = datetime.now(UTC) if now is None else now
    try:
        found = build_trigger(spec).get_next_fire_time(None, when)
    except SearchExhausted as e:
        raise InputError(f"invalid cron expression {quote(spec['expr'])}: it never fires "
                         f"({e})") from None
    if found is None:
        raise InputError(f"invalid cron expression {quote(spec['expr'])}: it never fires")


def describe(spec: TriggerSpec) -> str:
    """Short text: ``cron 0 9 * * 1 (Europe/Paris)``, ``every 30s``, ``at 2026-...+00:00``."""
    spec = validate_spec(spec)
    if spec["type"] == "cron":
        return f"cron {spec['expr']} ({spec['tz']})"
    if spec["type"] == "interval":
        return f"every {format_duration(spec['seconds'])}"
    if spec["type"] == "after":
        return "after " + ", ".join(p["job"] if p["on"] == "success" else f"{p['job']} ({p['on']})"
                                    for p in spec["parents"])
    return f"at {spec['at']}"


def fire_times(
    spec_or_trigger: TriggerSpec | BaseTrigger, start: datetime, end: datetime, limit: int
) -> list[datetime]:
    """Up to ``limit`` fire times in [start, end], ascending, as aware UTC datetimes.

    Walks the trigger the way APScheduler enumerates missed runs (each call given the
    previous fire time); stops early if a trigger fails to move forward. A cron's bounded
    search (:class:`SearchExhausted`, for a trigger that never fires) does not end the walk
    while ``end`` lies past the bound it reached: the walk goes on from there, so a long
    range with a gap of years (a cron's first year, 1970; a ``year=`` field) is walked
    whole. A trigger with no fire time at all costs one search per
    :data:`~qcluster.definitions.crontrigger.SEARCH_YEARS` of the range.
    """
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("start and end must be timezone-aware")
    given = spec_or_trigger
    trigger = build_trigger(given) if isinstance(given, dict) else given
    times: list[datetime] = []
    previous: datetime | None = None  # the last fire time, given to the next call
    last: datetime | None = None  # the last fire time, even across a search's bound
    now = start
    while len(times) < limit:
        try:
            found = trigger.get_next_fire_time(previous, now)
        except SearchExhausted as e:
            if e.bound is None or e.bound >= _utc(end):
                break
            previous, now = None, e.bound  # none up to the bound: search on from there
            continue
        if found is None or _utc(found) > _utc(end):
            break
        if last is not None and _utc(found) <= last:
            break
        if _utc(found) >= _utc(start):
            times.append(_utc(found))
        previous, last = found, _utc(found)
        now = last + _MICROSECOND
    return times
