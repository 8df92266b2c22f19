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
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from apscheduler.executors.base import BaseExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import STATE_RUNNING

from qcluster.errors import DatabaseUnavailable, Fenced
from qcluster.store.catalog import Advance
from qcluster.store.jobstore import SqlJobStore, StoredJob
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
    ) -> None:
        super().__init__()
        self.store = store
        self.epoch = epoch
        self.leader = leader
        self.send = send
        self.retention_seconds = retention_seconds

    def _do_submit_job(self, job: StoredJob, run_times: list[datetime]) -> None:
        # APScheduler's own path (one job): route it through the same fenced batch.
        self.fire([job], run_times[-1])

    def fire(self, jobs: list[StoredJob], now: datetime, until: datetime | None = None) -> int:
        """Record and dispatch the fire times of ``jobs`` up to ``until`` (default ``now``;
        later with a fire-ahead window: the worker waits for each one's time); return the
        number of runs sent. Lateness and misfires are judged at ``now`` (the leader's
        clock, the database's time), which is also the rows' ``created_at``."""
        fires: list[FireRow] = []
        advances: list[Advance] = []
        unplannable: list[tuple[str, str]] = []
        for job in jobs:
            planned = len(fires), len(advances)
            try:
                self._plan(job, now, fires, advances, until or now)
            except (ArithmeticError, ValueError) as e:
                # A stored value no edge would accept today (a grace of 10**15 s, say, or
                # a cron with no fire time within the bounded search: triggers.
                # SearchExhausted) must not stop the other jobs: set it aside, say why.
                del fires[planned[0]:], advances[planned[1]:]
                unplannable.append((job.id, f"cannot plan its fire times: {e}"))
        if unplannable:
            self.store.set_aside(unplannable)
        runs = self.store.commit_fires(self.epoch, self.leader, fires, advances,
                                       now=now.timestamp())
        if runs:
            self.send(runs)
        return len(runs)

    def _plan(
        self, job: StoredJob, now: datetime, fires: list[FireRow], advances: list[Advance],
        until: datetime,
    ) -> None:
        run_times: list[datetime] = []
        nxt = job.next_run_time
        while nxt is not None and nxt <= until and len(run_times) < MAX_CATCH_UP:
            run_times.append(nxt)
            nxt = job.trigger.get_next_fire_time(nxt, max(nxt, now))
        if not run_times:
            return
        grace = timedelta(seconds=job.misfire_grace_time)
        horizon = now - timedelta(seconds=self.retention_seconds)
        ahead = [t for t in run_times if t > now]  # inside the fire-ahead window
        due = [t for t in run_times if t <= now and now - t <= grace]
        late = [t for t in run_times if now - t > grace]
        if job.coalesce and len(due) > 1:  # only fire times that have passed coalesce
            coalesced, due = due[:-1], due[-1:]
        else:
            coalesced = []
        due += ahead
        qc = job.qc

        def row(t: datetime, status: RunStatus, error: str | None = None) -> FireRow:
            return FireRow(job.id, job.func_ref, qc.args_json, qc.kwargs_json, t.timestamp(),
                           status, qc.recover, error, qc.max_attempts)

        for t in late:
            if t >= horizon:
                late_by = (now - t).total_seconds()
                fires.append(row(t, RunStatus.MISSED, f"missed by {late_by:.3f}s "
                                                       f"(grace {job.misfire_grace_time}s)"))
        for t in coalesced:
            fires.append(row(t, RunStatus.MISSED, "coalesced into a later run"))
        for t in due:
            fires.append(row(t, RunStatus.SCHEDULED))
        advances.append(Advance(job.id, qc.version, None if nxt is None else nxt.timestamp()))


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
        while self.enabled.is_set():
            now = datetime.fromtimestamp(self.now(), UTC)
            due = self.store.get_due_jobs(now + self.ahead)
            if not due:
                break
            self.fired += self.executor.fire(due, now, now + self.ahead)
            self.last_pass = time.monotonic()
            if len(due) < self.store.batch_size:
                break
        nxt = self.store.get_next_run_time()
        if nxt is None:
            return self.poll_seconds
        delay = (nxt - self.ahead - datetime.fromtimestamp(self.now(), UTC)).total_seconds()
        return max(0.0, min(delay, self.poll_seconds))
