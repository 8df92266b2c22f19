"""The follow/lead loop, written once for every backend.

A follower campaigns (``try_acquire``) every ``campaign_interval``. On winning it calls
``on_elected(lease)``, which takes the epoch and starts the schedule. A leader renews at
a third of the lease's validity and keeps a local *monotonic* deadline: the moment the
acquire or the last successful renew was sent, plus the validity, minus a margin. It
steps down when:

* the backend says the lease is lost (``on_lost``: expired, taken, ZooKeeper SUSPENDED or
  LOST, Redis key gone) — then ``halt()`` runs at once, on the backend's thread, before
  anything else;
* a renew returns ``False``;
* the deadline passes, whether renews fail or hang (renews run on their own thread, so a
  server that stops answering cannot hold the loop past the deadline).

Stepping down calls ``halt()`` (stop firing and dispatching, non-blocking), then
``on_revoked(reason)`` (tear the leader's parts down), then releases the lease, which the
backend checks against the owner.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from backends.base import CoordinationBackend, Lease
from qcluster.errors import QClusterError

log = logging.getLogger(__name__)


class Leadership:
    """Campaigns, renews and steps down. ``start()``/``stop()``; ``stop()`` is idempotent."""

    def __init__(
        self,
        backend: CoordinationBackend,
        node_id: str,
        *,
        on_elected: Callable[[Lease], None],
        on_revoked: Callable[[str], None],
        halt: Callable[[], None],
        may_campaign: Callable[[], str | None],
        min_token: Callable[[], int],
        campaign_interval: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.node_id = node_id
        self.on_elected = on_elected
        self.on_revoked = on_revoked
        self.halt = halt
        self.may_campaign = may_campaign
        self.min_token = min_token
        self.campaign_interval = campaign_interval
        self.clock = clock
        self.status = "starting"
        self.lease: Lease | None = None
        self._deadline = 0.0
        self._renewed_at = 0.0
        self._lost_reason: str | None = None
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._renewer = ThreadPoolExecutor(1, thread_name_prefix="qc-renew")
        self._thread = threading.Thread(target=self._run, name="qc-leadership", daemon=True)

    @property
    def leading(self) -> bool:
        return self.lease is not None and not self._lost.is_set()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Step down (releasing the lease) and stop campaigning."""
        self._stop.set()
        self._lost.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        self._renewer.shutdown(wait=False, cancel_futures=True)

    def revoke(self, reason: str) -> None:
        """Give up leadership from any thread (e.g. a write was fenced). Non-blocking."""
        self._on_lost(reason)

    def _on_lost(self, reason: str) -> None:
        # Called by backend threads: stop dispatching first, then let the loop tidy up.
        with self._lock:
            if self._lost_reason is None:
                self._lost_reason = reason
        self.halt()
        self._lost.set()

    # -- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.lease is None:
                    self._campaign()
                else:
                    self._hold()
            except Exception:  # the loop must keep turning, whatever a backend does
                log.exception("leadership loop error")
                self._stop.wait(self.campaign_interval)
        if self.lease is not None:
            self._step_down("stopping")

    def _campaign(self) -> None:
        reason = self.may_campaign()
        if reason is not None:
            if reason != self.status:
                log.warning("not campaigning: %s", reason)
            self.status = reason
            self._stop.wait(self.campaign_interval * 4)
            return
        sent = self.clock()
        try:
            lease = self.backend.try_acquire(self.node_id, self._on_lost, self.min_token())
        except QClusterError as e:
            self.status = f"cannot campaign: {e}"
            log.warning("campaign failed: %s", e)
            self._stop.wait(self.campaign_interval * 4)
            return
        if lease is None:
            self.status = "follower"
            self._stop.wait(self.campaign_interval)
            return
        with self._lock:
            self._lost_reason = None
        self._lost.clear()
        self.lease = lease
        self._renewed_at = sent
        self._deadline = sent + lease.valid_for - self._margin(lease)
        log.info("won the %s lease (token %d)", lease.backend, lease.token)
        try:
            self.on_elected(lease)
        except Exception as e:
            log.warning("could not start leading: %s", e)
            self._step_down(f"could not start leading: {e}")
            self._stop.wait(self.campaign_interval * 4)
            return
        self.status = "leader"

    def _hold(self) -> None:
        lease = self.lease
        assert lease is not None
        renew_at = self._renewed_at + lease.valid_for / 3
        wait = max(0.0, min(renew_at, self._deadline) - self.clock())
        if self._lost.wait(wait):
            self._step_down(self._lost_reason or "stopping")
            return
        if self.clock() >= self._deadline:
            self._step_down("the lease was not renewed before its deadline")
            return
        sent = self.clock()
        future: Future[bool] = self._renewer.submit(self.backend.renew, lease)
        try:
            ok = future.result(timeout=max(0.0, self._deadline - self.clock()))
        except FutureTimeout:
            self._step_down("the lease renewal did not answer before the deadline")
            return
        except QClusterError as e:
            log.warning("lease renewal failed (deadline in %.1fs): %s",
                        self._deadline - self.clock(), e)
            self._lost.wait(min(0.25, max(0.0, self._deadline - self.clock())))
            return
        if not ok:
            self._step_down(self._lost_reason or "the lease was lost")
            return
        self._renewed_at = sent
        self._deadline = sent + lease.valid_for - self._margin(lease)

    @staticmethod
    def _margin(lease: Lease) -> float:
        return lease.valid_for * 0.05 + 0.05

    def _step_down(self, reason: str) -> None:
        lease = self.lease
        self.halt()  # step down first: nothing is fired or sent after this line
        self.lease = None
        self._lost.set()
        self.status = f"stepped down: {reason}"
        if self._stop.is_set():
            log.info("stepping down: %s", reason)
        else:
            log.warning("stepping down: %s", reason)
        try:
            self.on_revoked(reason)
        except Exception:
            log.exception("error while stepping down")
        if lease is not None:
            future = self._renewer.submit(self.backend.release, lease)
            try:
                future.result(timeout=5.0)
            except Exception as e:  # best effort: the lease expires on its own anyway
                log.info("could not release the lease: %s", e)
        if not self._stop.is_set():
            self._lost.clear()
