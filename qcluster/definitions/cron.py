"""The crontab(5) dialect of ``--cron``, and APScheduler's own ``key=value`` syntax, read into
CronTrigger keyword sets (:func:`cron_fields`); :mod:`qcluster.definitions.triggers` builds
the triggers from them.

Cron dialect. 5 fields ``minute hour dom month dow``, or 6 with seconds first, crontab(5)
numbering: dow 0 and 7 are Sunday, 1 is Monday; names sun..sat, jan..dec in any case;
``*  a  a-b  */n  a-b/n  a/n`` (= ``a-max/n``) and comma lists. Ranges must ascend, except
in dow, where they wrap round the week (``fri-mon`` = fri,sat,sun,mon). A step larger than
its range keeps the first value. When dom and dow are both restricted, a day matches if
EITHER matches (Vixie cron: a field starting with ``*``, even ``*/2``, is unrestricted).
Macros @yearly @annually @monthly @weekly @daily @midnight @hourly; @reboot is refused.
APScheduler's own syntax, ``second=*/10 minute=5 day_of_week=mon-fri``, passes through with
APScheduler's meaning: day_of_week 0 is MONDAY there, and dom/dow are ANDed. A bare word
continues the previous value (``day=last fri``).

Fixed-time or wall-clock (:func:`is_fixed`), for the DST rule in
:mod:`qcluster.definitions.triggers`, told apart as cron(8) does (cronie's entry.c sets
MIN_STAR or HR_STAR when the minute or hour field starts with ``*``): a cron is *fixed*
unless its second, minute or hour field starts with ``*``. So ``0``, ``30``, ``1,2`` and
``0-30/5`` are fixed; ``*`` and ``*/15`` (even ``*/60``, which means ``0``) are not. The
seconds field is judged with the minute and hour (cron(8) has none); a 5-field line's
second is ``0``, fixed. Macros are judged by what they stand for: ``@hourly`` is
``0 * * * *``, wall-clock; the others start ``0 0``, fixed. In the ``key=value`` syntax a
missing second, minute or hour is what CronTrigger makes of it: ``*`` when a finer field is
given, else 0 (``hour=9`` is 09:00:00, fixed; ``minute=5`` is every hour, wall-clock).
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

from apscheduler.triggers.cron import CronTrigger

from qcluster.errors import InputError

_MACROS = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_APS_KEYS = ("year", "month", "day", "week", "day_of_week", "hour", "minute", "second")
_APS_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # APScheduler: 0 is Monday
_DAYS = {d: (i + 1) % 7 for i, d in enumerate(_APS_DAYS)}  # crontab: 0 is Sunday
_MONTHS = {m: i + 1 for i, m in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"))}
_TIME_KEYS = ("second", "minute", "hour")
_ITEM = re.compile(r"(\*|[0-9a-z]+(?:-[0-9a-z]+)?)(?:/([0-9]+))?")


def quote(text: str, limit: int = 60) -> str:
    """``text`` as an error message quotes it: repr, cut at ``limit`` characters."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def quote_value(value: object, limit: int = 60) -> str:
    """Any ``value`` as an error message quotes it (text as :func:`quote` does, anything
    else by its repr); an int too long to print is "a huge number"."""
    try:
        return quote(value if isinstance(value, str) else repr(value), limit)
    except ValueError:  # Python refuses to print an int of more than 4300 digits
        return "a huge number"


def _small_int(digits: str) -> int:  # a huge number reads as a million: out of any range
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 6 else 10**6


def _hint(token: str) -> str:
    return " (Quartz L/W/#/? are not supported)" if set(token) & set("lw#?") else ""


class _Field:
    def __init__(self, name: str, lo: int, hi: int, names: dict[str, int] | None = None) -> None:
        self.name, self.lo, self.hi, self.names = name, lo, hi, names or {}

    def value(self, token: str) -> int:
        if token in self.names:
            return self.names[token]
        if not token.isascii() or not token.isdigit():
            raise ValueError(f"{self.name}: unknown value {quote(token, 20)}{_hint(token)}")
        if not self.lo <= _small_int(token) <= self.hi:
            raise ValueError(f"{self.name} value {token[:8]} out of range {self.lo}-{self.hi}")
        return _small_int(token)

    def item(self, text: str) -> tuple[int, int, int]:
        """(first, last, step) of one list item; ``last < first`` only for a wrapping range."""
        match = _ITEM.fullmatch(text)
        if not match:
            raise ValueError(f"{self.name}: cannot read {quote(text, 20)}{_hint(text)}")
        base, step_text = match.groups()
        step = 1 if step_text is None else _small_int(step_text)
        if step < 1:
            raise ValueError(f"{self.name}: step must be at least 1")
        if base == "*":
            return self.lo, self.hi, step
        first_text, _, last_text = base.partition("-")
        first = self.value(first_text)
        if last_text:
            return first, self.value(last_text), step
        return first, (self.hi if step_text else first), step

    def to_aps(self, text: str) -> str:
        """This crontab field as an APScheduler field expression with the same meaning."""
        out = []
        for item in text.split(","):
            first, last, step = self.item(item)
            if last < first:
                raise ValueError(f"{self.name} range {item} is reversed")
            if step > last - first:
                out.append(str(first))
            elif item.startswith("*"):
                out.append("*" if step == 1 else f"*/{step}")
            else:
                out.append(f"{first}-{last}" + (f"/{step}" if step > 1 else ""))
        return ",".join(out)


class _DayOfWeek(_Field):
    def to_aps(self, text: str) -> str:
        days: set[int] = set()  # crontab numbering, Sunday = 0
        for item in text.split(","):
            first, last, step = self.item(item)
            span = [(first + i) % 7 for i in range((last - first) % 7 + 1)]
            if last - first == 7:  # 0-7: the whole week, Sunday twice
                span = [0, 1, 2, 3, 4, 5, 6, 0]
            days.update(span[::step])
        if len(days) == 7:
            return "*"
        return ",".join(_APS_DAYS[(d - 1) % 7] for d in sorted(days, key=lambda d: (d - 1) % 7))


_CRON_FIELDS = (
    _Field("second", 0, 59), _Field("minute", 0, 59), _Field("hour", 0, 23),
    _Field("day-of-month", 1, 31), _Field("month", 1, 12, _MONTHS),
    _DayOfWeek("day-of-week", 0, 7, _DAYS),
)


class _Cron(NamedTuple):
    fields: list[dict[str, str]]  # CronTrigger keyword sets; two mean 'fire when either fires'
    fixed: bool  # see is_fixed


def _fixed(second: str, minute: str, hour: str) -> bool:
    return not any(text.lstrip().startswith("*") for text in (second, minute, hour))


def _crontab_fields(expr: str) -> _Cron:
    """CronTrigger keyword sets for a crontab line, and whether it is fixed-time."""
    if expr.startswith("@"):
        if expr.lower() == "@reboot":
            raise ValueError("@reboot is not supported (a cluster has no boot)")
        if expr.lower() not in _MACROS:
            raise ValueError(f"unknown macro (expected one of {', '.join(_MACROS)})")
        expr = _MACROS[expr.lower()]
    parts = expr.lower().split()
    if len(parts) == 5:
        parts.insert(0, "0")
    if len(parts) != 6:
        raise ValueError(f"expected 5 fields, or 6 with seconds first, got {len(parts)}")
    aps = [field.to_aps(part) for field, part in zip(_CRON_FIELDS, parts, strict=True)]
    second, minute, hour, day, month, dow = aps
    common = {"second": second, "minute": minute, "hour": hour, "month": month}
    fixed = _fixed(*parts[:3])  # the text as typed: "*/60" reads as "0" above, yet is not fixed
    if parts[3].startswith("*") or parts[5].startswith("*"):
        return _Cron([{**common, "day": day, "day_of_week": dow}], fixed)
    return _Cron([{**common, "day": day, "day_of_week": "*"},
                  {**common, "day": "*", "day_of_week": dow}], fixed)


def _keyword_fields(expr: str) -> _Cron:
    """``key=value`` words, APScheduler's own field syntax, checked field by field."""
    fields: dict[str, str] = {}
    key = ""
    for word in expr.split():
        if "=" not in word:
            if not key:
                raise ValueError(f"expected key=value, got {quote(word, 20)}")
            fields[key] += " " + word
            continue
        key, _, value = word.partition("=")
        if key not in _APS_KEYS:
            raise ValueError(f"unknown field {quote(key, 20)} (expected {', '.join(_APS_KEYS)})")
        if key in fields:
            raise ValueError(f"{key} given twice")
        fields[key] = value
    for key, value in fields.items():
        try:
            CronTrigger.FIELDS_MAP[key](key, value)
        except (ValueError, TypeError, LookupError, OverflowError):
            raise ValueError(f"{key}={quote(value, 20)} is not a valid APScheduler "
                             f"expression") from None
    # CronTrigger's defaults: a missing field is "*" above the finest one given, its minimum
    # (0 for these three) below it.
    finest = max(CronTrigger.FIELD_NAMES.index(key) for key in fields)
    times = [fields.get(key, "0" if CronTrigger.FIELD_NAMES.index(key) > finest else "*")
             for key in _TIME_KEYS]
    return _Cron([fields], _fixed(*times))


def cron_fields(expr: str) -> list[dict[str, str]]:
    """CronTrigger keyword sets for ``expr`` (crontab or ``key=value``), or InputError.

    Two sets mean 'fire when either fires' (dom OR dow); the dicts are the caller's own.
    """
    # Parsed once per distinct expression: a file of 10,000 jobs has few distinct crons.
    return [dict(fields) for fields in _parse_cron(expr).fields]


def is_fixed(expr: str) -> bool:
    """Whether ``expr`` is a fixed-time cron (no ``*`` first in its second, minute or hour
    field; the module doc says more), not a wall-clock one; InputError if it is invalid."""
    return _parse_cron(expr).fixed


@functools.lru_cache(maxsize=4096)
def _parse_cron(expr: str) -> _Cron:
    if not expr:
        raise InputError("invalid cron expression '': it is empty")
    try:
        return _keyword_fields(expr) if "=" in expr else _crontab_fields(expr)
    except ValueError as e:
        raise InputError(f"invalid cron expression {quote(expr)}: {e}") from None
