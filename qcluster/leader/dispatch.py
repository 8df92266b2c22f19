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

A run's *routing* (``RunRecord["routing"]``, its row's; docs/DESIGN.md, "Routing") narrows
where it may go, and no run waits on another's account (the loop never sleeps for one):

* ``tags``: only to a live worker that declares them all. While a live worker has them
  but is busy or full, the run is *held* and tried again in :data:`HOLD_FOR`; while none
  has them, it is *parked* until the member list changes (for at most :data:`PARK_FOR`:
  recovery sends an unsent run again every pass, and records it ``missed`` past its grace,
  saying no live worker has those tags).
* ``route``: the job's own strategy (``leader/routing.py``), over the workers it may use.
* ``worker``: a broadcast job's run goes to that worker only: held while it is busy,
  parked while it is not a live member (missed past its grace, saying so).
* ``group``: to the worker its affinity group sits on (``store/groups.py``), held while
  that worker is busy or full, never sent to another while it is a live member. A group
  with no worker yet, or whose worker is no longer a live member, is placed on one (the
  live worker with the group's tags of highest rendezvous weight for the group), written
  fenced through ``groups`` before any of its runs is sent there; so every run of the
  group goes to one worker, and a new leader reads the same placement.
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
from qcluster.leader.routing import STRATEGIES, RoundRobin, Router, make_router, rendezvous
from qcluster.rpc.pyro import proxy
from qcluster.store.records import (
    ANYWHERE,
    Refusal,
    Routing,
    RunRecord,
    SubmitReply,
    reply_from_wire,
    routing_of,
    to_wire,
)

log = logging.getLogger(__name__)

REFRESH_WORKERS = 1.0
DOWN_FOR = 2.0
#: How long a batch waits for a worker's answer before its runs go to the others.
SEND_WAIT = 2.0
#: Refusals whose runs are sent again (elsewhere, or a moment later).
SEND_AGAIN = frozenset({Refusal.BUSY, Refusal.SHUTTING_DOWN, Refusal.UNAVAILABLE})
#: A full worker's load older than this is asked again (an empty batch), for the bulk lane.
BULK_PROBE = 0.1  # at 0.5 s, 8 idle slots of quick runs drained 16 backfill runs a second
#: A held run (its group's worker, or every worker with its tags, busy or full) is tried
#: again this soon, without holding up any other run.
HOLD_FOR = 0.05
#: How long a parked run (no live worker has its tags) waits for the member list to
#: change; recovery hands it over again meanwhile (every pass, until its grace ends).
PARK_FOR = 30.0
#: Parked runs kept at most (the others are dropped: recovery sends them again).
PARK_MAX = 100_000
#: A group whose placement could not be read or written is tried again this soon.
GROUP_RETRY = 1.0


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


class Groups(Protocol):
    """Where affinity groups sit (``qc_groups``), for the leader of one epoch."""

    def load(self) -> dict[str, str]:
        """Every group's worker (node id). QClusterError if it cannot be read."""
        ...

    def place(self, group: str, node_id: str) -> None:
        """Record that ``group`` sits on ``node_id``, fenced on the leader's epoch (the
        leader steps down on a stale one). Raises if it was not written."""
        ...


#: Why a run was not routed in one try: held (tried again soon) or parked (no live
#: worker has its tags: waits for the member list to change).
_HOLD, _PARK = "hold", "park"


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
        groups: Groups | None = None,
    ) -> None:
        """``connect`` makes the connection to a worker's URI; by default an authenticated
        Pyro5 proxy (``qcluster.rpc.pyro.proxy`` with ``secret`` and ``timeout``).
        ``groups``: where affinity groups sit; without it, a run of a group waits (held)."""
        self.epoch = epoch
        self.secret = secret
        self.timeout = timeout
        self.connect: Connect = connect or self._pyro_proxy
        self.router = make_router(strategy) if isinstance(strategy, str) else strategy
        self._fallback = RoundRobin()
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
        # Runs of a routing that could not go now (module doc): by (run id, attempt).
        self._held: dict[tuple[int, int], RunRecord] = {}
        self._held_until = 0.0
        self._parked: dict[tuple[int, int], tuple[RunRecord, float]] = {}
        self._members_seen: frozenset[tuple[str, tuple[str, ...]]] = frozenset()
        self.groups = groups
        self._placed: dict[str, str] | None = None  # group -> node id, once read
        self._groups_retry = 0.0
        self._routers: dict[str, Router] = {}  # a job's own strategy's router
        self._quiet: dict[str, float] = {}  # a warning's next time, by its kind

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
            self._held.clear()
            self._parked.clear()
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
        """Runs queued and not yet sent, in both lanes, held or parked."""
        with self._cond:
            return len(self._queue) + len(self._bulk) + len(self._held) + len(self._parked)

    def placements(self) -> dict[str, str]:
        """The affinity groups this dispatcher has read or placed: group -> node id."""
        with self._cond:
            return dict(self._placed or {})

    # -- the loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while self._enabled.is_set():
                if self._parked:
                    self._live_workers()  # a member list read again may unpark them
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
            self._release_held()
            if not self._queue and not self._bulk:
                wait = 0.5
                if self._held:
                    wait = max(0.0, min(wait, self._held_until - time.monotonic()))
                self._cond.wait(wait)
                self._release_held()
            n = min(len(self._queue), self.batch_size)
            return [self._queue.popleft() for _ in range(n)]

    def _release_held(self) -> None:
        """Held runs whose wait is over go to the front of the queue (under the lock)."""
        if self._held and time.monotonic() >= self._held_until:
            self._queue.extendleft(reversed(list(self._held.values())))
            self._held.clear()

    def _hold(self, runs: list[RunRecord], delay: float = HOLD_FOR) -> None:
        with self._cond:
            if not self._enabled.is_set():
                return
            if not self._held:
                self._held_until = time.monotonic() + delay
            self._held.update(((r["run_id"], r["attempt"]), r) for r in runs)

    def _park(self, runs: list[RunRecord]) -> None:
        now = time.monotonic()
        with self._cond:
            if not self._enabled.is_set():
                return
            for r in runs:
                if len(self._parked) >= PARK_MAX:
                    break
                self._parked.setdefault((r["run_id"], r["attempt"]), (r, now))
            parked = len(self._parked)
        self._warn("park", f"{parked} runs wait for a live worker that their tags or "
                           "group allow (recorded missed past their misfire grace)")

    def _unpark(self, changed: bool) -> None:
        """The member list was read again: if it ``changed``, every parked run is tried
        again; runs parked longer than PARK_FOR are dropped (recovery has them)."""
        now = time.monotonic()
        with self._cond:
            if changed:
                runs = [r for r, _ in self._parked.values()]
                self._parked.clear()
                self._queue.extendleft(reversed(runs))
            else:
                for key in [k for k, (_, at) in self._parked.items() if now - at > PARK_FOR]:
                    del self._parked[key]

    def _warn(self, kind: str, message: str) -> None:
        """Log ``message`` at most every 10 s per ``kind``."""
        now = time.monotonic()
        if now >= self._quiet.get(kind, 0.0):
            self._quiet[kind] = now + 10.0
            log.warning("%s", message)

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
        routes, later = self._fill(batch, room)
        if later:  # to the back: the runs behind them may go meanwhile
            with self._cond:
                self._bulk_keys.update((r["run_id"], r["attempt"]) for r in later)
                self._bulk.extend(later)
        futures = {uri: self._send_async(uri, chunk) for uri, chunk in routes.items() if chunk}
        if not futures:
            with self._cond:
                self._cond.wait(0.1)
            return
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

    def _fill(self, batch: list[RunRecord], room: dict[str, int]
              ) -> tuple[dict[str, list[RunRecord]], list[RunRecord]]:
        """The bulk runs of ``batch`` for each worker's free slots (``room``, by URI), each
        to a worker its routing allows; and those that fit in none now."""
        if not any("routing" in r for r in batch):
            rest = iter(batch)
            return {uri: list(itertools.islice(rest, free)) for uri, free in room.items()}, []
        free = dict(room)
        members = sorted((w for w in self._workers if w.uri in free), key=lambda w: w.node_id)
        routes: dict[str, list[RunRecord]] = {}
        later: list[RunRecord] = []
        for run in batch:
            want = routing_of(run.get("routing"))
            offered = members if want == ANYWHERE else self._offered(want, members)[0]
            uri = next((w.uri for w in offered if w.uri and free.get(w.uri, 0) > 0), None)
            if uri is None:
                later.append(run)
                continue
            free[uri] -= 1
            routes.setdefault(uri, []).append(run)
        return routes, later

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
            routes, aside = self._route(left, workers)
            routed = {(r["run_id"], r["attempt"]) for chunk in routes.values() for r in chunk}
            retry = [r for r in left
                     if (r["run_id"], r["attempt"]) not in routed | aside]
            if not routes and not retry:
                return  # every run was held or parked
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
                self._workers = [m for m in self.members() if m.takes_runs]
                self._workers_at = now
                seen = frozenset((m.node_id, tuple(m.tags)) for m in self._workers)
                self._unpark(changed=seen != self._members_seen)
                self._members_seen = seen
            except Exception as e:  # membership reads go through a backend: keep the old list
                log.warning("cannot list workers: %s", e)
        with self._proxies_lock:
            busy = set(self._busy)
        return [w for w in self._workers
                if self._down.get(w.uri or "", 0.0) <= now and w.uri not in busy]

    def _route(
        self, runs: list[RunRecord], workers: list[MemberInfo]
    ) -> tuple[dict[str, list[RunRecord]], set[tuple[int, int]]]:
        """Each worker's share: by each run's routing (module doc), then by its job's
        strategy or ``[dispatch] strategy`` (``leader/routing.py``); and the (run id,
        attempt) of the runs that cannot go now, held or parked (in no share). A run a
        router leaves out, or gives to no worker of ``workers``, waits for the next try."""
        ordered = sorted(workers, key=lambda w: w.node_id)
        if not any("routing" in r for r in runs):
            return self._by_router(self.router, runs, ordered), set()
        by_routing: dict[Routing, list[RunRecord]] = {}
        for r in runs:
            by_routing.setdefault(routing_of(r.get("routing")), []).append(r)
        out: dict[str, list[RunRecord]] = {}
        held: list[RunRecord] = []
        parked: list[RunRecord] = []
        for want, chunk in by_routing.items():
            offered, fate = self._offered(want, ordered)
            if fate == _HOLD:
                held.extend(chunk)
            elif fate == _PARK:
                parked.extend(chunk)
            else:
                router = self.router if want.route is None else self._router(want.route)
                for uri, share in self._by_router(router, chunk, offered).items():
                    out.setdefault(uri, []).extend(share)
        if held:
            self._hold(held, GROUP_RETRY if time.monotonic() < self._groups_retry
                       else HOLD_FOR)
        if parked:
            self._park(parked)
        return out, {(r["run_id"], r["attempt"]) for r in (*held, *parked)}

    def _by_router(self, router: Router, runs: list[RunRecord],
                   ordered: list[MemberInfo]) -> dict[str, list[RunRecord]]:
        try:
            routes = _checked(router.route(runs, ordered, dict(self._load)), runs, ordered)
            if not routes:
                self._warn("router", f"the router {type(router).__name__} gave none of "
                                     f"{len(runs)} runs to the {len(ordered)} live workers; "
                                     "they wait")
            return routes
        except (Exception, SystemExit) as e:  # a user's router: its bug must not stop us
            log.error("the router %s failed (%s: %s); this batch goes round robin",
                      type(router).__name__, type(e).__name__, e)
            return _checked(self._fallback.route(runs, ordered, {}), runs, ordered)

    def _router(self, name: str) -> Router:
        """The router of a job's own ``route`` (a built-in strategy; else the cluster's)."""
        router = self._routers.get(name)
        if router is None:
            made = STRATEGIES.get(name)
            router = self._routers[name] = made() if made is not None else self.router
        return router

    def _offered(self, want: Routing, ordered: list[MemberInfo]
                 ) -> tuple[list[MemberInfo], str | None]:
        """The workers of ``ordered`` (live, free now) that runs of routing ``want`` may
        go to; or none, and whether they are held or parked."""
        if want == ANYWHERE:
            return ordered, None
        if want.worker is not None:  # a broadcast job's run: on its own worker only
            able = [w for w in ordered if w.node_id == want.worker]
            if able:
                return able, None
            live = any(w.node_id == want.worker for w in self._workers)
            return [], _HOLD if live else _PARK
        if want.group is not None:
            node = self._group_worker(want)
            if node is None:
                return [], _HOLD if self._some_member_has(want.tags) else _PARK
            if not any(w.node_id == node and want.tags <= set(w.tags) for w in self._workers):
                return [], _PARK  # its group's worker lacks its tags: until members change
            able = [w for w in ordered if w.node_id == node]
            return (able, None) if able else ([], _HOLD)
        able = [w for w in ordered if want.tags <= set(w.tags)]
        if able:
            return able, None
        # Not now: held while a live member could take them (busy, full, set aside a
        # moment), parked while none can.
        return [], _HOLD if self._some_member_has(want.tags) else _PARK

    def _some_member_has(self, tags: frozenset[str]) -> bool:
        return any(tags <= set(w.tags) for w in self._workers)

    def _group_worker(self, want: Routing) -> str | None:
        """The node id of the live worker that ``want.group`` sits on, placing (or
        moving) the group first if it sits on none; None if that cannot be done now."""
        group = want.group
        assert group is not None
        if self._placed is None:
            if self.groups is None or time.monotonic() < self._groups_retry:
                return None
            try:
                self._placed = dict(self.groups.load())
            except Exception as e:  # a database that does not answer: try again soon
                self._groups_retry = time.monotonic() + GROUP_RETRY
                self._warn("groups", f"cannot read where affinity groups sit: {e}")
                return None
        live = {w.node_id: w for w in self._workers}
        node = self._placed.get(group)
        if node is not None and node in live:
            return node
        able = [w for w in self._workers if want.tags <= set(w.tags)]
        if not able or self.groups is None or time.monotonic() < self._groups_retry:
            return None
        chosen = max(able, key=lambda w: rendezvous(group, w.node_id)).node_id
        try:
            self.groups.place(group, chosen)
        except Exception as e:  # not written: no run of the group goes anywhere yet
            self._groups_retry = time.monotonic() + GROUP_RETRY
            self._warn("groups", f"cannot place affinity group {group!r}: {e}")
            return None
        with self._cond:
            self._placed[group] = chosen
        if node is None:
            log.info("affinity group %r is placed on worker %s", group, chosen)
        else:
            log.warning("affinity group %r moves from worker %s (not a live member) to %s",
                        group, node, chosen)
        return chosen

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
