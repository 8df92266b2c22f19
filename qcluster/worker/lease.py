"""A worker's claim lease: how long it may keep running ``--recover`` runs while no one
can see it alive (docs/DESIGN.md invariant 7, "known stopped").

A leader sends a ``--recover`` run again only when the worker that held it is known to
have stopped running it: the worker said so, or it has been silent for longer than this
lease lets it run. The lease is renewed by

* a membership heartbeat that the database committed, from the moment it was sent (the
  database's ``last_seen`` is later, so the lease ends before the database's silence
  reaches ``member_timeout``), and
* a leader's ``report`` call at a current epoch, from the moment it arrived (the leader
  counts from when the answer came back, later again).

Promises:

* :meth:`ClaimLease.expired` is true once :attr:`ClaimLease.ttl` seconds of the monotonic
  clock have passed since the last renewal (a wall clock that jumps changes nothing).
* :class:`SelfFence` checks every :data:`CHECK_SECONDS`: a worker whose lease expired
  while the code of a ``--recover`` run still runs ends its process at once
  (:data:`EXIT_SELF_FENCED`), as an HBase region server aborts when its ZooKeeper session
  expires: a leader that counted the lease out runs that run again elsewhere. Its last
  act before the exit (``before_exit``, :meth:`qcluster.worker.runner.Worker.fence_exit`)
  SIGKILLs every slot's process group, so the ``--recover`` code stops at once, then
  writes for at most :data:`FENCE_FLUSH_SECONDS` the outcomes of runs that had already
  finished (over this worker's own claim only: a run the leader has declared ``lost``
  keeps that), so that a pause past the lease does not turn finished runs into ``lost``
  ones. A worker whose running runs are not
  ``--recover`` ones goes on: those runs are never run again, only recorded ``lost``
  until their late outcome arrives.

The leader's side of the bargain (:mod:`qcluster.leader.liveness`) waits
``ttl + FENCE_MARGIN`` of silence before it counts a worker out.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from qcluster.store.reports import FENCE_MARGIN, lease_seconds

__all__ = ["CHECK_SECONDS", "EXIT_SELF_FENCED", "FENCE_FLUSH_SECONDS", "FENCE_MARGIN",
           "ClaimLease", "SelfFence",
           "lease_seconds"]

log = logging.getLogger(__name__)

#: How long the self-fence's last act may try to write the finished runs' outcomes.
FENCE_FLUSH_SECONDS = 1.0
#: How often the self-fence looks.
CHECK_SECONDS = 0.05
#: The exit status of a worker that ended itself (EX_TEMPFAIL: a supervisor restarts it).
EXIT_SELF_FENCED = 75


class ClaimLease:
    """The worker's lease; thread-safe."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._renewed = clock()

    def renew(self, at: float) -> None:
        """Renewed at ``at`` (this lease's clock); an older renewal changes nothing."""
        with self._lock:
            self._renewed = max(self._renewed, at)

    def left(self) -> float:
        with self._lock:
            return self._renewed + self.ttl - self._clock()

    def expired(self) -> bool:
        return self.left() <= 0


class SelfFence:
    """Ends the process when the lease has expired while ``--recover`` code runs."""

    def __init__(self, lease: ClaimLease, recovering: Callable[[], int], *,
                 exit: Callable[[int], object] = os._exit,
                 before_exit: Callable[[float], None] | None = None) -> None:
        self.lease = lease
        self.recovering = recovering
        self._exit = exit
        self._before_exit = before_exit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="qc-self-fence", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def check(self) -> bool:
        """One look; whether it ended the process (or called the test's ``exit``)."""
        if not self.lease.expired():
            return False
        running = self.recovering()
        if not running:
            return False
        log.critical(
            "self-fencing: neither the database nor a leader has heard from this worker for "
            "%.0fs, and %d --recover runs are still running; a leader will run them again "
            "elsewhere, so this process ends now (exit status %d)",
            self.lease.ttl - self.lease.left(), running, EXIT_SELF_FENCED)
        if self._before_exit is not None:
            try:
                self._before_exit(FENCE_FLUSH_SECONDS)
            except Exception:  # the exit must come whatever the last act did
                log.exception("the self-fence's last act failed")
        for handler in logging.getLogger().handlers:
            handler.flush()
        self._exit(EXIT_SELF_FENCED)
        return True

    def _loop(self) -> None:
        while not self._stop.wait(CHECK_SECONDS):
            if self.check():
                return
