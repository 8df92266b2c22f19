"""A job's policies: retries, timeout, overlap, misfire handling, bounds, jitter and
exclusion calendars (docs/DESIGN.md, "Job policies"). Plain data, checked once here.

A :class:`Policy` is part of a :class:`~qcluster.definitions.jobdefs.JobDef`. On the wire
(``to_wire``, ``jobs apply`` files, ``--json``) its fields are flat keys of the job, named
as below; in ``qc_jobs`` they are one JSON column, ``policy``, holding only what was
given (NULL when nothing was), so that a field added later needs no schema change. A field
left out (None) takes the ``[scheduler]`` default, read by the leader when it fires:

* ``retries`` (0-100), ``retry_backoff`` and ``retry_max_backoff`` (seconds): a failed or
  timed-out attempt is tried again up to ``retries`` times, the n-th retry after
  ``min(max, backoff * 2**(n-1))`` seconds, with "equal jitter" (half of it fixed, half
  drawn from a hash of the run and attempt, so it is reproducible);
* ``timeout`` (seconds): an attempt still running then is stopped (its process group is
  killed) and recorded ``timed_out``;
* ``overlap``: what a fire does while the job's previous run is still open: one of
  :data:`OVERLAP` (Temporal's ScheduleOverlapPolicy names);
* ``misfire``: what is done with fire times later than the misfire grace: one of
  :data:`MISFIRE` (Quartz's misfire instructions); ``catch_up`` (seconds) is how far
  back they are caught up (default: the grace);
* ``start``/``end`` (ISO 8601, kept in UTC): no fire before ``start`` or after ``end``;
  ``max_runs``: the job ends after that many fire times were run;
* ``jitter`` (seconds): each run starts up to that much after its fire time, by a hash of
  the job id and the fire time, so every leader computes the same delay;
* ``exclude``: names of calendars (``qcluster calendars``); a fire time on one of their
  dates (in the job's zone) is recorded ``skipped``, naming the calendar;
* ``tags``: the worker tags a run needs (``[worker] tags``): it goes only to a live worker
  that has them all, else waits within its grace and is recorded ``missed``, saying so;
* ``group``: an affinity group: every run of every job of the group goes to the one
  worker the group sits on while it lives (``qc_groups``; docs/DESIGN.md, "Routing");
* ``route``: the job's own routing strategy (one of the built-in ``[dispatch] strategy``
  names), for its runs instead of the cluster's;
* ``shards`` (2-1000): each fire time is that many runs, one per shard, spread over the
  workers; ``current_run()`` gives ``shard`` and ``shards``;
* ``broadcast``: each fire time is one run per live worker that has the job's tags.

A fire time of a sharded or broadcast job is several run rows, told apart by their
*slot* (``qc_runs.slot``: ``"3/8"`` for shard 3 of 8, ``"@w1"`` for worker w1's run;
``""`` for the one run of every other job), so each is recorded once.

The last three are the run's *routing*: a run row keeps them as it was fired
(``qc_runs.routing``, :func:`routing_text`), and the leader's dispatcher reads them there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from qcluster.definitions.cron import quote, quote_value
from qcluster.definitions.triggers import (
    MAX_INTERVAL,
    MIN_INTERVAL,
    format_duration,
    parse_duration,
)
from qcluster.errors import InputError
from qcluster.settings.model import DISPATCH_STRATEGIES

#: Overlap policies (Temporal's ScheduleOverlapPolicy; Kubernetes: Allow, Forbid, Replace).
OVERLAP = ("allow", "skip", "buffer-one", "buffer-all", "cancel-other")
#: Misfire policies (Quartz: FIRE_NOW / fire once, IGNORE_MISFIRE_POLICY, DO_NOTHING).
MISFIRE = ("run-once", "run-all", "skip")
MAX_RETRIES = 100
MAX_RUNS = 2**31 - 1
MAX_SHARDS = 1000
MAX_CALENDARS = 20
MAX_JITTER = 86400.0  # store/records.MAX_AHEAD: how far ahead a worker holds a run
MIN_TIMEOUT = 0.01
#: The range of each duration field, in seconds, and of each count.
DURATION_RANGES = {"retry_backoff": (MIN_INTERVAL, MAX_INTERVAL),
                   "retry_max_backoff": (MIN_INTERVAL, MAX_INTERVAL),
                   "timeout": (MIN_TIMEOUT, MAX_INTERVAL),
                   "catch_up": (MIN_INTERVAL, MAX_INTERVAL),
                   "jitter": (MIN_INTERVAL, MAX_JITTER)}
COUNT_RANGES = {"retries": (0, MAX_RETRIES), "max_runs": (1, MAX_RUNS),
                "shards": (2, MAX_SHARDS)}
CALENDAR_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
#: A worker tag, as ``[worker] tags`` spells one (settings/validators.Word).
TAG_RE = re.compile(r"[A-Za-z0-9][\w.:-]{0,63}", re.ASCII)
MAX_TAGS = 20
GROUP_NAME_RE = CALENDAR_NAME_RE
#: The strategies a job may ask for (``route``): the built-in ones, not a class of the
#: user's (that is the cluster's ``[dispatch] strategy``, loaded where the leader runs).
ROUTES = DISPATCH_STRATEGIES

#: The keys of a job's wire form that are policy fields, in the order shown.
FIELDS = ("retries", "retry_backoff", "retry_max_backoff", "timeout", "overlap", "misfire",
          "catch_up", "start", "end", "max_runs", "jitter", "exclude", "tags", "group",
          "route", "shards", "broadcast")
#: The fields that say where a run goes, not when (kept by each run row: ``routing``).
ROUTING_FIELDS = ("tags", "group", "route")


@dataclasses.dataclass(frozen=True)
class Policy:
    """A job's policies; None: the ``[scheduler]`` default (see the module doc)."""

    retries: int | None = None
    retry_backoff: float | None = None
    retry_max_backoff: float | None = None
    timeout: float | None = None
    overlap: str | None = None
    misfire: str | None = None
    catch_up: float | None = None
    start: str | None = None
    end: str | None = None
    max_runs: int | None = None
    jitter: float | None = None
    exclude: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()  # sorted, each once
    group: str | None = None
    route: str | None = None
    shards: int | None = None
    broadcast: bool | None = None  # True, or None

    def to_wire(self) -> dict[str, Any]:
        """Every field, as JSON data (``exclude`` and ``tags`` lists)."""
        out = dataclasses.asdict(self)
        out["exclude"] = list(self.exclude)
        out["tags"] = list(self.tags)
        return out

    def stored(self) -> str | None:
        """The ``qc_jobs.policy`` text: the fields given, as sorted JSON; None if none."""
        given = {k: v for k, v in self.to_wire().items() if v not in (None, [])}
        return json.dumps(given, sort_keys=True) if given else None

    def routing_text(self, worker: str | None = None) -> str | None:
        """What a run of this job keeps of where it goes (``qc_runs.routing``): the
        routing fields given, and ``worker`` (a broadcast run's own worker), as sorted
        JSON; None (every run of most jobs) if none."""
        if not (self.tags or self.group or self.route or worker):
            return None
        given = {"tags": list(self.tags), "group": self.group, "route": self.route,
                 "worker": worker}
        return json.dumps({k: v for k, v in given.items() if v not in (None, [])},
                          sort_keys=True, separators=(",", ":"))

    def slots(self) -> list[str]:
        """The slots of a sharded job's fire time (``"0/N"`` ... ``"N-1/N"``); ``[""]``
        for a job of one run per fire time. A broadcast job's come from its live workers
        (:func:`broadcast_slot`)."""
        if self.shards is None:
            return [""]
        return [f"{i}/{self.shards}" for i in range(self.shards)]

    @property
    def start_ts(self) -> float | None:
        return None if self.start is None else datetime.fromisoformat(self.start).timestamp()

    @property
    def end_ts(self) -> float | None:
        return None if self.end is None else datetime.fromisoformat(self.end).timestamp()


NONE = Policy()


def from_stored(text: str | None) -> Policy:
    """The policy of a ``qc_jobs.policy`` value (checked again: a row is input too)."""
    if text is None:
        return NONE
    try:
        data = json.loads(text)
    except ValueError as e:
        raise InputError(f"unreadable policy: {e}") from None
    return check_policy(data)


def check_policy(data: object, *, strict: bool = True) -> Policy:
    """A :class:`Policy` from the policy keys of ``data`` (a job's wire form; other keys
    are ignored unless ``strict`` and ``data`` holds only policy keys). InputError, one
    line naming the field, for a bad value."""
    if not isinstance(data, Mapping):
        raise InputError("a policy must be a table")
    if strict:
        unknown = set(data) - set(FIELDS)
        if unknown:
            raise InputError(f"unknown policy field {sorted(map(str, unknown))[0]!r}")
    values: dict[str, Any] = {}
    for key in FIELDS:
        value = data.get(key)
        if value is None or (key in ("exclude", "tags") and value in ([], ())):
            continue
        values[key] = _check(key, value)
    policy = Policy(**values)
    if (policy.retry_backoff is not None and policy.retry_max_backoff is not None
            and policy.retry_max_backoff < policy.retry_backoff):
        raise InputError("retry_max_backoff must be at least retry_backoff")
    if policy.start_ts is not None and policy.end_ts is not None \
            and policy.end_ts <= policy.start_ts:
        raise InputError("end must be after start")
    if policy.broadcast and policy.shards is not None:
        raise InputError("a job is either broadcast (a run on every live worker) or sharded "
                         "(shards runs spread over them), not both")
    if policy.broadcast and policy.group is not None:
        raise InputError("a broadcast job runs on every live worker; an affinity group keeps "
                         "its jobs on one (give one of broadcast and group)")
    return policy


def value_error(key: str, value: object) -> InputError:
    """The error for a bad ``value`` of the duration or count field ``key``: one message
    per field, whichever way the value came (``jobs add`` flags, a ``jobs apply`` file,
    ``Client.add``, the leader's control object)."""
    shown = quote_value(value, 30)
    if key in COUNT_RANGES:
        low, high = COUNT_RANGES[key]
        return InputError(f"{key} must be a whole number from {low} to {high} (got {shown})")
    least, most = (format_duration(b) for b in DURATION_RANGES[key])
    return InputError(f"{key} must be a duration from {least} to {most}, such as 30s, 5m or "
                      f"1h30m (got {shown})")


def _check(key: str, value: object) -> Any:
    if key in DURATION_RANGES:
        low, high = DURATION_RANGES[key]
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise value_error(key, value)
        try:
            seconds = parse_duration(value)
        except InputError:
            raise value_error(key, value) from None
        if not low <= seconds <= high:
            raise value_error(key, value)
        return seconds
    if key in COUNT_RANGES:
        low, high = COUNT_RANGES[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise value_error(key, value)
        return value
    if key in ("overlap", "misfire"):
        allowed = OVERLAP if key == "overlap" else MISFIRE
        if not isinstance(value, str) or value not in allowed:
            raise InputError(f"{key} must be one of {', '.join(allowed)} (got "
                             f"{quote(str(value), 30)})")
        return value
    if key in ("start", "end"):
        return _instant(key, value)
    if key in _ROUTING_CHECKS:
        return _ROUTING_CHECKS[key](value)
    return _calendars(value)


def _group(value: object) -> str:
    if not isinstance(value, str) or not GROUP_NAME_RE.fullmatch(value):
        raise InputError(f"invalid group name {quote(str(value), 40)}: use 1-100 letters, "
                         "digits and _ . -")
    return value


def _route(value: object) -> str:
    """A built-in strategy's name, as ``[dispatch] strategy`` spells it (a ``-`` for
    each ``_`` is taken too: ``consistent-hash``)."""
    name = value.replace("-", "_") if isinstance(value, str) else value
    if not isinstance(name, str) or name not in ROUTES:
        shown = ", ".join(r.replace("_", "-") for r in ROUTES)
        raise InputError(f"route must be one of {shown} (got {quote(str(value), 30)})")
    return name


def broadcast_slot(node_id: str) -> str:
    """The slot of a broadcast job's run on worker ``node_id``."""
    return f"@{node_id}"


def shard_of(slot: str) -> tuple[int, int] | None:
    """(shard, shards) of a sharded run's slot; None for any other slot."""
    shard, sep, shards = slot.partition("/")
    if not sep or not shard.isdigit() or not shards.isdigit():
        return None
    return int(shard), int(shards)


def check_tags(value: object) -> tuple[str, ...]:
    """Tags a job asks for: a list (or a comma-separated text) of tag names, each as
    ``[worker] tags`` spells one; sorted, each once."""
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise InputError("tags must be a list of tag names")
    clean = tuple(sorted({n.strip() for n in names}))
    for name in clean:
        if not TAG_RE.fullmatch(name):
            raise InputError(f"invalid tag {quote(name, 40)}: use 1-64 letters, digits and "
                             "_ . : - (as [worker] tags)")
    if len(clean) > MAX_TAGS:
        raise InputError(f"tags names more than {MAX_TAGS} tags")
    return clean


def _instant(key: str, value: object) -> str:
    if isinstance(value, datetime):  # a TOML date-time of a job file, an aware datetime
        value = value.isoformat()
    if not isinstance(value, str):
        raise InputError(f"{key} must be an ISO 8601 time with an offset")
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InputError(f"{key}: cannot read {quote(value, 40)} as an ISO 8601 time") from None
    if when.tzinfo is None:
        raise InputError(f"{key}: {quote(value, 40)} needs an offset (e.g. +00:00 or Z)")
    try:
        return when.astimezone(UTC).isoformat()
    except (OverflowError, ValueError):
        raise InputError(f"{key}: {quote(value, 40)} is out of range") from None


def _calendars(value: object) -> tuple[str, ...]:
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise InputError("exclude must be a list of calendar names")
    clean = tuple(dict.fromkeys(n.strip() for n in names))
    for name in clean:
        check_calendar_name(name)
    if len(clean) > MAX_CALENDARS:
        raise InputError(f"exclude names more than {MAX_CALENDARS} calendars")
    return clean


def check_calendar_name(name: object) -> str:
    if not isinstance(name, str) or not CALENDAR_NAME_RE.fullmatch(name):
        raise InputError(f"invalid calendar name {quote(str(name), 40)}: use 1-100 letters, "
                         "digits and _ . -")
    return name


def _broadcast(value: object) -> bool | None:
    if not isinstance(value, bool):
        raise InputError("broadcast must be true or false")
    return value or None


_ROUTING_CHECKS: dict[str, Callable[[object], Any]] = {
    "tags": check_tags, "group": _group, "route": _route, "broadcast": _broadcast}


def fraction(*parts: object) -> float:
    """A number in [0, 1) from ``parts``, the same on every node and every run (SHA-256;
    Python's ``hash`` of a string differs between processes)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def jitter_of(job_id: str, fire_ts: float, jitter: float | None) -> float:
    """Seconds after ``fire_ts`` that the run of ``job_id`` starts (0 without jitter)."""
    if not jitter:
        return 0.0
    return round(jitter * fraction(job_id, repr(round(fire_ts, 6))), 6)


def backoff(run_id: int, attempt: int, base: float, most: float) -> float:
    """The delay before attempt ``attempt + 1`` of run ``run_id``: exponential
    (``base * 2**(attempt-1)``, at most ``most``), half of it fixed and half jitter."""
    full = min(most, base * 2.0 ** min(attempt - 1, 60))
    return round(full / 2 + full / 2 * fraction(run_id, attempt), 6)


@dataclasses.dataclass(frozen=True)
class Defaults:
    """The ``[scheduler]`` defaults of the fields a job leaves out."""

    retries: int = 0
    retry_backoff: float = 10.0
    retry_max_backoff: float = 300.0


def run_fields(policy: Policy, defaults: Defaults) -> dict[str, Any]:
    """What a run row of a job with ``policy`` holds of it (``store/runs.FireRow``'s
    ``timeout``, ``retries``, ``retry_backoff``, ``retry_max_backoff``, ``routing``)."""
    retries = defaults.retries if policy.retries is None else policy.retries
    base = defaults.retry_backoff if policy.retry_backoff is None else policy.retry_backoff
    most = (defaults.retry_max_backoff if policy.retry_max_backoff is None
            else policy.retry_max_backoff)
    return {"timeout": policy.timeout, "retries": retries,
            "retry_backoff": base if retries else None,
            "retry_max_backoff": max(base, most) if retries else None,
            "routing": policy.routing_text()}


def defaults_from(scheduler: Any) -> Defaults:
    """The :class:`Defaults` of a ``[scheduler]`` section (``settings.SchedulerSettings``)."""
    base = float(scheduler.retry_backoff_seconds)
    return Defaults(int(scheduler.retries), base,
                    max(base, float(scheduler.retry_max_backoff_seconds)))
