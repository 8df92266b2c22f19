"""The follow/lead loop, written once for every backend.

A follower campaigns (``try_acquire``) every ``campaign_interval``. On winning it calls
``on_elected(lease)``, which takes the epoch and starts the schedule, on a thread of its own
(``qc-term-start``): the loop renews the lease meanwhile, so a start that takes longer than
the lease (a first recovery pass that asks a silent worker for seconds) does not lose it.
The node's status is "leader" once that call has returned. A leader renews at
a third of the lease's validity and keeps a local *monotonic* deadline: the moment the
acquire or the last successful renew was sent, plus the validity, minus a margin. It
steps down when:

* the backend says the lease is lost (``on_lost``: expired, taken, ZooKeeper SUSPENDED or
  LOST, Redis key gone) — then ``halt()`` runs at once, on the backend's thread, before
  anything else;
* a renew returns ``False``;
* the deadline passes, whether renews fail or hang (renews run on their own thread, so a
  server that stops answering cannot hold the loop past the deadline).

Stepping down calls ``halt()`` (stop firing and dispatching, non-blocking), waits (at most
``START_JOIN_SECONDS``) for a start still under way, which halts at its next step, then
``on_revoked(reason)`` (tear the leader's parts down), then releases the lease, which the
backend checks against the owner.

What to campaign on comes from ``plan()`` on every attempt: the backend that the
cluster's current phase needs (a joint one while a migration is under way), or the reason
not to campaign. A leader whose phase changes is *reshaped* in place (:meth:`reshape`):
the loop takes the claims it lacks, gives back those it no longer needs, and reports the
new lease through ``on_reshaped``, between two renewals, so a lease is never renewed and
changed at once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from backends.base import CoordinationBackend, Lease
from backends.joint import JointBackend, combine
from qcluster import metrics
from qcluster.errors import QClusterError

log = logging.getLogger(__name__)

#: How long a step-down waits for a term's start still under way (halted, it stops at its
#: next step; each step is bounded by a database, backend or RPC timeout).
START_JOIN_SECONDS = 5.0


class Leadership:
    """Campaigns, renews and steps down. ``start()``/``stop()``; ``stop()`` is idempotent."""

    def __init__(
        self,
        node_id: str,
        *,
        plan: Callable[[], CoordinationBackend | str],
        on_elected: Callable[[Lease], None],
        on_revoked: Callable[[str], None],
        halt: Callable[[], None],
        min_token: Callable[[], int],
        on_reshaped: Callable[[Lease], None] | None = None,
        campaign_interval: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node_id = node_id
        self.plan = plan
        self.on_elected = on_elected
        self.on_revoked = on_revoked
        self.on_reshaped = on_reshaped
        self.halt = halt
        self.min_token = min_token
        self.campaign_interval = campaign_interval
        self.clock = clock
        self.status = "starting"
        self.backend: CoordinationBackend | None = None  # what the lease was taken on
        self.lease: Lease | None = None
        self._deadline = 0.0
        self._renewed_at = 0.0
        self._lost_reason: str | None = None
        self._lost = threading.Event()
        self._poke = threading.Event()  # wakes the holding loop: lost, or a reshape asked
        self._reshape_to: CoordinationBackend | None = None
        self._generation = 0  # one per campaign attempt: see _loss_callback
        self._term_lost: Callable[[str], None] = self._on_lost
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._renewer = ThreadPoolExecutor(1, thread_name_prefix="qc-renew")
        # One thread: a term's start never runs beside the previous term's.
        self._starter = ThreadPoolExecutor(1, thread_name_prefix="qc-term-start")
        self._starting: Future[None] | None = None  # on_elected, until the loop sees it end
        self._thread = threading.Thread(target=self._run, name="qc-leadership", daemon=True)

    @property
    def deadline(self) -> float:
        """The held lease's local deadline (``clock()``), as the loop keeps it."""
        return self._deadline

    @property
    def leading(self) -> bool:
        return self.lease is not None and not self._lost.is_set()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Step down (releasing the lease) and stop campaigning."""
        self._stop.set()
        self._lost.set()
        self._poke.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        self._renewer.shutdown(wait=False, cancel_futures=True)
        self._starter.shutdown(wait=False, cancel_futures=True)

    def revoke(self, reason: str) -> None:
        """Give up leadership from any thread (e.g. a write was fenced). Non-blocking."""
        self._on_lost(reason)

    def _on_lost(self, reason: str) -> None:
        # Called by backend threads: stop dispatching first, then let the loop tidy up.
        # The loop is woken whatever halt() does: an exception there (a part that was not
        # started yet) must not leave a leader that renews its lease and never fires.
        with self._lock:
            if self._lost_reason is None:
                self._lost_reason = reason
        try:
            self.halt()
        finally:
            self._lost.set()
            self._poke.set()

    def _loss_callback(self) -> Callable[[str], None]:
        """The ``on_lost`` for the leases of the term about to be campaigned for: a loss
        reported for an earlier term's lease (a late watch, a late renew) is dropped, it
        must not step this term down."""
        with self._lock:
            self._generation += 1
            generation = self._generation

        def on_lost(reason: str) -> None:
            with self._lock:
                current = self._generation == generation
            if current:
                self._on_lost(reason)
            else:
                log.info("ignoring the loss of an earlier term's lease: %s", reason)

        return on_lost

    def reshape(self, backend: CoordinationBackend) -> None:
        """Ask the loop to hold the lease on ``backend`` instead (a migration widens a
        lease to a joint one, or narrows a joint one). Non-blocking; the loop takes the
        missing claims, gives back the others, and calls ``on_reshaped``."""
        with self._lock:
            self._reshape_to = backend
        self._poke.set()

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
        backend = self.plan()
        if isinstance(backend, str):
            if backend != self.status:
                log.warning("not campaigning: %s", backend)
            self.status = backend
            self._stop.wait(self.campaign_interval * 4)
            return
        # A loss reported while the acquire is under way (a joint lease takes seconds to
        # gather) must count: clear the previous one before, never after.
        with self._lock:
            self._lost_reason = None
        self._lost.clear()
        self._term_lost = self._loss_callback()
        sent = self.clock()
        try:
            lease = backend.try_acquire(self.node_id, self._term_lost, self.min_token())
        except QClusterError as e:
            metrics.BACKEND_ERRORS.labels(backend=backend.name, operation="campaign").inc()
            self.status = f"cannot campaign: {e}"
            log.warning("campaign failed: %s", e)
            self._stop.wait(self.campaign_interval * 4)
            return
        if lease is None:
            self.status = "follower"
            self._stop.wait(self.campaign_interval)
            return
        if self._lost.is_set():  # lost while being acquired (or stopping): do not lead
            self.status = f"follower ({self._lost_reason or 'stopping'} while campaigning)"
            self._give_back(backend, lease)
            self._stop.wait(self.campaign_interval)
            return
        with self._lock:
            self._reshape_to = None
        self.backend, self.lease = backend, lease
        self._renewed_at = sent
        self._deadline = sent + lease.valid_for - self._margin(lease)
        log.info("won the %s lease (token %d)", lease.backend, lease.token)
        self.status = "starting to lead"
        starting = self._starter.submit(self._start_term, lease)
        self._starting = starting
        starting.add_done_callback(lambda _: self._poke.set())

    def _start_term(self, lease: Lease) -> None:
        """``on_elected`` on the ``qc-term-start`` thread. A lease lost before this thread
        got to it starts nothing (a loss during the call halts the term it installed)."""
        if self._lost.is_set():
            raise QClusterError(f"the lease was lost before the term started "
                                f"({self._lost_reason or 'stopping'})")
        self.on_elected(lease)

    def _started(self) -> bool:
        """Take the ended start's outcome: "leader", or step down. Whether it leads."""
        starting, self._starting = self._starting, None
        assert starting is not None
        error = starting.exception()
        if error is None:
            self.status = "leader"
            return True
        log.warning("could not start leading: %s", error)
        self._step_down(f"could not start leading: {error}")
        self._stop.wait(self.campaign_interval * 4)
        return False

    def _hold(self) -> None:
        lease, backend = self.lease, self.backend
        assert lease is not None and backend is not None
        renew_at = self._renewed_at + lease.valid_for / 3
        wait = max(0.0, min(renew_at, self._deadline) - self.clock())
        poked = self._poke.wait(wait)
        self._poke.clear()
        if self._lost.is_set():
            self._step_down(self._lost_reason or "stopping")
            return
        if self.clock() >= self._deadline:
            self._step_down("the lease was not renewed before its deadline")
            return
        if poked:
            if self._starting is not None and self._starting.done() and not self._started():
                return  # the start failed: stepped down
            if self._starting is None:  # a reshape waits until the term has started
                self._reshape()
            if self.lease is None:  # it stepped down
                return
            if self.clock() < self._renewed_at + self.lease.valid_for / 3:
                return
        lease, backend = self.lease, self.backend
        assert lease is not None and backend is not None
        sent = self.clock()
        future: Future[bool] = self._renewer.submit(backend.renew, lease)
        try:
            ok = future.result(timeout=max(0.0, self._deadline - self.clock()))
        except FutureTimeout:
            self._step_down("the lease renewal did not answer before the deadline")
            return
        except QClusterError as e:
            metrics.BACKEND_ERRORS.labels(backend=backend.name, operation="renew").inc()
            log.warning("lease renewal failed (deadline in %.1fs): %s",
                        self._deadline - self.clock(), e)
            self._lost.wait(min(0.25, max(0.0, self._deadline - self.clock())))
            return
        if not ok:
            self._step_down(self._lost_reason or "the lease was lost")
            return
        self._renewed_at = sent
        self._deadline = sent + lease.valid_for - self._margin(lease)

    def _reshape(self) -> None:
        """Hold the lease on the backend :meth:`reshape` asked for: take the claims that
        are missing (in that backend's order), then give back those it does not need."""
        with self._lock:
            target, self._reshape_to = self._reshape_to, None
        lease = self.lease
        if target is None or lease is None or target is self.backend:
            return
        parts = _parts_of(target)
        claims: list[Lease] = []
        taken: list[Lease] = []
        sent = self.clock()
        try:
            for part in parts:
                claim = lease.part(part.name)
                if claim is None:
                    floor = max([self.min_token(), *(c.token for c in claims)])
                    claim = self._acquire(part, floor)
                    if claim is None:
                        raise QClusterError(f"the {part.name} lock is held by another node")
                    taken.append(claim)
                claims.append(claim)
        except (QClusterError, FutureTimeout) as e:
            log.warning("could not take the %s lease as well: %s",
                        "+".join(p.name for p in parts), e or "no answer")
            for claim in taken:
                self._give_back(_part_of(parts, claim.backend), claim)
            return
        wanted = {c.backend for c in claims}
        current = self.backend
        for claim in lease.parts or (lease,):
            if claim.backend not in wanted and current is not None:
                self._give_back(_part_of(_parts_of(current), claim.backend), claim)
        new = combine(claims)
        self.backend, self.lease = target, new
        if taken:
            fresh = sent + min(c.valid_for for c in taken) - self._margin(new)
            self._deadline = min(self._deadline, fresh)
        log.info("now holding the %s lease (token %d)", new.backend, new.token)
        if self.on_reshaped is not None:
            try:
                self.on_reshaped(new)
            except Exception as e:
                self._step_down(f"could not record the {new.backend} lease: {e}")

    def _acquire(self, part: CoordinationBackend, floor: int) -> Lease | None:
        """``part.try_acquire`` on the renewer thread, bounded by the lease's deadline. A
        claim that arrives after the deadline gave up on it is released, not leaked."""
        future: Future[Lease | None] = self._renewer.submit(
            part.try_acquire, self.node_id, self._term_lost, floor)
        try:
            return future.result(timeout=max(0.0, self._deadline - self.clock()))
        except FutureTimeout:
            def release_late(done: Future[Lease | None]) -> None:
                with contextlib.suppress(Exception):
                    claim = done.result()
                    if claim is not None:
                        part.release(claim)
            future.add_done_callback(release_late)
            raise

    def _give_back(self, backend: CoordinationBackend, claim: Lease) -> None:
        future = self._renewer.submit(backend.release, claim)
        try:
            future.result(timeout=5.0)
        except Exception as e:  # best effort: the claim expires on its own anyway
            log.info("could not release the %s lease: %s", claim.backend, e)

    @staticmethod
    def _margin(lease: Lease) -> float:
        return lease.valid_for * 0.05 + 0.05

    def _step_down(self, reason: str) -> None:
        lease, backend = self.lease, self.backend
        self.halt()  # step down first: nothing is fired or sent after this line
        starting, self._starting = self._starting, None
        if starting is not None:  # halted, the start ends at its next step
            with contextlib.suppress(Exception):
                starting.exception(timeout=START_JOIN_SECONDS)
            if not starting.done():
                log.warning("the term's start has not ended %gs after the halt",
                            START_JOIN_SECONDS)
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
        if lease is not None and backend is not None:
            self._give_back(backend, lease)
        self.backend = None
        if not self._stop.is_set():
            self._lost.clear()
            self._poke.clear()


def _parts_of(backend: CoordinationBackend) -> tuple[CoordinationBackend, ...]:
    """The single backends a (joint or single) backend is made of."""
    return backend.parts if isinstance(backend, JointBackend) else (backend,)


def _part_of(parts: tuple[CoordinationBackend, ...], name: str) -> CoordinationBackend:
    return next(p for p in parts if p.name == name)
