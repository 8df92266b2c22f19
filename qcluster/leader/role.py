"""The leader's parts, started on winning and torn down on stepping down.

Order on winning: take a new epoch (fenced against older leases), publish who leads,
start the dispatcher, send the runs that an earlier leader recorded but never sent, then
start APScheduler on the shared store. Order on losing: ``halt()`` first (no fire is
recorded and no run is sent after it), then the rest, without waiting on a database that
may not answer.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

from apscheduler.schedulers import SchedulerNotRunningError

from backends.base import CoordinationBackend, LeaderInfo, Lease, MemberInfo
from qcluster.errors import Fenced, QClusterError
from qcluster.leader.dispatch import Dispatcher
from qcluster.leader.recovery import prune_runs, recover_runs
from qcluster.leader.scheduler import FireExecutor, LeaderScheduler
from qcluster.settings import Settings
from qcluster.store.cluster import take_epoch
from qcluster.store.db import Database
from qcluster.store.jobstore import SqlJobStore
from qcluster.store.records import RunRecord

log = logging.getLogger(__name__)

RECOVERY_INTERVAL = 1.0
PRUNE_INTERVAL = 3600.0


class LeaderRole:
    """Everything that runs only while this node leads."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        *,
        members: Callable[[], list[MemberInfo]],
        node_id: str,
        control_uri: str,
        secret: str,
        revoke: Callable[[str], None],
        drive: Callable[[int, list[MemberInfo]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.members = members
        self.drive = drive
        self.node_id = node_id
        self.control_uri = control_uri
        self.secret = secret
        self.revoke = revoke
        self.epoch: int | None = None
        self.scheduler: LeaderScheduler | None = None
        self.dispatcher: Dispatcher | None = None
        self._stop = threading.Event()
        self._maintenance: threading.Thread | None = None
        self._db_ok = time.monotonic()
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return self.epoch is not None and not self._stop.is_set()

    def start(self, lease: Lease, backend: CoordinationBackend) -> None:
        """Lead with ``lease``, taken on ``backend``."""
        s = self.settings
        self._stop = threading.Event()
        self._db_ok = time.monotonic()
        epoch = take_epoch(self.db, node_id=self.node_id, uri=self.control_uri, lease=lease)
        backend.publish_leader(
            lease, LeaderInfo(self.node_id, self.control_uri, epoch, time.time())
        )
        log.info("leading the cluster at epoch %d", epoch)
        dispatcher = Dispatcher(
            epoch=epoch, secret=self.secret, timeout=s.rpc.timeout_seconds,
            strategy=s.dispatch.strategy, batch_size=s.dispatch.batch_size,
            members=self.members, on_stale=self.revoke,
        )
        store = SqlJobStore(
            self.db, lambda: epoch,
            misfire_grace_seconds=s.scheduler.misfire_grace_seconds,
            coalesce=s.scheduler.coalesce, batch_size=s.scheduler.batch_size,
        )
        executor = FireExecutor(store, epoch, self.node_id, dispatcher.submit,
                                retention_seconds=s.runs.retention_days * 86400)
        scheduler = LeaderScheduler(store, executor, poll_seconds=s.scheduler.poll_seconds,
                                    on_fenced=self.revoke,
                                    fire_ahead_seconds=s.scheduler.fire_ahead_seconds)
        with self._lock:
            self.epoch, self.dispatcher, self.scheduler = epoch, dispatcher, scheduler
        dispatcher.start()
        self._recover()
        self._maintenance = threading.Thread(target=self._maintain, name="qc-maintenance",
                                             daemon=True)
        self._maintenance.start()
        scheduler.start()

    def halt(self) -> None:
        """Stop firing and sending now. Non-blocking and idempotent."""
        self._stop.set()
        with self._lock:
            scheduler, dispatcher = self.scheduler, self.dispatcher
        if scheduler is not None:
            scheduler.stop_firing()
        if dispatcher is not None:
            dispatcher.stop()

    def stop(self) -> None:
        """Tear down after :meth:`halt`. Never waits on the database."""
        self.halt()
        with self._lock:
            scheduler = self.scheduler
            self.scheduler = self.dispatcher = None
            self.epoch = None
        if scheduler is not None:
            # shutdown() joins the loop thread, which may be inside a database call that
            # does not answer: do it on the side. Our pass does nothing once stopped.
            threading.Thread(target=_shutdown, args=(scheduler,), daemon=True).start()

    def wakeup(self) -> None:
        with self._lock:
            scheduler = self.scheduler
        if scheduler is not None:
            scheduler.wakeup()

    def send(self, runs: list[RunRecord]) -> None:
        with self._lock:
            dispatcher = self.dispatcher
        if dispatcher is not None:
            dispatcher.submit(runs)

    def healthy(self) -> str | None:
        """Why this leader is not working, or None. The node steps down on a reason."""
        with self._lock:
            scheduler = self.scheduler
        if scheduler is None:
            return None
        stuck = time.monotonic() - scheduler.last_pass
        limit = max(30.0, 10 * self.settings.scheduler.poll_seconds)
        if scheduler.running and stuck > limit:
            return f"the scheduler loop has not turned for {stuck:.0f}s"
        return None

    # -- maintenance ------------------------------------------------------------------------

    def _maintain(self) -> None:
        last_prune = 0.0
        while not self._stop.wait(RECOVERY_INTERVAL):
            members = self._recover()
            problem = self.healthy() or self._database_problem()
            if problem:
                self.revoke(problem)
                return
            if members is not None:
                self._drive(members)
            if time.monotonic() - last_prune > PRUNE_INTERVAL and self.epoch is not None:
                last_prune = time.monotonic()
                try:
                    horizon = time.time() - self.settings.runs.retention_days * 86400
                    n = prune_runs(self.db, self.epoch, older_than=horizon)
                    if n:
                        log.info("pruned %d runs older than the retention window", n)
                except QClusterError as e:
                    log.warning("run pruning failed: %s", e)

    def _drive(self, members: list[MemberInfo]) -> None:
        epoch = self.epoch
        if self.drive is None or epoch is None or self._stop.is_set():
            return
        try:
            self.drive(epoch, members)
        except Fenced as e:
            self.revoke(f"a migration step was fenced: {e}")
        except QClusterError as e:
            log.warning("migration step failed (will retry): %s", e)

    def _database_problem(self) -> str | None:
        # docs/DESIGN.md invariant 5: a leader that cannot reach the shared database steps
        # down, even when its ZooKeeper session or Redis lease is fine.
        silent = time.monotonic() - self._db_ok
        if silent > self.settings.scheduler.database_timeout_seconds:
            return f"the shared database has not answered for {silent:.0f}s"
        return None

    def _recover(self) -> list[MemberInfo] | None:
        """One recovery pass; the live members it read (the migration step uses them too),
        or None if it could not run."""
        epoch = self.epoch
        if epoch is None or self._stop.is_set():
            return None
        try:
            members = self.members()
            live = {(m.node_id, m.session) for m in members}
            result = recover_runs(self.db, epoch, live_workers=live,
                                  grace_seconds=self.settings.scheduler.misfire_grace_seconds)
        except Fenced as e:
            self.revoke(f"recovery was fenced: {e}")
            return None
        except QClusterError as e:
            log.warning("run recovery failed (will retry): %s", e)
            return None
        self._db_ok = time.monotonic()
        if result.resend:
            log.info("sending %d recorded runs again", len(result.resend))
            self.send(result.resend)
        return members


def _shutdown(scheduler: LeaderScheduler) -> None:
    with contextlib.suppress(SchedulerNotRunningError):
        scheduler.shutdown(wait=False)
