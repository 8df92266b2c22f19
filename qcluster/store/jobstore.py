"""The job store: an APScheduler 3.11 job store on SQLAlchemy, without pickle.

Each ``qc_jobs`` row is readable data: a trigger spec, a ``module:function`` reference
and JSON arguments. Rows become APScheduler :class:`Job` objects on the leader without
importing the job's module (the leader never runs jobs; workers do).

Promises, beyond APScheduler's ``BaseJobStore``:

* Every write is fenced on the leader's epoch (docs/DESIGN.md invariant 1): it commits only
  while that epoch is the cluster's epoch. The store opens the fenced transactions; the
  statements are those of :mod:`qcluster.store.catalog`, the owner of ``qc_jobs`` (it
  says why it, not this adapter, owns the table).
* :meth:`SqlJobStore.commit_fires` records a batch of run rows
  (:func:`qcluster.store.runs.insert_runs`, the owner of ``qc_runs``) and advances the jobs
  that produced them in ONE fenced transaction. A run row is unique on (job, scheduled
  time), so a fire time that an earlier leader already recorded inserts nothing.
* A row that fails to load is set aside (``broken`` says why) and reported; it is never
  deleted, unlike APScheduler's own SQLAlchemy store. So is a row whose trigger fires
  more often than ``min_interval_seconds`` (``definitions/limits.interval_problem``: a
  job stored before that check, or under another setting), and one whose next fire time
  the bounded search cannot find (``leader/scheduler.FireExecutor.fire``).
* ``get_due_jobs`` returns at most ``batch_size`` jobs, so a million due jobs never sit
  in memory at once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from apscheduler.job import Job
from apscheduler.jobstores.base import BaseJobStore, JobLookupError
from apscheduler.triggers.base import BaseTrigger
from sqlalchemy.engine import Connection, Row

from qcluster.definitions.limits import DEFAULT_MIN_INTERVAL, interval_problem
from qcluster.definitions.policy import NONE, Policy, from_stored
from qcluster.definitions.triggers import build_trigger
from qcluster.errors import InputError, QClusterError
from qcluster.store import calendars, catalog, schema
from qcluster.store.calendars import Calendar
from qcluster.store.catalog import Advance as Advance  # commit_fires takes these
from qcluster.store.db import Database
from qcluster.store.records import RunRecord
from qcluster.store.runs import OPEN, RETRIABLE, FireRow, cancel, give_up_retries, insert_runs

log = logging.getLogger(__name__)

_TRIGGER_CACHE_SIZE = 50_000


@dataclasses.dataclass(frozen=True)
class JobExtra:
    """What qcluster keeps beside APScheduler's fields, for the fire transaction."""

    version: int
    args_json: str
    kwargs_json: str
    recover: bool
    max_attempts: int | None = None
    policy: Policy = NONE
    runs_made: int = 0
    grace: int | None = None  # its own misfire_grace_seconds (None: the scheduler's)


class StoredJob(Job):  # type: ignore[misc]
    """An APScheduler job loaded from ``qc_jobs``, with its row version."""

    __slots__ = ("qc",)
    qc: JobExtra


def ts(dt: datetime | None) -> float | None:
    return None if dt is None else dt.timestamp()


def from_ts(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


class SqlJobStore(BaseJobStore):  # type: ignore[misc]
    """APScheduler job store on the ``qc_jobs`` table, fenced on ``epoch_of()``."""

    def __init__(
        self,
        db: Database,
        epoch_of: Callable[[], int],
        *,
        misfire_grace_seconds: int = 30,
        coalesce: bool = True,
        batch_size: int = 1000,
        min_interval_seconds: float = DEFAULT_MIN_INTERVAL,
    ) -> None:
        super().__init__()
        self.min_interval_seconds = min_interval_seconds
        self.db = db
        self.epoch_of = epoch_of
        self.misfire_grace_seconds = misfire_grace_seconds
        self.coalesce = coalesce
        self.batch_size = batch_size
        # Keyed by the spec's text: a trigger holds no per-job state, so jobs with the same
        # spec share one, and a job removed and added again can never get a stale one.
        self._triggers: OrderedDict[str, BaseTrigger] = OrderedDict()
        self._triggers_lock = threading.Lock()
        self._calendars: dict[str, Calendar] = {}
        self._calendar_versions: dict[str, int] = {}

    # -- reads -------------------------------------------------------------------------

    def lookup_job(self, job_id: str) -> StoredJob | None:
        j = schema.jobs
        with self.db.read() as conn:
            row = conn.execute(sa.select(j).where(j.c.id == job_id)).one_or_none()
        return None if row is None else self._load(row)

    def get_due_jobs(self, now: datetime) -> list[StoredJob]:
        j = schema.jobs
        query = (
            sa.select(j)
            .where(j.c.next_run_time <= now.timestamp(), j.c.broken.is_(None))
            .order_by(j.c.next_run_time)
            .limit(self.batch_size)
        )
        with self.db.read() as conn:
            rows = conn.execute(query).all()
        return self._load_many(rows)

    def open_runs(self, job_ids: Sequence[str]) -> dict[str, list[tuple[int, str]]]:
        """The runs of ``job_ids`` that are not over, (run id, status) by job: open ones
        (``scheduled``, ``dispatched``, ``running``, ``buffered``) and failed or timed-out
        ones with a retry to come. What an overlap policy asks: the runs table, whose
        ``running`` rows of dead workers recovery turns ``lost``, not a flag a crash can
        leave set."""
        if not job_ids:
            return {}
        r = schema.runs
        found: dict[str, list[tuple[int, str]]] = {}
        with self.db.read() as conn:
            for start in range(0, len(job_ids), 500):
                rows = conn.execute(
                    sa.select(r.c.job_id, r.c.id, r.c.status)
                    .where(r.c.job_id.in_(job_ids[start : start + 500]),
                           sa.or_(r.c.status.in_(OPEN),
                                  sa.and_(r.c.status.in_(RETRIABLE), r.c.retries_left > 0)))
                    .order_by(r.c.scheduled_at))
                for row in rows:
                    found.setdefault(row.job_id, []).append((int(row.id), str(row.status)))
        return found

    def calendars(self) -> dict[str, Calendar]:
        """Every exclusion calendar, read again only when one changed (a version check,
        one small query, per call)."""
        with self.db.read() as conn:
            seen = calendars.versions(conn)
            if seen != self._calendar_versions:
                self._calendars = calendars.load_calendars(conn)
                self._calendar_versions = {c.name: c.version for c in self._calendars.values()}
        return self._calendars

    def get_next_run_time(self) -> datetime | None:
        j = schema.jobs
        with self.db.read() as conn:
            value = conn.execute(
                sa.select(sa.func.min(j.c.next_run_time)).where(j.c.broken.is_(None))
            ).scalar()
        return from_ts(value)

    def get_all_jobs(self) -> list[StoredJob]:
        j = schema.jobs
        with self.db.read() as conn:
            rows = conn.execute(
                sa.select(j).order_by(j.c.next_run_time.is_(None), j.c.next_run_time, j.c.id)
            ).all()
        return self._load_many(rows)

    # -- APScheduler's single-job writes, fenced --------------------------------------------

    def add_job(self, job: Job) -> None:
        """Refused, nothing written: jobs are added through qcluster (the CLI, the Client or
        the control API), which validates them, never through APScheduler's ``add_job``."""
        raise InputError(
            "jobs are added through qcluster (CLI, Client or control API), not APScheduler's "
            f"add_job (job {job.id!r})"
        )

    def update_job(self, job: Job) -> None:
        with self.db.fenced(self.epoch_of()) as conn:
            done = catalog.set_next_run_time(conn, job.id, ts(job.next_run_time))
        if not done:
            raise JobLookupError(job.id)

    def remove_job(self, job_id: str) -> None:
        with self.db.fenced(self.epoch_of()) as conn:
            if not catalog.delete_job(conn, job_id):
                raise JobLookupError(job_id)

    def remove_all_jobs(self) -> None:
        with self.db.fenced(self.epoch_of()) as conn:
            catalog.delete_all_jobs(conn)

    # -- the batch: run rows and job advances in one fenced transaction --------------------

    def commit_fires(
        self, epoch: int, leader: str, fires: Sequence[FireRow], advances: Sequence[Advance],
        *, now: float | None = None, cancels: Sequence[tuple[int, str]] = (),
    ) -> list[RunRecord]:
        """Record ``fires``, cancel the runs of ``cancels`` (run id, reason: overlap
        ``cancel-other``; one that has finished meanwhile is left as it is) and apply
        ``advances`` atomically; return the new runs to send. ``now`` is the rows'
        ``created_at`` (:func:`qcluster.store.runs.insert_runs`).

        A fire time already recorded (by this leader or an earlier one) inserts nothing and
        is not returned. An advance applies only if the job's row version is unchanged, so
        a concurrent edit of the job wins; its fire times stay unique by the run key. A
        fire ahead of its time (after ``now``: ``fire_ahead_seconds``) of a job changed
        since the pass read it is not recorded: the change (a pause, an update) applies to
        it, as it would have withdrawn it had it committed first (``store/cancels``).
        """
        with self.db.fenced(epoch) as conn:
            fires = self._current(conn, fires, advances, now)
            for run_id, reason in cancels:
                try:
                    cancel(conn, run_id, now=time.time() if now is None else now, reason=reason)
                except InputError:  # it has finished: no retry of it either
                    give_up_retries(conn, run_id, None, reason)
            inserted = insert_runs(conn, fires, epoch, leader, now=now)
            catalog.apply_advances(conn, advances)
        return inserted

    @staticmethod
    def _current(conn: Connection, fires: Sequence[FireRow], advances: Sequence[Advance],
                 now: float | None) -> Sequence[FireRow]:
        if now is None:
            return fires
        versions = {a.job_id: a.version for a in advances}
        ahead = {f.job_id: versions[f.job_id] for f in fires
                 if f.scheduled_at > now and f.job_id in versions}
        if not ahead:
            return fires
        changed = catalog.changed_jobs(conn, ahead)
        return [f for f in fires if f.scheduled_at <= now or f.job_id not in changed]

    # -- loading ------------------------------------------------------------------------

    def _load_many(self, rows: Iterable[Row[Any]]) -> list[StoredJob]:
        jobs: list[StoredJob] = []
        broken: list[tuple[str, str]] = []
        for row in rows:
            try:
                jobs.append(self._load(row))
            except QClusterError as e:
                broken.append((row.id, str(e)))
        if broken:
            self.set_aside(broken)
        return jobs

    def _load(self, row: Row[Any]) -> StoredJob:
        trigger = self._trigger(row.id, row.trigger)
        try:
            args = json.loads(row.args)
            kwargs = json.loads(row.kwargs)
        except ValueError as e:
            raise QClusterError(f"job {row.id!r} has unreadable arguments: {e}") from e
        job = StoredJob.__new__(StoredJob)
        job._scheduler = self._scheduler
        job._jobstore_alias = self._alias
        job.id = row.id
        job.name = row.id
        # The leader never imports job code: func stays a reference, resolved on workers.
        job.func_ref = row.func
        job.func = row.func
        job.trigger = trigger
        job.executor = "default"
        job.args = tuple(args)
        job.kwargs = kwargs
        job.misfire_grace_time = row.misfire_grace_seconds or self.misfire_grace_seconds
        job.coalesce = self.coalesce if row.coalesce is None else row.coalesce
        job.max_instances = 1
        job.next_run_time = from_ts(row.next_run_time)
        try:
            policy = from_stored(row.policy)
        except InputError as e:
            raise QClusterError(f"job {row.id!r} has an unreadable policy: {e}") from e
        job.qc = JobExtra(row.version, row.args, row.kwargs, bool(row.recover),
                          row.max_attempts, policy, int(row.runs_made),
                          row.misfire_grace_seconds)
        return job

    def _trigger(self, job_id: str, spec_text: str) -> BaseTrigger:
        key = spec_text
        with self._triggers_lock:
            trigger = self._triggers.get(key)
            if trigger is not None:
                self._triggers.move_to_end(key)
                return trigger
        try:
            spec = json.loads(spec_text)
            trigger = build_trigger(spec)
        except ValueError as e:
            raise QClusterError(f"job {job_id!r} has an unreadable trigger: {e}") from e
        too_fast = interval_problem(spec, self.min_interval_seconds)
        if too_fast:  # checked before caching: every job with this spec is set aside
            raise QClusterError(f"job {job_id!r} fires too often: {too_fast}")
        with self._triggers_lock:
            self._triggers[key] = trigger
            if len(self._triggers) > _TRIGGER_CACHE_SIZE:
                self._triggers.popitem(last=False)
        return trigger

    def set_aside(self, broken: list[tuple[str, str]]) -> None:
        """Stop firing these jobs (``broken`` says why; the rows are kept). Fenced."""
        for job_id, reason in broken:
            log.error("job %r is set aside (not deleted): %s", job_id, reason)
        with self.db.fenced(self.epoch_of()) as conn:
            catalog.set_broken(conn, broken)

