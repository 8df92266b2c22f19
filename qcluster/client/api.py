"""The Python API: the operations of the ``qcluster`` command, from code.

>>> from qcluster import Client
>>> client = Client("prod.toml")  # or Client(settings=...), or Client() for the defaults
>>> client.add("tick", "jobs.examples:hello", every="30s", kwargs={"name": "ops"})
Change(job_id='tick', status='added', via='leader s1')

Every method validates its input as the CLI does (the CLI is a thin layer over this
class), raises a :class:`~qcluster.errors.QClusterError` subclass with a one-line message
when it refuses (:class:`~qcluster.errors.InputError` for bad input, ``JobNotFound``,
``NotAllowed``, ``DatabaseUnavailable``...), and writes nothing when it raises. Job
changes go through the leader's control API while a leader is alive, else directly to the
database, fenced (see :mod:`qcluster.client.changes`). A client holds no connection between calls:
each call opens the database and closes it again, so a client is cheap to keep and safe to
share between threads.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from qcluster.client import calendars as cals
from qcluster.client import changes, reads
from qcluster.definitions.imports import extend_import_path
from qcluster.definitions.jobdefs import JobDef, check_job_id, validate_job
from qcluster.definitions.jobfile import load_job_file
from qcluster.definitions.policy import FIELDS as POLICY_FIELDS
from qcluster.definitions.triggers import make_spec
from qcluster.errors import InputError, QClusterError
from qcluster.settings import Settings, load_settings, resolve_config_path
from qcluster.store import bounds
from qcluster.store.backfill import Counts

MAX_LIMIT = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Change:
    """What a job change did: ``status`` is added, replaced, unchanged, paused, resumed or
    removed; ``via`` is ``"leader <node id>"`` or ``"database"`` (no leader was alive)."""

    job_id: str
    status: str
    via: str


@dataclasses.dataclass(frozen=True)
class Applied:
    """What ``apply`` did, job ids by outcome."""

    created: list[str]
    updated: list[str]
    unchanged: list[str]
    removed: list[str]
    via: str


@dataclasses.dataclass(frozen=True)
class RunRequested:
    """A run recorded by :meth:`Client.run`; with ``via == "database"`` no leader was alive
    and the next leader sends it."""

    job_id: str
    run_id: int
    via: str


@dataclasses.dataclass(frozen=True)
class RunCancelled:
    """What :meth:`Client.cancel` did: ``status`` ``cancelled`` (it never starts) or
    ``running`` (marked: its worker stops it within about a heartbeat and records it
    ``cancelled``; no further attempt)."""

    run_id: int
    status: str
    attempt: int
    via: str


@dataclasses.dataclass(frozen=True)
class Backfilled(Counts):
    """What :meth:`Client.backfill` did (:class:`~qcluster.store.backfill.Counts`): of
    ``fire_times`` in ``[start, end]``, ``new`` runs were scheduled, ``skipped`` recorded
    excluded by a calendar, and ``already`` had a run. With ``via == "database"`` no
    leader was alive and the next leader sends them."""

    via: str = ""


@dataclasses.dataclass(frozen=True)
class CalendarChange:
    """What a calendar change did: ``status`` is created, replaced, unchanged or removed;
    ``via`` as for :class:`Change`."""

    name: str
    status: str
    via: str


class Client:
    """Add, apply, list, show, pause, resume, remove and run jobs; list and cancel runs;
    add, list, show and remove exclusion calendars; read the cluster's status.

    ``config`` is a config file path; with neither it nor ``settings``, the file is
    ``$QCLUSTER_CONFIG``, else ``./qcluster.toml``, else the embedded defaults, as for the
    CLI. The config's ``[jobs] paths`` are added to this process's import path, so that
    references are checked (imported) here as the workers will import them.
    """

    def __init__(self, config: str | Path | None = None, *,
                 settings: Settings | None = None) -> None:
        if settings is not None and config is not None:
            raise InputError("give a config path or settings, not both")
        if config is not None and not isinstance(config, str | Path):
            raise InputError(f"config must be a path, not {type(config).__name__}")
        if settings is not None and not isinstance(settings, Settings):
            raise InputError(f"settings must be Settings, not {type(settings).__name__}")
        if settings is None:
            settings = load_settings(resolve_config_path(None if config is None
                                                         else Path(config)))
        self.settings = settings
        extend_import_path(settings.jobs.paths)

    def __repr__(self) -> str:
        return f"<Client config={self.settings.source}>"

    # -- job changes ------------------------------------------------------------------------

    def add(
        self,
        job_id: str,
        func: str,
        *,
        cron: str | None = None,
        every: str | float | timedelta | None = None,
        at: str | datetime | None = None,
        after: Sequence[str] | None = None,
        tz: str | None = None,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        replace: bool = False,
        recover: bool = False,
        misfire_grace: int | None = None,
        coalesce: bool | None = None,
        max_attempts: int | None = None,
        **policy: Any,
    ) -> Change:
        """Add one job, with exactly one of ``cron``, ``every`` (``"30s"``, seconds or a
        timedelta), ``at`` (an ISO 8601 time or an aware datetime) and ``after`` (parent
        job ids, each ``"A"`` or ``"A:success|failure|always"``: the job runs once per
        fire of its parents, when their runs of that fire time have ended so). With ``replace``, a
        job of the same id is replaced (its schedule kept if the trigger is unchanged);
        without, an existing id is refused. ``policy``: the fields of
        :mod:`qcluster.definitions.policy` (``retries=3, timeout="30s", overlap="skip"``,
        ``tags=["gpu"], group="etl", route="first"``; durations as text, seconds or
        timedeltas, times as ISO text or aware datetimes)."""
        jd = self.job(job_id, func, cron=cron, every=every, at=at, after=after, tz=tz,
                      args=args,
                      kwargs=kwargs, recover=recover, misfire_grace=misfire_grace,
                      coalesce=coalesce, max_attempts=max_attempts, **policy)
        outcome = changes.add_jobs(self.settings, [jd], replace=replace)
        result = outcome.result if isinstance(outcome.result, dict) else {}
        status = ("replaced" if result.get("updated") else
                  "unchanged" if result.get("unchanged") else "added")
        return Change(jd.id, status, outcome.via)

    def job(
        self,
        job_id: str,
        func: str,
        *,
        cron: str | None = None,
        every: str | float | timedelta | None = None,
        at: str | datetime | None = None,
        after: Sequence[str] | None = None,
        tz: str | None = None,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        recover: bool = False,
        misfire_grace: int | None = None,
        coalesce: bool | None = None,
        max_attempts: int | None = None,
        **policy: Any,
    ) -> JobDef:
        """The validated definition :meth:`add` would write (nothing is written): the
        reference is checked against ``[jobs] allow`` and imported. ``max_attempts``
        bounds a ``recover`` job's attempts of one run (None: ``[runs] max_attempts``)."""
        kinds: tuple[tuple[str, object, type | tuple[type, ...]], ...] = (
            ("cron", cron, str), ("at", at, (str, datetime)), ("tz", tz, str))
        for name, value, kind in kinds:
            if value is not None and not isinstance(value, kind):
                raise InputError(f"{name} must be a string, not {type(value).__name__}")
        if isinstance(every, timedelta):
            every = every.total_seconds()
        elif every is not None and (isinstance(every, bool)
                                    or not isinstance(every, str | int | float)):
            raise InputError(f"every must be a duration such as \"30s\", seconds or a "
                             f"timedelta, not {type(every).__name__}")
        if isinstance(at, datetime):
            at = at.isoformat()
        if after is not None and (isinstance(after, str) or not isinstance(after, Sequence)
                                  or not all(isinstance(a, str) for a in after)):
            raise InputError('after must be a list of parent job ids, e.g. ["extract", '
                             '"load:failure"]')
        trigger = make_spec(cron=cron, every=every, at=at, after=list(after or []) or None,
                            tz=tz,
                            default_tz=self.settings.scheduler.timezone)
        wire: dict[str, Any] = {"id": job_id, "func": func, "trigger": trigger,
                "args": list(args) if isinstance(args, list | tuple) else args,
                "kwargs": {} if kwargs is None else kwargs,
                "misfire_grace_seconds": misfire_grace, "coalesce": coalesce,
                "recover": recover, "max_attempts": max_attempts}
        unknown = set(policy) - set(POLICY_FIELDS)
        if unknown:
            raise InputError(f"unknown job option {sorted(unknown)[0]!r}")
        for key, value in policy.items():
            if isinstance(value, timedelta):
                value = value.total_seconds()
            elif isinstance(value, datetime):
                value = value.isoformat()
            wire[key] = value
        return validate_job(wire, self.settings.jobs.allow, import_it=True,
                            min_interval=self.settings.scheduler.min_interval_seconds)

    def apply(self, source: str | Path | Iterable[JobDef], *, prune: bool = False) -> Applied:
        """Create and update jobs declaratively from a ``[[job]]`` TOML file (a path) or
        from definitions built with :meth:`job`; unchanged jobs keep their schedule. With
        ``prune``, jobs not named are removed. All are checked before anything is written."""
        if isinstance(source, str | Path):
            defs = load_job_file(Path(source), allow=list(self.settings.jobs.allow),
                                 default_tz=self.settings.scheduler.timezone,
                                 min_interval=self.settings.scheduler.min_interval_seconds)
            try:  # what the store refuses (a missing calendar, a long-past date) names it too
                outcome = changes.apply_jobs(self.settings, defs, prune=prune)
            except InputError as e:
                raise type(e)(f"{source}: {e}") from None
        else:
            outcome = changes.apply_jobs(self.settings, self._checked(source), prune=prune)
        r = outcome.result if isinstance(outcome.result, dict) else {}
        return Applied(created=list(r.get("created", [])), updated=list(r.get("updated", [])),
                       unchanged=list(r.get("unchanged", [])),
                       removed=list(r.get("removed", [])), via=outcome.via)

    def _checked(self, source: object) -> list[JobDef]:
        """Definitions given as objects are checked again as the leader checks them (a
        JobDef can be built by hand, or changed with ``dataclasses.replace``)."""
        if isinstance(source, str | bytes) or not isinstance(source, Iterable):
            raise InputError("apply takes a job file path or JobDef objects")
        defs: list[JobDef] = []
        seen: set[str] = set()
        for d in source:
            if not isinstance(d, JobDef):
                raise InputError("apply takes a job file path or JobDef objects")
            try:
                wire = d.to_wire()
            except (TypeError, ValueError):
                raise InputError(f"job {d.id!r}: malformed definition") from None
            checked = validate_job(wire, self.settings.jobs.allow, import_it=True,
                                   min_interval=self.settings.scheduler.min_interval_seconds)
            if checked.id in seen:
                raise InputError(f"job {checked.id!r}: the id is used twice")
            seen.add(checked.id)
            defs.append(checked)
        return defs

    def pause(self, job_id: str) -> Change:
        """Pause a job: it fires no more until resumed."""
        return self._action("pause", job_id, "paused")

    def resume(self, job_id: str) -> Change:
        """Resume a paused job, from now on."""
        return self._action("resume", job_id, "resumed")

    def remove(self, job_id: str) -> Change:
        """Remove a job; its runs stay, and its open runs get no further attempt (as
        :meth:`cancel`)."""
        return self._action("remove", job_id, "removed")

    def run(self, job_id: str) -> RunRequested:
        """Fire a job now, once."""
        outcome = changes.run_job(self.settings, check_job_id(job_id))
        return RunRequested(job_id, int(outcome.result), outcome.via)

    def backfill(self, job_id: str, start: str | datetime, end: str | datetime) -> Backfilled:
        """Run each fire time of the job's trigger in ``[start, end]`` once: ISO 8601 text
        or datetimes, read in the job's zone when they have no offset; ``end`` not later
        than now; at most 10,000 fire times. A fire time that already has a run (the live
        schedule's, or an earlier backfill's) gets none: backfilling twice writes nothing
        the second time. New runs start now, with the job's timeout and retries; one on a
        date the job excludes is recorded ``skipped``. Not subject to the overlap policy
        or ``max_runs``."""
        first, last = (t.isoformat() if isinstance(t, datetime) else t for t in (start, end))
        outcome = changes.backfill_job(self.settings, check_job_id(job_id), first, last)
        r = outcome.result if isinstance(outcome.result, dict) else {}
        try:
            return Backfilled(**{f.name: r[f.name] for f in dataclasses.fields(Counts)},
                              via=outcome.via)
        except (KeyError, TypeError):
            raise QClusterError("the leader sent a malformed backfill reply") from None

    def cancel(self, run_id: int) -> RunCancelled:
        """Stop any further attempt of run ``run_id``: a run not started yet is recorded
        ``cancelled`` and never starts; a running one is marked, and its worker stops it
        (its process group killed) and records it ``cancelled``; no new attempt.
        InputError for a run that does not exist or has already finished."""
        outcome = changes.cancel_run(self.settings, run_id)
        r = outcome.result if isinstance(outcome.result, dict) else {}
        return RunCancelled(int(r.get("run_id", run_id)), str(r.get("status", "")),
                            int(r.get("attempt", 0)), outcome.via)

    def _action(self, action: str, job_id: str, past: str) -> Change:
        outcome = changes.job_action(self.settings, action, check_job_id(job_id))
        return Change(job_id, past, outcome.via)

    # -- exclusion calendars ----------------------------------------------------------------

    def add_calendar(self, name: str, dates: Iterable[object] = (), *,
                     file: str | Path | None = None, replace: bool = False) -> CalendarChange:
        """Create calendar ``name`` from ``dates`` (``"2026-12-25"``,
        ``"2026-12-24..2026-12-26"``, :class:`datetime.date` objects or ``(first, last)``
        pairs) and the lines of ``file`` (one date or range per line, ``#`` comments).
        With ``replace``, an existing calendar gets these dates instead; without, an
        existing name is refused. A job's ``exclude`` may then name it."""
        items = cals.wire_items(dates)
        if file is not None:
            if not isinstance(file, str | Path):
                raise InputError(f"file must be a path, not {type(file).__name__}")
            items += cals.read_file(Path(file))
        if not isinstance(replace, bool):
            raise InputError("replace must be true or false")
        outcome = cals.add_calendar(self.settings, name, items, replace=replace)
        return CalendarChange(name, str(outcome.result), outcome.via)

    def remove_calendar(self, name: str) -> CalendarChange:
        """Remove calendar ``name``; InputError while a job excludes it (naming the jobs)."""
        outcome = cals.remove_calendar(self.settings, name)
        return CalendarChange(name, "removed", outcome.via)

    def calendar(self, name: str) -> dict[str, Any]:
        """One calendar: its ``dates`` (ranges as ``first..last``), ``days``, ``version``
        and the ``jobs`` that exclude it. InputError if there is none."""
        return cals.show_calendar(self.settings, name)

    def calendars(self) -> list[dict[str, Any]]:
        """Every calendar, by name, with counts of its ranges, days and jobs."""
        return cals.list_calendars(self.settings)

    # -- reads ------------------------------------------------------------------------------

    def show(self, job_id: str) -> dict[str, Any]:
        """One job and its latest runs; ``JobNotFound`` if there is none."""
        return reads.show_job(self.settings, check_job_id(job_id))

    def runs(self, *, job: str | None = None, status: str | None = None,
             since: str | datetime | float | None = None,
             limit: int = 50) -> list[dict[str, Any]]:
        """Runs, newest scheduled time first, optionally of one job, with one status,
        scheduled at or after ``since`` (ISO 8601 text, a datetime, or a Unix time; a time
        without a zone is UTC). ``limit=0`` lists them all."""
        from qcluster.store.runs import RunStatus

        if status is not None and status not in tuple(RunStatus):
            raise InputError(f"invalid status {status!r}: use one of {', '.join(RunStatus)}")
        if job is not None:
            check_job_id(job)
        return reads.list_runs(self.settings, job_id=job, status=status,
                               since=_since(since), limit=_limit(limit))

    def show_run(self, run_id: int) -> dict[str, Any]:
        """Run ``run_id`` as :meth:`runs` gives it, with what its attempts kept:
        ``attempts``, ``[{"attempt", "output", "result"}]`` (the tail of what the attempt
        wrote to stdout and stderr, its log records included, and the repr of its return
        value), oldest first. InputError if there is no such run."""
        return reads.show_run(self.settings,
                              bounds.check_int(run_id, "a run id", bounds.RUN_ID))

    def cluster_status(self) -> dict[str, Any]:
        """The cluster row, the live leader (or None) and the live members."""
        return reads.cluster_status(self.settings)

    def backend_status(self) -> dict[str, Any]:
        """The coordination backend, the migration phase and which nodes honour it."""
        return reads.backend_status(self.settings)


    # Last: inside the class body, later annotations would take `list` for this method.
    def list(self, *, limit: int = 0) -> list[dict[str, Any]]:
        """Jobs, by id; ``limit=0`` lists them all."""
        return reads.list_jobs(self.settings, limit=_limit(limit))


def _limit(limit: int) -> int:
    if not isinstance(limit, int) or isinstance(limit, bool) or not 0 <= limit <= MAX_LIMIT:
        raise InputError(f"invalid limit {limit!r}: expected 0 (all) to {MAX_LIMIT}")
    return limit


def _since(value: str | datetime | float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
        if not math.isfinite(seconds):
            raise InputError("invalid since: expected a time")
        return seconds
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise InputError(f"invalid since {value!r}: expected an ISO 8601 time") from None
    if not isinstance(value, datetime):
        raise InputError(f"invalid since {value!r}: expected an ISO 8601 time")
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()
