"""The leader's parts, started on winning and torn down on stepping down.

Order on winning: take a new epoch (fenced against older leases), publish who leads,
start the dispatcher, send the runs that an earlier leader recorded but never sent, then
start APScheduler on the shared store. Order on losing: ``halt()`` first (no fire is
recorded and no run is sent after it), then the rest, waiting on a database that may not
answer only for the bounded join of the maintenance thread.

Each *term* (one win, from :meth:`LeaderRole.start` to :meth:`LeaderRole.stop`) has its own
stop event and its own ``qc-maintenance`` thread, which reads only that term's epoch and
event. A term's thread is joined for at most ``MAINTENANCE_JOIN_SECONDS`` when it ends,
and a new term does not start while the previous term's thread is alive: two maintenance
loops never run side by side, however quickly the node is re-elected. Once a term is
halted, what its parts still report (a fenced write, a stale epoch, a database problem)
no longer revokes leadership: the next term is not stepped down by the previous one.

Generation check (docs/DESIGN.md invariant 5): every callback a term's parts are given
(``on_fenced``, ``on_stale``, the maintenance loop's revokes) is bound to that term and
acts only while it is the current, unhalted term, checked under the role's lock, so that a
new term cannot be installed between the check and the revoke. No exception in a callback
leaves a leader that holds the lease without firing: the maintenance loop's health check
(:meth:`LeaderRole.healthy`) sees a scheduler loop that is not turning, or that stopped
firing while its term was not halted, and gives the lease up; an error in the maintenance
pass itself gives it up too.

Clock (docs/DESIGN.md invariant 8): the role's :class:`~qcluster.leader.clock.LeaderClock`
(the database's time, carried on the monotonic clock) is sampled at every term's start,
before the epoch is taken, and again every few seconds by the maintenance thread. The
scheduler's passes, the retention horizon and the published ``since`` are on it;
recovery reads the database's time in its own fenced transaction. None is on this
host's wall clock. A term whose clock has never been sampled does not start: its first
sample failed, so the database is out of reach anyway.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable

from apscheduler.schedulers import SchedulerNotRunningError

from backends.base import CoordinationBackend, LeaderInfo, Lease, MemberInfo
from qcluster import metrics
from qcluster.definitions.policy import defaults_from
from qcluster.errors import DatabaseUnavailable, Fenced, QClusterError
from qcluster.leader import chains
from qcluster.leader.clock import LeaderClock
from qcluster.leader.dispatch import Dispatcher
from qcluster.leader.liveness import SessionJudge
from qcluster.leader.recovery import prune_runs, recover_runs
from qcluster.leader.routing import make_router
from qcluster.leader.scheduler import FireExecutor, LeaderScheduler
from qcluster.settings import Settings
from qcluster.store import groups
from qcluster.store.cluster import take_epoch
from qcluster.store.db import Database
from qcluster.store.jobstore import SqlJobStore
from qcluster.store.records import RunRecord
from qcluster.store.reports import FENCE_MARGIN, lease_seconds

log = logging.getLogger(__name__)

RECOVERY_INTERVAL = 1.0
#: How often, between two recovery passes, the leader looks for ended runs whose children
#: are to be decided (leader/chains.py): a child starts this soon after its parent ends.
CHAIN_INTERVAL = 0.2
#: How far back each of those looks past the previous one (a late commit, a worker's clock
#: a little behind): what it misses, the next recovery pass reads anyway.
CHAIN_MARGIN = 2.0
#: How often a term's ``qc-db-watch`` thread compares the time since the database last
#: answered with ``database_timeout_seconds``. Its own thread: a recovery pass blocked in
#: a connect or statement timeout must not hold the step-down back.
WATCH_INTERVAL = 0.5
PRUNE_INTERVAL = 3600.0
#: How long ``stop()``, and a ``start()`` that finds the previous term's maintenance thread
#: still alive, wait for it. It is halted first, so it only finishes the pass under way.
MAINTENANCE_JOIN_SECONDS = 2.0


@dataclasses.dataclass(eq=False)
class _Term:
    """One term of leadership: its epoch, its own stop event, its maintenance thread."""

    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    epoch: int | None = None  # set once take_epoch has answered
    thread: threading.Thread | None = None
    scheduler: LeaderScheduler | None = None
    db_ok: float = dataclasses.field(default_factory=time.monotonic)
    info: LeaderInfo | None = None  # what it published
    judge: SessionJudge | None = None  # whether a silent worker has stopped (recovery)
    started: bool = False  # its scheduler was started (the health check waits for it)
    chain_after: tuple[float, int] | None = None  # where the last chain read stopped
    chain_since: float | None = None  # the database's time of the last check between passes
    ended: bool = False  # stop() has torn it down (and joined its thread once)

    def join(self) -> bool:
        """Wait (bounded) for the maintenance thread; whether it has ended."""
        thread = self.thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(MAINTENANCE_JOIN_SECONDS)
        return not thread.is_alive()


class LeaderRole:
    """Everything that runs only while this node leads."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        *,
        members: Callable[[], list[MemberInfo]],
        workers: Callable[[], list[MemberInfo]] | None = None,
        node_id: str,
        control_uri: str,
        secret: str,
        revoke: Callable[[str], None],
        drive: Callable[[int, list[MemberInfo]], None] | None = None,
        lease_deadline: Callable[[], float] | None = None,
        clock: LeaderClock | None = None,
    ) -> None:
        """``lease_deadline`` gives the held lease's local deadline (``time.monotonic()``;
        the leadership loop's): past it, this leader asks no worker anything. ``clock`` is
        the one this role judges time on; by default the database's (:class:`LeaderClock`
        on ``db``), kept across terms."""
        self.settings = settings
        self.db = db
        self.router = make_router(settings.dispatch.strategy)  # ConfigError: at start
        self.defaults = defaults_from(settings.scheduler)  # what a job's run leaves out
        self.clock = LeaderClock(db) if clock is None else clock
        self.members = members
        # The members a run may go to: those the shared database lists (a worker that
        # cannot reach it cannot claim); all members when the caller has no other list.
        self.workers = workers or members
        self.drive = drive
        self.lease_deadline = lease_deadline
        self.node_id = node_id
        self.control_uri = control_uri
        self.secret = secret
        self.revoke = revoke
        self.epoch: int | None = None
        self.scheduler: LeaderScheduler | None = None
        self.dispatcher: Dispatcher | None = None
        self._term: _Term | None = None  # the current term, or the last one
        # Reentrant: _revoke holds it across revoke(), which halts this role (halt()).
        self._lock = threading.RLock()

    @property
    def active(self) -> bool:
        with self._lock:
            term = self._term
        return self.epoch is not None and (term is None or not term.stop.is_set())

    def start(self, lease: Lease, backend: CoordinationBackend,
              valid_until: float | None = None) -> None:
        """Lead with ``lease``, taken on ``backend``: a new term. ``valid_until`` is the
        lease's local deadline (``time.monotonic()``): a lease that runs out while
        ``take_epoch`` waits for the cluster row takes no epoch.

        Raises :class:`QClusterError` (and starts nothing, takes no epoch) while the
        previous term's maintenance thread is still alive after a bounded wait: a new term
        never runs beside the previous one. The caller steps down and campaigns again."""
        s = self.settings
        # The new term is installed first: a halt() from here on stops this one (its steps
        # check), not only the previous one, which was halted when it ended.
        term = _Term()
        with self._lock:
            previous, self._term = self._term, term
        if previous is not None and not previous.join():
            with self._lock:  # the next start waits for that thread again
                if self._term is term:
                    self._term = previous
            raise QClusterError(
                "the previous term's maintenance pass has not ended after "
                f"{MAINTENANCE_JOIN_SECONDS:g}s (a database or backend call that hangs)"
            )
        self._check_started(term)
        # The clock first: no pass, recovery or published time of this term on a clock
        # that was never read. A failed sample keeps the last one (a short outage); with
        # none at all the database is out of reach, and take_epoch would fail too.
        if not self.clock.sync():
            raise DatabaseUnavailable("cannot lead: the database's time could not be read")
        epoch = take_epoch(self.db, node_id=self.node_id, uri=self.control_uri, lease=lease,
                           valid_until=valid_until)
        term.epoch = epoch
        term.db_ok = time.monotonic()
        self._check_started(term)
        term.info = LeaderInfo(self.node_id, self.control_uri, epoch, self.clock.now())
        backend.publish_leader(lease, term.info)
        log.info("leading the cluster at epoch %d", epoch)
        dispatcher = Dispatcher(
            epoch=epoch, secret=self.secret, timeout=s.rpc.timeout_seconds,
            strategy=self.router, batch_size=s.dispatch.batch_size,
            members=self.workers, on_stale=lambda reason: self._revoke(term, reason),
            groups=_Groups(self, term),
        )
        term.judge = SessionJudge(
            self.db, epoch=epoch, secret=self.secret, margin=FENCE_MARGIN,
            lease_seconds=lease_seconds(s.cluster.member_timeout_seconds),
            leading=self._lease_held,
        )
        store = SqlJobStore(
            self.db, lambda: epoch,
            misfire_grace_seconds=s.scheduler.misfire_grace_seconds,
            coalesce=s.scheduler.coalesce, batch_size=s.scheduler.batch_size,
            min_interval_seconds=s.scheduler.min_interval_seconds,
        )
        executor = FireExecutor(store, epoch, self.node_id, dispatcher.submit,
                                retention_seconds=s.runs.retention_seconds,
                                defaults=self.defaults, workers=self.workers)
        scheduler = LeaderScheduler(store, executor, poll_seconds=s.scheduler.poll_seconds,
                                    on_fenced=lambda reason: self._revoke(term, reason),
                                    fire_ahead_seconds=s.scheduler.fire_ahead_seconds,
                                    now=self.clock.now)
        term.scheduler = scheduler
        with self._lock:
            self._check_started(term)
            self.epoch, self.dispatcher, self.scheduler = epoch, dispatcher, scheduler
        dispatcher.start()
        # never joined: it only reads the term's clock and ends with its stop event
        threading.Thread(target=self._watch_database, args=(term,), name="qc-db-watch",
                         daemon=True).start()
        self._recover(term)
        term.thread = threading.Thread(target=self._maintain, args=(term,),
                                       name="qc-maintenance", daemon=True)
        term.thread.start()
        self._check_started(term)
        scheduler.start()
        term.started = True
        metrics.LEADER_CHANGES.inc()
        metrics.IS_LEADER.set(1)
        metrics.EPOCH.set(epoch)

    @staticmethod
    def _check_started(term: _Term) -> None:
        """A term halted while it was starting (its lease lost) starts nothing more: the
        caller steps down (and tears down what was started)."""
        if term.stop.is_set():
            raise QClusterError(f"leadership was lost while starting the term "
                                f"(epoch {term.epoch})")

    def republish(self, lease: Lease, backend: CoordinationBackend) -> None:
        """Publish this term's leader info under ``lease`` on ``backend`` (a lease the
        leadership loop reshaped: the new backend must show who leads, in every phase).
        Does nothing unless a term is leading."""
        with self._lock:
            term = self._term
        if term is None or term.stop.is_set() or term.info is None:
            return
        backend.publish_leader(lease, term.info)

    def _lease_held(self) -> bool:
        return self.lease_deadline is None or time.monotonic() < self.lease_deadline()

    def halt(self) -> None:
        """Stop firing and sending now, and end the term's maintenance loop after its pass
        under way. Non-blocking and idempotent."""
        with self._lock:
            term, scheduler, dispatcher = self._term, self.scheduler, self.dispatcher
        if term is not None:
            term.stop.set()
        metrics.IS_LEADER.set(0)
        metrics.EPOCH.set(0)
        metrics.LIVE_WORKERS.set(0)
        if scheduler is not None:
            scheduler.stop_firing()
        if dispatcher is not None:
            dispatcher.stop()

    def stop(self) -> None:
        """Tear down after :meth:`halt`. Waits on the database only for the term's
        maintenance thread to finish its pass, at most ``MAINTENANCE_JOIN_SECONDS``."""
        self.halt()
        with self._lock:
            term, scheduler = self._term, self.scheduler
            self.scheduler = self.dispatcher = None
            self.epoch = None
            join = term is not None and not term.ended
            if term is not None:
                term.ended = True
        if scheduler is not None:
            # shutdown() joins the loop thread, which may be inside a database call that
            # does not answer: do it on the side. Our pass does nothing once stopped.
            threading.Thread(target=_shutdown, args=(scheduler,), daemon=True).start()
        if join and term is not None and not term.join():
            log.warning("the maintenance pass of epoch %s has not ended after %gs; the next "
                        "term waits for it", term.epoch, MAINTENANCE_JOIN_SECONDS)

    def wakeup(self) -> None:
        with self._lock:
            scheduler = self.scheduler
        if scheduler is not None:
            scheduler.wakeup()

    def send(self, runs: list[RunRecord], *, bulk: bool = False) -> None:
        """Hand committed runs to the dispatcher; ``bulk`` (a backfill's): in its bulk
        lane, sent as workers have free slots, after every live run."""
        with self._lock:
            dispatcher = self.dispatcher
        if dispatcher is not None:
            dispatcher.submit(runs, bulk=bulk)

    def healthy(self) -> str | None:
        """Why this leader is not working, or None. The node steps down on a reason.

        Not working: the current term's scheduler thread is not alive (it died, or was
        never started), it stopped firing while the term was not halted (a callback that
        failed half way), or its loop has not turned for ``max(30, 10 * poll_seconds)``."""
        with self._lock:
            term = self._term
        scheduler = term.scheduler if term is not None else None
        if term is None or scheduler is None or term.stop.is_set() or not term.started:
            return None
        if not scheduler.turning:
            return "the scheduler loop has stopped"
        if not scheduler.enabled.is_set():
            return "the scheduler stopped firing while this node leads"
        stuck = time.monotonic() - scheduler.last_pass
        limit = max(30.0, 10 * self.settings.scheduler.poll_seconds)
        if stuck > limit:
            return f"the scheduler loop has not turned for {stuck:.0f}s"
        return None

    # -- maintenance ------------------------------------------------------------------------

    def _revoke(self, term: _Term, reason: str) -> None:
        """Give up leadership for ``term``'s sake; nothing unless it is the current term
        and not halted (what an ended term's parts still report must not step the next
        term down). Checked and done under the lock: no new term is installed between."""
        with self._lock:
            if term is not self._term or term.stop.is_set():
                log.info("ignoring a revoke from the term of epoch %s: %s", term.epoch, reason)
                return
            self.revoke(reason)

    def _maintain(self, term: _Term) -> None:
        """The term's loop: recovery once a second, health, the migration step, pruning.
        Reads only ``term``'s epoch and stop event."""
        try:
            self._maintain_loop(term)
        except Exception as e:  # a bug in a pass: give the lease up rather than lead blind
            log.exception("the maintenance loop of epoch %s failed", term.epoch)
            self._revoke(term, f"the maintenance loop failed: {type(e).__name__}: {e}")

    def _maintain_loop(self, term: _Term) -> None:
        # The first prune comes at the term's first pass: time.monotonic() counts from the
        # host's boot, so 0.0 here had kept a host booted less than an hour from pruning.
        last_prune = -math.inf
        due = time.monotonic() + RECOVERY_INTERVAL
        while not term.stop.wait(max(0.0, min(CHAIN_INTERVAL, due - time.monotonic()))):
            if time.monotonic() < due:
                self._chain(term)
                continue
            due = time.monotonic() + RECOVERY_INTERVAL
            self.clock.sync_if_due()  # a failure keeps the last sample (and is logged)
            members = self._recover(term)
            if term.stop.is_set():  # halted during the pass: no step, no pruning after it
                return
            problem = self.healthy() if term is self._term else None
            if problem:
                self._revoke(term, problem)
                return
            if members is not None:
                self._drive(term, members)
            if time.monotonic() - last_prune > PRUNE_INTERVAL and term.epoch is not None:
                last_prune = time.monotonic()
                try:
                    horizon = self.clock.now() - self.settings.runs.retention_seconds
                    n = prune_runs(self.db, term.epoch, older_than=horizon)
                    if n:
                        log.info("pruned %d runs older than the retention window", n)
                except QClusterError as e:
                    log.warning("run pruning failed: %s", e)

    def _chain(self, term: _Term) -> None:
        """A chain pass between two recovery passes, if a marked run has ended."""
        epoch = term.epoch
        if epoch is None or term.stop.is_set():
            return
        try:
            with self.db.read() as conn:
                now = self.db.now(conn)
                # Runs that ended since the last check, with a margin: an outcome's
                # finished_at is its worker's time, and its commit comes a moment later.
                since = (now if term.chain_since is None else term.chain_since) - CHAIN_MARGIN
                ready = chains.ready(conn, since)
            term.db_ok = time.monotonic()  # it answered (the watch counts from here)
            if not ready:
                term.chain_since = now
                return
            with self.db.fenced(epoch) as conn:
                result = chains.chain_runs(
                    conn, epoch, self.node_id, now=self.db.now(conn),
                    grace=self.settings.scheduler.misfire_grace_seconds,
                    defaults=self.defaults, since=since)
            term.chain_since = now
        except Fenced as e:
            self._revoke(term, f"a chain pass was fenced: {e}")
            return
        except QClusterError as e:
            log.warning("chain pass failed (will retry): %s", e)
            return
        _count_chained(result.recorded)
        if result.send and not term.stop.is_set():
            self.send(result.send)

    def _drive(self, term: _Term, members: list[MemberInfo]) -> None:
        epoch = term.epoch
        if self.drive is None or epoch is None or term.stop.is_set():
            return
        try:
            self.drive(epoch, members)
        except Fenced as e:
            self._revoke(term, f"a migration step was fenced: {e}")
        except QClusterError as e:
            log.warning("migration step failed (will retry): %s", e)

    def _watch_database(self, term: _Term) -> None:
        """docs/DESIGN.md invariant 5: a leader that cannot reach the shared database steps
        down, even when its ZooKeeper session or Redis lease is fine. Apart from the
        maintenance loop, whose recovery pass may sit in a connect timeout while the
        database is out of reach: the step-down comes ``database_timeout_seconds`` after
        the last answer, not after that call returns."""
        while not term.stop.wait(WATCH_INTERVAL):
            problem = self._database_problem(term)
            if problem:
                self._revoke(term, problem)
                return

    def _database_problem(self, term: _Term) -> str | None:
        silent = time.monotonic() - term.db_ok
        if silent > self.settings.scheduler.database_timeout_seconds:
            return f"the shared database has not answered for {silent:.0f}s"
        return None

    def _recover(self, term: _Term) -> list[MemberInfo] | None:
        """One recovery pass at ``term``'s epoch; the live members it read (the migration
        step uses them too), or None if it could not run."""
        epoch = term.epoch
        if epoch is None or term.stop.is_set():
            return None
        try:
            members = self.members()
            workers = members if self.workers is self.members else self.workers()
            if term.stop.is_set():  # halted while the backend answered: write nothing
                return None
            live = {(m.node_id, m.session) for m in workers}
            tags = {m.node_id: frozenset(m.tags) for m in workers if m.takes_runs}
            result = recover_runs(self.db, epoch, live_workers=live, worker_tags=tags,
                                  grace_seconds=self.settings.scheduler.misfire_grace_seconds,
                                  max_attempts=self.settings.runs.max_attempts,
                                  judge=term.judge, leader=self.node_id,
                                  defaults=self.defaults, chain_after=term.chain_after)
        except Fenced as e:
            self._revoke(term, f"recovery was fenced: {e}")
            return None
        except QClusterError as e:
            log.warning("run recovery failed (will retry): %s", e)
            return None
        term.db_ok = time.monotonic()
        term.chain_after = result.chain_cursor
        metrics.LIVE_WORKERS.set(sum(1 for m in workers if "worker" in m.roles))
        metrics.RECORDED_BY_LEADER.labels(status="missed").inc(result.missed)
        metrics.RECORDED_BY_LEADER.labels(status="lost").inc(result.lost + result.quarantined)
        _count_chained(result.chained)
        if result.resend and not term.stop.is_set():
            log.info("sending %d recorded runs again", len(result.resend))
            self.send(result.resend)
        if result.bulk and not term.stop.is_set():
            self.send(result.bulk, bulk=True)
        return members


class _Groups:
    """Where affinity groups sit, for ``term``'s dispatcher (``leader/dispatch.Groups``):
    read from ``qc_groups``, and written fenced on the term's epoch. A fenced write steps
    the term down."""

    def __init__(self, role: LeaderRole, term: _Term) -> None:
        self.role, self.term = role, term

    def load(self) -> dict[str, str]:
        with self.role.db.read() as conn:
            return groups.placements(conn)

    def place(self, group: str, node_id: str) -> None:
        epoch = self.term.epoch
        if epoch is None or self.term.stop.is_set():
            raise QClusterError("this term has ended")
        try:
            with self.role.db.fenced(epoch) as conn:
                groups.place(conn, group, node_id, epoch=epoch, now=self.role.db.now(conn))
        except Fenced as e:
            self.role._revoke(self.term, f"placing a group was fenced: {e}")
            raise


def _count_chained(recorded: dict[str, int]) -> None:
    """Dependent jobs' runs a chain pass recorded, by status (docs/METRICS.md)."""
    for status, count in recorded.items():
        metrics.FIRES.labels(status=status, reason="after_parents").inc(count)


def _shutdown(scheduler: LeaderScheduler) -> None:
    with contextlib.suppress(SchedulerNotRunningError):
        scheduler.shutdown(wait=False)
