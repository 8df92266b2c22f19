"""The leader's APScheduler: a BackgroundScheduler whose pass is batched and fenced.

APScheduler 3.11's ``_process_jobs`` submits a run first and advances the job after, in
another transaction per job; a crash between the two fires twice or loses the run. It
also runs one more pass after ``shutdown()`` has closed the executors (upstream #285,
#985), which advances due jobs without running them, and one exception from the store
kills its thread while ``state`` still reads RUNNING. This subclass replaces the pass:

* due jobs are read in batches; for each batch, the run rows and the job advances commit
  in ONE transaction fenced on the leader's epoch (:meth:`FireExecutor.fire`), and only
  then are the runs handed to the dispatcher;
* a stopped (or stepping-down) scheduler's pass does nothing;
* every error is caught and logged; the pass records when it last finished, so the node
  can notice a loop that stopped turning;
* the loop sleeps at most ``poll_seconds``, so jobs written by another process (the CLI
  with no leader alive) are seen within that bound.

Fire times are accounted for (docs/DESIGN.md invariant 6): each fire time between the job's
stored next run time and now becomes a run row, ``scheduled`` if it is to run, ``missed`` if
it is older than the job's misfire grace time or was coalesced away.

"Now" is the ``now`` the scheduler is given, never the host's wall clock: the leader gives
its :class:`~qcluster.leader.clock.LeaderClock`, the database's time (docs/DESIGN.md
invariant 8). What is due, lateness, the misfire grace, coalescing, the rows'
``created_at`` and the sleep until the next fire are all judged on it; APScheduler's own
waits run on the monotonic clock (``threading.Event.wait``)."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from apscheduler.executors.base import BaseExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import STATE_RUNNING

from backends.base import MemberInfo
from qcluster import metrics
from qcluster.definitions.policy import Defaults, broadcast_slot, jitter_of, run_fields
from qcluster.errors import DatabaseUnavailable, Fenced
from qcluster.store import calendars as calendars_mod
from qcluster.store.calendars import Calendar
from qcluster.store.catalog import Advance
from qcluster.store.jobstore import SqlJobStore, StoredJob, ts
from qcluster.store.records import RunRecord
from qcluster.store.runs import FireRow, RunStatus

log = logging.getLogger(__name__)

MAX_CATCH_UP = 10_000  # fire times computed per job per pass; the rest wait for the next


class FireExecutor(BaseExecutor):  # type: ignore[misc]
    """The qcluster executor: records runs in the shared database, then dispatches them."""

    def __init__(
        self,
        store: SqlJobStore,
        epoch: int,
        leader: str,
        send: Callable[[list[RunRecord]], None],
        *,
        retention_seconds: float,
        defaults: Defaults | None = None,
        workers: Callable[[], list[MemberInfo]] | None = None,
    ) -> None:
        """``workers``: the live members, read when a broadcast job fires."""
        super().__init__()
        self.workers = workers
        self.store = store
        self.epoch = epoch
        self.leader = leader
        self.send = send
        self.retention_seconds = retention_seconds
        self.defaults = Defaults() if defaults is None else defaults
        #: From the last :meth:`fire`: how many of its jobs with an overlap policy wait
        #: for a fire time still ahead, and the earliest of those times.
        self.deferred = 0
        self.deferred_until: datetime | None = None

    def _live_workers(self) -> list[MemberInfo]:
        """The live workers a broadcast job's fire time runs on (none when unknown)."""
        if self.workers is None:
            return []
        try:
            return [w for w in self.workers() if w.takes_runs]
        except Exception as e:  # membership reads go through a backend
            log.warning("cannot list the workers for broadcast jobs: %s", e)
            raise DatabaseUnavailable(f"cannot list the workers: {e}") from None

    def _do_submit_job(self, job: StoredJob, run_times: list[datetime]) -> None:
        # APScheduler's own path (one job): route it through the same fenced batch.
        self.fire([job], run_times[-1])

    def fire(self, jobs: list[StoredJob], now: datetime, until: datetime | None = None) -> int:
        """Record and dispatch the fire times of ``jobs`` up to ``until`` (default ``now``;
        later with a fire-ahead window: the worker waits for each one's time); return the
        number of runs sent. Lateness and misfires are judged at ``now`` (the leader's
        clock, the database's time), which is also the rows' ``created_at``."""
        fires: list[FireRow] = []
        reasons: list[str] = []
        advances: list[Advance] = []
        cancels: list[tuple[int, str]] = []
        unplannable: list[tuple[str, str]] = []
        watched = [j.id for j in jobs if (j.qc.policy.overlap or "allow") != "allow"]
        open_runs = self.store.open_runs(watched)
        # An overlap policy is judged at the fire time, never ahead of it: whether the
        # previous run is still open is known only then. Such a job fires up to ``now``
        # only; the earliest it defers is when the loop must look again.
        judged_now = set(watched)
        self.deferred = 0
        self.deferred_until = None
        if until is not None and until > now:
            later = [j.next_run_time for j in jobs if j.id in judged_now
                     and j.next_run_time is not None and j.next_run_time > now]
            self.deferred = len(later)
            self.deferred_until = min(later, default=None)
        calendars = (self.store.calendars() if any(j.qc.policy.exclude for j in jobs)
                     else {})
        live = self._live_workers() if any(j.qc.policy.broadcast for j in jobs) else []
        for job in jobs:
            planned = len(fires), len(advances), len(cancels)
            slots = None
            if job.qc.policy.broadcast:
                tags = set(job.qc.policy.tags)
                slots = sorted(broadcast_slot(w.node_id) for w in live if tags <= set(w.tags))
            try:
                plan = _Plan(job, now, now if job.id in judged_now else until or now,
                             self.retention_seconds, self.defaults, slots)
                plan.make(open_runs.get(job.id, []), calendars)
                fires += plan.fires
                reasons += plan.reasons
                cancels += plan.cancels
                if plan.advance is not None:
                    advances.append(plan.advance)
            except (ArithmeticError, ValueError) as e:
                # A stored value no edge would accept today (a grace of 10**15 s, say, or
                # a cron with no fire time within the bounded search: triggers.
                # SearchExhausted) must not stop the other jobs: set it aside, say why.
                del fires[planned[0]:], reasons[planned[0]:], advances[planned[1]:]
                del cancels[planned[2]:]
                unplannable.append((job.id, f"cannot plan its fire times: {e}"))
        if unplannable:
            self.store.set_aside(unplannable)
        runs = self.store.commit_fires(self.epoch, self.leader, fires, advances,
                                       now=now.timestamp(), cancels=cancels)
        for (status, reason), n in Counter(
                zip((str(f.status) for f in fires), reasons, strict=True)).items():
            metrics.FIRES.labels(status=status, reason=reason).inc(n)
        if runs:
            self.send(runs)
        return len(runs)


class _Plan:
    """What one job's due fire times become (docs/DESIGN.md, "Job policies"): each a run
    row, ``scheduled`` (or ``buffered`` behind an open run), ``missed`` or ``skipped``
    with the reason, never an absence; and the job's advance."""

    def __init__(self, job: StoredJob, now: datetime, until: datetime, retention: float,
                 defaults: Defaults, slots: list[str] | None = None) -> None:
        """``slots``: the runs of each fire time (``definitions/policy.Policy.slots``; a
        broadcast job's, one per live worker with its tags: possibly none)."""
        self.job, self.now, self.until, self.policy = job, now, until, job.qc.policy
        self.slots = self.policy.slots() if slots is None else slots
        self.horizon = now - timedelta(seconds=retention)
        self.defaults = Defaults() if defaults is None else defaults
        self.fields = run_fields(self.policy, self.defaults)  # what each of its rows keeps
        self.fires: list[FireRow] = []
        self.reasons: list[str] = []  # why each of fires is recorded so (metrics.FIRE_KINDS)
        self.cancels: list[tuple[int, str]] = []
        self.advance: Advance | None = None

    def _times(self) -> tuple[list[datetime], datetime | None]:
        """The fire times up to ``until`` within the job's start/end bounds, and the next."""
        job, policy = self.job, self.policy
        start, end = policy.start_ts, policy.end_ts
        times: list[datetime] = []
        nxt = job.next_run_time
        if nxt is not None and start is not None and nxt.timestamp() < start:
            nxt = job.trigger.get_next_fire_time(None, datetime.fromtimestamp(start, UTC))
        while nxt is not None and nxt <= self.until and len(times) < MAX_CATCH_UP:
            if end is not None and nxt.timestamp() > end:
                return times, None
            times.append(nxt)
            nxt = job.trigger.get_next_fire_time(nxt, max(nxt, self.now))
        if nxt is not None and end is not None and nxt.timestamp() > end:
            nxt = None
        return times, nxt

    def _add(self, t: datetime, status: RunStatus, reason: str,
             error: str | None = None) -> None:
        """Record fire time ``t``: a run to be run is one row per slot (a sharded or
        broadcast job's); one that is not (missed, skipped) is one row."""
        runs = status in (RunStatus.SCHEDULED, RunStatus.BUFFERED)
        slots = self.slots if runs else [""]
        if not slots:  # a broadcast job with no live worker that has its tags
            slots, status, reason = [""], RunStatus.MISSED, "no_worker"
            error = (f"broadcast: no live worker has its tags {', '.join(self.policy.tags)}"
                     if self.policy.tags else "broadcast: no live worker")
        for slot in slots:
            self.fires.append(self._row(t, status, error, slot))
            self.reasons.append(reason)

    def _row(self, t: datetime, status: RunStatus, error: str | None = None,
             slot: str = "") -> FireRow:
        job, qc = self.job, self.job.qc
        due = None
        if status in (RunStatus.SCHEDULED, RunStatus.BUFFERED):
            shift = jitter_of(job.id, t.timestamp(), self.policy.jitter)
            due = t.timestamp() + shift if shift else None
        fields = self.fields
        if slot.startswith("@"):  # a broadcast job's run: on that worker only
            fields = {**fields, "routing": self.policy.routing_text(worker=slot[1:])}
        return FireRow(job.id, job.func_ref, qc.args_json, qc.kwargs_json, t.timestamp(),
                       status, qc.recover, error, qc.max_attempts, due_at=due,
                       grace=qc.grace, slot=slot, **fields)

    def make(self, open_runs: list[tuple[int, str]],
             calendars: dict[str, Calendar]) -> None:
        job, policy, now = self.job, self.policy, self.now
        times, nxt = self._times()
        if not times:
            if nxt != job.next_run_time:  # moved to its start, or past its end
                self.advance = Advance(job.id, job.qc.version, ts(nxt), keep=True)
            return
        grace = timedelta(seconds=job.misfire_grace_time)
        catch_up = max(grace, timedelta(seconds=policy.catch_up or 0))
        misfire = policy.misfire or ("run-once" if job.coalesce else "run-all")
        zone = getattr(job.trigger, "timezone", UTC)
        to_run: list[datetime] = []
        for t in times:
            excluded = (calendars_mod.exclusion(calendars, policy.exclude,
                                                t.astimezone(zone).date())
                        if policy.exclude else None)
            late = now - t
            if excluded is not None:
                self._add(t, RunStatus.SKIPPED, "excluded", excluded)
            elif late > catch_up:
                if t >= self.horizon:
                    self._add(t, RunStatus.MISSED, "late", _missed(late, job, catch_up))
            elif late > grace and misfire == "skip":
                self._add(t, RunStatus.MISSED, "misfire_skip",
                          f"{_missed(late, job, None)}; misfire policy skip: waits for the next")
            else:
                to_run.append(t)
        if misfire == "run-once":  # only fire times that have passed coalesce
            past = [t for t in to_run if t <= now]
            for t in past[:-1]:
                self._add(t, RunStatus.MISSED, "coalesced", "coalesced into a later run")
            to_run = past[-1:] + [t for t in to_run if t > now]
        left = None if policy.max_runs is None else max(0, policy.max_runs - job.qc.runs_made)
        made = self._overlap(to_run, open_runs, left)
        ended = left is not None and made >= left
        self.advance = Advance(job.id, job.qc.version, None if ended else ts(nxt), runs=made,
                               keep=ended or (nxt is None and (policy.end is not None)))

    def _overlap(self, to_run: list[datetime], open_runs: list[tuple[int, str]],
                 left: int | None = None) -> int:
        """Record ``to_run`` under the job's overlap policy; how many will run. With
        ``left`` (what ``max_runs`` leaves), no fire time is recorded once that many will
        run: a fire time the policy skips does not use one up."""
        overlap = self.policy.overlap or "allow"
        busy = [run_id for run_id, _ in open_runs]
        buffered = any(status == RunStatus.BUFFERED for _, status in open_runs)
        made = 0
        if overlap == "cancel-other" and len(to_run) > 1:
            for t in to_run[:-1]:
                self._add(t, RunStatus.SKIPPED, "overlap_cancel_other",
                          "overlap cancel-other: a later fire time replaced it in the same pass")
            to_run = to_run[-1:]
        for t in to_run:
            if left is not None and made >= left:
                break  # the job has ended: later fire times are past its last run
            status, reason, why = RunStatus.SCHEDULED, "on_time", None
            if overlap == "skip" and busy:
                status, reason, why = RunStatus.SKIPPED, "overlap_skip", (
                    f"overlap skip: run {busy[0]} of this job is still open")
            elif overlap == "buffer-one" and busy:
                if buffered:
                    status, reason, why = RunStatus.SKIPPED, "overlap_buffer_one", (
                        "overlap buffer-one: a run is already waiting for the open one")
                else:
                    status, reason, buffered = RunStatus.BUFFERED, "buffered", True
            elif overlap == "buffer-all" and busy:
                status, reason = RunStatus.BUFFERED, "buffered"
            elif overlap == "cancel-other" and busy:
                # sent once the cancelled runs have ended
                status, reason = RunStatus.BUFFERED, "overlap_cancel_other"
                self.cancels += [(run_id, f"overlap cancel-other: replaced by the fire at "
                                          f"{t.isoformat()}") for run_id in busy]
                busy = []
            self._add(t, status, reason, why)
            if status != RunStatus.SKIPPED:
                made += 1
                busy.append(0)  # a run of this pass: open from now on
        return made


def _missed(late: timedelta, job: StoredJob, catch_up: timedelta | None) -> str:
    window = "" if catch_up is None or catch_up.total_seconds() == job.misfire_grace_time \
        else f", catch-up {catch_up.total_seconds():g}s"
    return (f"missed by {late.total_seconds():.3f}s (grace {job.misfire_grace_time}s"
            f"{window})")


class LeaderScheduler(BackgroundScheduler):  # type: ignore[misc]
    """APScheduler's loop on the shared store, with a batched, fenced, never-dying pass."""

    def __init__(
        self,
        store: SqlJobStore,
        executor: FireExecutor,
        *,
        poll_seconds: float,
        on_fenced: Callable[[str], None],
        fire_ahead_seconds: float = 0.0,
        now: Callable[[], float] = time.time,
    ) -> None:
        """``now`` is the clock every pass judges on (seconds since the Unix epoch): the
        leader's :meth:`LeaderClock.now <qcluster.leader.clock.LeaderClock.now>`."""
        super().__init__(timezone=UTC, daemon=True)
        self.add_jobstore(store, "default")
        self.add_executor(executor, "default")
        self.store = store
        self.executor = executor
        self.poll_seconds = poll_seconds
        self.ahead = timedelta(seconds=fire_ahead_seconds)
        self.on_fenced = on_fenced
        self.now = now
        self.enabled = threading.Event()
        self.enabled.set()
        self.last_pass = time.monotonic()
        self.fired = 0

    def stop_firing(self) -> None:
        """Stop recording fires at once, without waiting for the loop thread. Safe before
        ``start()`` and after ``shutdown()``."""
        self.enabled.clear()
        self.wakeup()

    def wakeup(self) -> None:
        """Run a pass now. Safe before ``start()`` (APScheduler's is not: its event exists
        only once started, and a job change through the control API while a term starts
        raised AttributeError); the first pass comes at start anyway."""
        if getattr(self, "_event", None) is not None:
            super().wakeup()

    @property
    def turning(self) -> bool:
        """Whether the loop thread is alive (False before ``start()`` and once it died)."""
        thread = getattr(self, "_thread", None)
        return thread is not None and thread.is_alive()

    def _process_jobs(self) -> float | None:
        # STOPPED or PAUSED: do nothing at all (APScheduler would still advance due jobs
        # after shutdown, losing their runs).
        if self.state != STATE_RUNNING or not self.enabled.is_set():
            return None if self.state != STATE_RUNNING else self.poll_seconds
        try:
            with metrics.PASS_SECONDS.time():
                wait = self._pass()
        except Fenced as e:
            self.enabled.clear()
            log.warning("fire refused, this node no longer holds the epoch: %s", e)
            try:  # a callback that raises must not end this thread (it would stop firing)
                self.on_fenced(str(e))
            except Exception:
                log.exception("error while reporting a fenced pass")
            return self.poll_seconds
        except DatabaseUnavailable as e:
            log.warning("database unavailable during the scheduler pass: %s", e)
            wait = min(0.5, self.poll_seconds)
        except Exception:
            log.exception("scheduler pass failed; retrying")
            wait = self.poll_seconds
        self.last_pass = time.monotonic()
        return wait

    def _pass(self) -> float:
        deferred: datetime | None = None
        while self.enabled.is_set():
            now = datetime.fromtimestamp(self.now(), UTC)
            due = self.store.get_due_jobs(now + self.ahead)
            if not due:
                break
            self.fired += self.executor.fire(due, now, now + self.ahead)
            self.last_pass = time.monotonic()
            waiting = self.executor.deferred_until
            if waiting is not None:
                deferred = waiting if deferred is None else min(deferred, waiting)
            # a batch of only overlap jobs waiting for their time would come back as is
            if len(due) < self.store.batch_size or self.executor.deferred == len(due):
                break
        nxt = self.store.get_next_run_time()
        if nxt is None:
            return self.poll_seconds
        now = datetime.fromtimestamp(self.now(), UTC)
        delay = (nxt - self.ahead - now).total_seconds()
        if deferred is not None and delay <= 0:
            # The earliest job waits for its own fire time (an overlap policy): look again
            # then, or within half the window, for the jobs entering it meanwhile.
            delay = min((deferred - now).total_seconds(), self.ahead.total_seconds() / 2)
        return max(0.0, min(delay, self.poll_seconds))
