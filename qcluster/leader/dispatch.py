"""The leader's dispatcher: sends committed runs to workers, in batches, over Pyro5.

It only ever sends runs whose rows have committed (docs/DESIGN.md invariant 3): the
scheduler hands them over after its fenced transaction. Routing is round robin or least
loaded (in-flight per capacity, as the workers report it with every reply). A worker that
cannot be reached is set aside for a moment and its runs go to the next worker. Sends are
idempotent: a worker refuses a run attempt it has seen, and only one worker's claim of a run
can commit, so a resend after a timeout never runs anything twice.

``stop()`` takes effect at once: no batch leaves after it returns (step down first).

A worker's reply is checked (:func:`qcluster.store.records.reply_from_wire`) before it is
believed: a reply of any other shape, from a broken or hostile worker, is a failed dispatch
to that worker (one log line; its runs go to the next one), never an error of the
dispatcher's thread. What each :class:`~qcluster.store.records.Refusal` makes it do:

* ``stale epoch``: stop, and call ``on_stale`` (the leader steps down);
* ``busy``, ``shutting down``, ``database unavailable``: send again;
* ``duplicate``, ``already claimed``: nothing (the run is someone's already).

A call refused as a whole (a malformed batch, or an epoch that the worker's database does
not hold) sets that worker aside for :data:`DOWN_FOR` and sends its runs elsewhere.

Two lanes. Live runs (fires, run now, retries, recovery's resends) go first, in order.
Bulk runs (a backfill's: thousands due at once) go only when no live run waits, and only
into free slots: to a worker whose last reply said it runs fewer than its capacity, as
many as it has free (a full one whose last reply is older than :data:`BULK_PROBE` is
sent an empty batch, whose reply is its load). A backfill so never queues ahead of the live schedule
on a worker. The bulk lane holds each (run, attempt) once: recovery hands it the unsent
backfill runs at every pass.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, Self

import Pyro5.errors

from backends.base import MemberInfo
from qcluster import metrics
from qcluster.errors import InputError
from qcluster.leader.routing import RoundRobin, Router, make_router
from qcluster.rpc.pyro import proxy
from qcluster.store.records import Refusal, RunRecord, SubmitReply, reply_from_wire, to_wire

log = logging.getLogger(__name__)

REFRESH_WORKERS = 1.0
DOWN_FOR = 2.0
#: How long a batch waits for a worker's answer before its runs go to the others.
SEND_WAIT = 2.0
#: Refusals whose runs are sent again (elsewhere, or a moment later).
SEND_AGAIN = frozenset({Refusal.BUSY, Refusal.SHUTTING_DOWN, Refusal.UNAVAILABLE})
#: A full worker's load older than this is asked again (an empty batch), for the bulk lane.
BULK_PROBE = 0.1  # at 0.5 s, 8 idle slots of quick runs drained 16 backfill runs a second


class WorkerProxy(Protocol):
    """A connection to one worker's ``WorkerService``: a Pyro5 proxy, or a test's fake. Used
    as a context manager (its exit releases the connection); one thread at a time, which
    claims it first (Pyro5's rule)."""

    def submit(self, epoch: int, runs: list[Mapping[str, Any]]) -> object: ...

    def _pyroClaimOwnership(self) -> None: ...  # Pyro5's name

    def __enter__(self) -> Self: ...

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> bool | None: ...


#: Makes the connection to the worker at a URI (not yet connected: the first call does).
Connect = Callable[[str], WorkerProxy]


@dataclass
class _Connection:
    proxy: WorkerProxy
    exit: contextlib.ExitStack

    def close(self) -> None:
        self.proxy._pyroClaimOwnership()
        self.exit.close()


class Dispatcher:
    """Sends runs to live workers; one thread owns every proxy (Pyro5's rule)."""

    def __init__(
        self,
        *,
        epoch: int,
        secret: str,
        timeout: float,
        strategy: str | Router,
        batch_size: int,
        members: Callable[[], list[MemberInfo]],
        on_stale: Callable[[str], None],
        connect: Connect | None = None,
    ) -> None:
        """``connect`` makes the connection to a worker's URI; by default an authenticated
        Pyro5 proxy (``qcluster.rpc.pyro.proxy`` with ``secret`` and ``timeout``)."""
        self.epoch = epoch
        self.secret = secret
        self.timeout = timeout
        self.connect: Connect = connect or self._pyro_proxy
        self.router = make_router(strategy) if isinstance(strategy, str) else strategy
        self._fallback = RoundRobin()
        self._quiet_until = 0.0  # the next "routed nothing" warning, not before
        self.batch_size = batch_size
        self.members = members
        self.on_stale = on_stale
        self.sent = 0
        self._queue: collections.deque[RunRecord] = collections.deque()
        self._bulk: collections.deque[RunRecord] = collections.deque()
        self._bulk_keys: set[tuple[int, int]] = set()
        self._answered: dict[str, float] = {}  # when each worker's load was last said
        self._cond = threading.Condition()
        self._enabled = threading.Event()
        self._enabled.set()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="qc-dispatch", daemon=True)
        self._workers: list[MemberInfo] = []
        self._workers_at = 0.0
        self._down: dict[str, float] = {}
        self._load: dict[str, float] = {}
        self._proxies: dict[str, _Connection] = {}
        self._proxies_lock = threading.Lock()
        self._busy: set[str] = set()  # workers with a call under way
        self._senders = ThreadPoolExecutor(8, thread_name_prefix="qc-send")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop sending now; runs not yet sent stay ``scheduled`` for the next leader."""
        self._enabled.clear()
        self._stopped.set()
        with self._cond:
            self._queue.clear()
            self._bulk.clear()
            self._bulk_keys.clear()
            self._cond.notify_all()

    def submit(self, runs: list[RunRecord], *, bulk: bool = False) -> None:
        """Queue committed runs: live ones in order, ``bulk`` ones (a backfill's) in the
        bulk lane, each (run, attempt) once."""
        if not self._enabled.is_set():
            return
        with self._cond:
            if bulk:
                self._add_bulk(runs)
            else:
                self._queue.extend(runs)
            self._cond.notify()

    def _add_bulk(self, runs: list[RunRecord], *, front: bool = False) -> None:
        new = [r for r in runs if (r["run_id"], r["attempt"]) not in self._bulk_keys]
        self._bulk_keys.update((r["run_id"], r["attempt"]) for r in new)
        if front:
            self._bulk.extendleft(reversed(new))
        else:
            self._bulk.extend(new)

    def pending(self) -> int:
        """Runs queued and not yet sent, in both lanes."""
        with self._cond:
            return len(self._queue) + len(self._bulk)

    # -- the loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while self._enabled.is_set():
                batch = self._take()
                if batch:
                    self._dispatch(batch)
                elif self._bulk:
                    self._dispatch_bulk()
        except BaseException as e:  # a bug: a leader that sends nothing must not lead
            log.critical("the dispatcher stopped (%s: %s): stepping down", type(e).__name__, e)
            self.on_stale(f"the dispatcher stopped: {type(e).__name__}")
            raise
        finally:
            self._senders.shutdown(wait=True)
            with self._proxies_lock:
                proxies, self._proxies = list(self._proxies.values()), {}
            for p in proxies:
                self._close(p)

    def _take(self) -> list[RunRecord]:
        with self._cond:
            if not self._queue and not self._bulk:
                self._cond.wait(0.5)
            n = min(len(self._queue), self.batch_size)
            return [self._queue.popleft() for _ in range(n)]

    def _dispatch_bulk(self) -> None:
        """Send bulk runs into the free slots (no live run waits); what comes back goes
        to the front of the bulk lane. A full worker whose load is older than BULK_PROBE is
        asked again with an empty batch (its reply is its load; it reads nothing). With
        no free slot, wait a moment (a live run's submit ends the wait)."""
        room, stale = self._bulk_room()
        for uri in stale:
            self._send_async(uri, [])
        with self._cond:
            if self._queue:
                return  # a live run came: it goes first
            n = min(sum(room.values()), len(self._bulk), self.batch_size)
            if n == 0:
                self._cond.wait(0.1)
                return
            batch = [self._bulk.popleft() for _ in range(n)]
            self._bulk_keys.difference_update((r["run_id"], r["attempt"]) for r in batch)
        routes: dict[str, list[RunRecord]] = {}
        rest = iter(batch)
        for uri, free in room.items():
            routes[uri] = list(itertools.islice(rest, free))
        futures = {uri: self._send_async(uri, chunk) for uri, chunk in routes.items() if chunk}
        concurrent.futures.wait(futures.values(), timeout=SEND_WAIT)
        again: list[RunRecord] = []
        for uri, future in futures.items():
            try:
                again.extend(future.result(timeout=0) if future.done() else routes[uri])
            except Exception:  # a bug, not a worker's answer: this thread must go on
                log.exception("sending %d runs to worker %s failed", len(routes[uri]), uri)
                again.extend(routes[uri])
        if again and self._enabled.is_set():
            with self._cond:
                self._add_bulk(again, front=True)

    def _bulk_room(self) -> tuple[dict[str, int], list[str]]:
        """The free slots of each live worker, as its last reply said, and the full
        workers whose load is older than BULK_PROBE (to ask again)."""
        now = time.monotonic()
        room: dict[str, int] = {}
        stale: list[str] = []
        for w in self._live_workers():
            uri = w.uri or ""
            free = w.capacity - int(self._load.get(uri, 0.0))
            if free > 0:
                room[uri] = free
            elif now - self._answered.get(uri, -BULK_PROBE) >= BULK_PROBE:
                stale.append(uri)
        return room, stale

    def _dispatch(self, batch: list[RunRecord]) -> None:
        left = batch
        # Workers that gave runs back in this call (full, or not answering): what they gave
        # back goes to the others first, whatever the router would choose.
        passed: set[str] = set()
        while left and self._enabled.is_set():
            workers = [w for w in self._live_workers() if w.uri not in passed]
            if not workers:
                if not passed:
                    log.warning("no live worker for %d runs; waiting", len(left))
                self._requeue(left, delay=0.2 if passed else 0.5)
                return
            routes = self._route(left, workers)
            routed = {(r["run_id"], r["attempt"]) for chunk in routes.values() for r in chunk}
            retry = [r for r in left if (r["run_id"], r["attempt"]) not in routed]
            # Send to every worker at once: each call waits for that worker's claim in the
            # database, and those waits should overlap, not add up.
            futures = {uri: self._send_async(uri, chunk) for uri, chunk in routes.items()}
            concurrent.futures.wait(futures.values(), timeout=SEND_WAIT)
            before = len(passed)
            for uri, chunk in routes.items():
                given_back = self._answer(uri, chunk, futures[uri])
                if given_back:
                    passed.add(uri)
                    retry.extend(given_back)
            if not self._enabled.is_set():
                return
            if len(passed) == before and len(retry) == len(left) and retry:
                self._requeue(retry, delay=0.2)  # routed to nobody: try again later
                return
            left = retry

    def _answer(self, uri: str, chunk: list[RunRecord],
                future: concurrent.futures.Future[list[RunRecord]]) -> list[RunRecord]:
        """The runs of ``chunk`` that ``uri`` gave back, from its answer."""
        if not future.done():
            # A worker whose claim hangs (its database path stalled) must not hold the runs
            # of every other worker: its runs go elsewhere now, and it gets none until it
            # answers. A late claim that commits is harmless: only one claim of a run
            # attempt commits.
            log.warning("worker %s has not answered within %gs; sending its %d runs "
                        "elsewhere", uri, SEND_WAIT, len(chunk))
            return chunk
        try:
            return future.result()
        except Exception:  # a bug, not a worker's answer: this thread must go on
            log.exception("sending %d runs to worker %s failed", len(chunk), uri)
            self._down[uri] = time.monotonic() + DOWN_FOR
            return chunk

    def _send_async(self, uri: str, chunk: list[RunRecord]) -> concurrent.futures.Future[
            list[RunRecord]]:
        """Send on a sender thread; the worker is busy (routed around) until it answers."""
        with self._proxies_lock:
            self._busy.add(uri)
        future = self._senders.submit(self._send, uri, chunk)

        def answered(_: concurrent.futures.Future[list[RunRecord]]) -> None:
            with self._proxies_lock:
                self._busy.discard(uri)

        future.add_done_callback(answered)
        return future

    def _requeue(self, runs: list[RunRecord], delay: float) -> None:
        self._stopped.wait(delay)
        with self._cond:
            if self._enabled.is_set():
                self._queue.extendleft(reversed(runs))

    def _live_workers(self) -> list[MemberInfo]:
        now = time.monotonic()
        if now - self._workers_at > REFRESH_WORKERS:
            try:
                self._workers = [
                    m for m in self.members() if "worker" in m.roles and m.uri and m.capacity > 0
                ]
                self._workers_at = now
            except Exception as e:  # membership reads go through a backend: keep the old list
                log.warning("cannot list workers: %s", e)
        with self._proxies_lock:
            busy = set(self._busy)
        return [w for w in self._workers
                if self._down.get(w.uri or "", 0.0) <= now and w.uri not in busy]

    def _route(
        self, runs: list[RunRecord], workers: list[MemberInfo]
    ) -> dict[str, list[RunRecord]]:
        """Each worker's share, by ``[dispatch] strategy`` (``leader/routing.py``); a run a
        router leaves out, or gives to no worker of ``workers``, waits for the next try."""
        ordered = sorted(workers, key=lambda w: w.node_id)
        try:
            routes = _checked(self.router.route(runs, ordered, dict(self._load)), runs, ordered)
            if not routes and time.monotonic() >= self._quiet_until:
                self._quiet_until = time.monotonic() + 10.0
                log.warning("the router %s gave none of %d runs to the %d live workers; "
                            "they wait", type(self.router).__name__, len(runs), len(ordered))
            return routes
        except (Exception, SystemExit) as e:  # a user's router: its bug must not stop us
            log.error("the router %s failed (%s: %s); this batch goes round robin",
                      type(self.router).__name__, type(e).__name__, e)
            return _checked(self._fallback.route(runs, ordered, {}), runs, ordered)

    def _send(self, uri: str, chunk: list[RunRecord]) -> list[RunRecord]:
        """Send one chunk; return the runs to try elsewhere."""
        if not self._enabled.is_set():
            return []  # stepped down meanwhile: the next leader sends what is left
        try:
            with metrics.DISPATCH_SECONDS.time():
                raw = self._call(uri, chunk)
        except (Pyro5.errors.CommunicationError, OSError) as e:
            metrics.DISPATCH_REFUSED.labels(reason="unreachable").inc(len(chunk))
            log.warning("worker %s unreachable (%s); trying the next one", uri, e)
            self._down[uri] = time.monotonic() + DOWN_FOR
            self._drop_proxy(uri)
            return chunk
        except Exception as e:  # the worker refused the call as a whole
            metrics.DISPATCH_REFUSED.labels(reason="refused_batch").inc(len(chunk))
            log.error("worker %s refused a batch: %s", uri, e)
            self._down[uri] = time.monotonic() + DOWN_FOR
            return chunk
        try:
            reply = reply_from_wire(raw, [r["run_id"] for r in chunk])
        except InputError as e:
            metrics.DISPATCH_REFUSED.labels(reason="bad_reply").inc(len(chunk))
            log.error("worker %s sent a reply that is not one (%s); trying the next one",
                      uri, e)
            self._down[uri] = time.monotonic() + DOWN_FOR
            return chunk
        return self._follow(uri, chunk, reply)

    def _follow(self, uri: str, chunk: list[RunRecord], reply: SubmitReply) -> list[RunRecord]:
        """Act on a checked reply; the runs to send again."""
        with self._proxies_lock:
            self.sent += len(reply.accepted)
        self._load[uri] = float(reply.inflight)
        self._answered[uri] = time.monotonic()
        for why, n in collections.Counter(why for _, why in reply.refused).items():
            metrics.DISPATCH_REFUSED.labels(reason=str(why).replace(" ", "_")).inc(n)
        if any(why == Refusal.STALE_EPOCH for _, why in reply.refused):
            log.warning("worker %s has seen a newer epoch (%d) than %d", uri, reply.epoch,
                        self.epoch)
            self.stop()
            self.on_stale(f"worker {uri} has seen a newer epoch")
            return []
        again = {run_id for run_id, why in reply.refused if why in SEND_AGAIN}
        if again:
            self._down[uri] = time.monotonic() + 0.1
        return [r for r in chunk if r["run_id"] in again]

    def _pyro_proxy(self, uri: str) -> WorkerProxy:
        p: WorkerProxy = proxy(uri, self.secret, self.timeout)
        return p

    def _proxy(self, uri: str) -> WorkerProxy:
        # One proxy per worker; a send thread claims it for its call (Pyro5 wants one
        # owner at a time, and only one call per worker is under way at once).
        with self._proxies_lock:
            c = self._proxies.get(uri)
            if c is None:
                stack = contextlib.ExitStack()
                c = self._proxies[uri] = _Connection(stack.enter_context(self.connect(uri)),
                                                     stack)
        c.proxy._pyroClaimOwnership()
        return c.proxy

    def _call(self, uri: str, chunk: list[RunRecord]) -> object:
        wire = [to_wire(run) for run in chunk]
        try:
            return self._proxy(uri).submit(self.epoch, wire)
        except Pyro5.errors.ConnectionClosedError:
            # An idle connection closed by the worker's timeout: reconnect once. Safe to
            # resend: the worker refuses attempts it already took.
            self._drop_proxy(uri)
            return self._proxy(uri).submit(self.epoch, wire)

    def _drop_proxy(self, uri: str) -> None:
        with self._proxies_lock:
            c = self._proxies.pop(uri, None)
        if c is not None:
            self._close(c)

    @staticmethod
    def _close(c: _Connection) -> None:
        try:
            c.close()
        except Exception:  # releasing a broken proxy: nothing to do
            log.debug("proxy release failed", exc_info=True)


def _checked(routes: Mapping[str, Sequence[RunRecord]], runs: list[RunRecord],
             workers: list[MemberInfo]) -> dict[str, list[RunRecord]]:
    """What a router said, kept to the batch's own runs and the workers offered: a run
    given twice goes to the first only, one left out waits for the next try."""
    uris = {w.uri for w in workers}
    by_key = {(r["run_id"], r["attempt"]): r for r in runs}
    out: dict[str, list[RunRecord]] = {}
    for uri, chunk in routes.items():
        if not isinstance(uri, str) or uri not in uris:
            continue
        for run in chunk:
            run_id, attempt = (run.get("run_id"), run.get("attempt")) if isinstance(
                run, dict) else (None, None)
            found = (by_key.pop((run_id, attempt), None)
                     if isinstance(run_id, int) and isinstance(attempt, int) else None)
            if found is not None:
                out.setdefault(uri, []).append(found)
    return out
