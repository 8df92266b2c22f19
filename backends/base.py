"""The coordination backend interface, and the rules every backend keeps.

A backend settles which scheduler node may try to lead, and keeps the list of live
members. It is built from a few atomic operations; the leadership loop (campaign, renew,
step down) is written once, in :mod:`qcluster.leader.election`, on top of them. The SQL
epoch fences every write (docs/DESIGN.md invariants 1 and 2): a backend is an efficiency
lock, and its tokens are what lets the epoch refuse a stale holder.

Each method states its own contract below. The contract suite in ``tests/backends`` checks
them on every backend (``test_contract.py``) and injects each backend's own failures
(``test_failures.py``). The rules that span methods:

* **Tokens.** A new lease's token is greater than any earlier one on this backend and at
  least ``min_token + 1``. Two exceptions, both stated where they apply: a ZooKeeper
  holder that resumes its own claim from the same session gets that claim's token back
  (raised if ``min_token`` asks for more), and a Redis master that lost its data has lost
  its counter too, so after that only ``min_token`` keeps tokens growing.
* **One holder.** At most one unexpired lease exists at a time, as far as the server can
  tell. A lease may be gone on the server before its holder hears of it: the holder acts
  only until its local deadline (:attr:`Lease.valid_for`), and the epoch fences the rest.
* **Loss.** A lease is *lost* when the backend can no longer promise that nobody else
  holds it: it expired, was taken or deleted, its session was suspended or ended. Giving
  a lease up (``release``) is not losing it. ``on_lost`` is called at most once per lease
  (a joint lease: once per part), from whatever thread learnt of the loss (a driver's
  thread; the caller of ``renew``, ``publish_leader`` or ``stop``; on ``memory``, another
  node's ``try_acquire`` or the test that injects the loss); an exception it raises is
  logged, not propagated. It must not block and must not call the backend (it may run
  while the backend holds a lock of its own: ``zookeeper`` reports a loss found by
  ``renew`` under its campaign lock). The leadership loop's callback only halts the
  leader and wakes the loop. Backends report each loss through :class:`LossReport`,
  which keeps the once-only rule.
* **Threads.** Every method may be called from any thread, concurrently with the others
  (the leadership loop, its renew thread, the heartbeat thread and the leader's
  maintenance and dispatch threads all share one instance).
* **Errors.** The methods raise only :class:`~qcluster.errors.QClusterError` subclasses;
  driver exceptions become :class:`~qcluster.errors.BackendUnavailable` (for ``dblock``
  its subclass :class:`~qcluster.errors.DatabaseUnavailable`) at the boundary. A call
  that raised ``BackendUnavailable`` may be tried again.
* **Life cycle.** Call ``start()`` before anything else. ``zookeeper``, ``redis`` and
  ``memory`` need it: a call that must reach their server raises ``BackendUnavailable``
  before ``start()`` and after ``stop()``. ``dblock`` works on the database it was given.

:class:`LossReport`, :func:`member_to_dict`/:func:`member_from_dict` and
:func:`leader_to_dict`/:func:`leader_from_dict` are written once here for every backend:
the once-only loss rule, and how member and leader records are stored.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import threading
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, ClassVar

log = logging.getLogger(__name__)

LossCallback = Callable[[str], None]
"""Called with a one-line reason when a lease is lost (see the module docstring)."""


@dataclasses.dataclass(frozen=True)
class Lease:
    """A claim on leadership.

    ``valid_for`` is how long, in seconds from the moment the acquire or the last
    successful renew was *sent*, the holder may act as leader without hearing from the
    server again. The leadership loop turns it into a local monotonic deadline.
    """

    backend: str
    holder: str
    token: int
    valid_for: float
    parts: tuple[Lease, ...] = ()  # a joint lease (backends.joint): one lease per backend

    @property
    def backends(self) -> tuple[str, ...]:
        """The backends this lease holds a claim on, in the order they were taken."""
        return tuple(p.backend for p in self.parts) if self.parts else (self.backend,)

    @property
    def tokens(self) -> dict[str, int]:
        """Each backend's token."""
        if self.parts:
            return {p.backend: p.token for p in self.parts}
        return {self.backend: self.token}

    def part(self, backend: str) -> Lease | None:
        """This lease's claim on ``backend``, if it holds one."""
        if not self.parts:
            return self if self.backend == backend else None
        return next((p for p in self.parts if p.backend == backend), None)


@dataclasses.dataclass(frozen=True)
class LeaderInfo:
    """Who leads, as published by the leader: readable by every node and the CLI."""

    node_id: str
    uri: str
    epoch: int
    since: float  # seconds since the Unix epoch, UTC


@dataclasses.dataclass(frozen=True)
class MemberInfo:
    """One node of the cluster, as it registered itself."""

    node_id: str
    session: str  # a random id per process, so that a restart is a new incarnation
    roles: tuple[str, ...]
    uri: str | None = None  # the worker's Pyro5 URI, if it runs jobs
    capacity: int = 0
    tags: tuple[str, ...] = ()
    # the backends this node's config can use; the first is the one its config names
    backends: tuple[str, ...] = ()
    config_version: int = 0  # the cluster config version (phase) this node honours; 0: none
    started_version: int = 0  # the cluster config version when this process started
    status: str = ""  # a one-line status, e.g. why a node does not campaign
    last_seen: float | None = None  # filled in by the backend on read

    @property
    def takes_runs(self) -> bool:
        """Whether runs can be sent to it: a worker, with an RPC address and a slot."""
        return "worker" in self.roles and bool(self.uri) and self.capacity > 0


class CoordinationBackend(abc.ABC):
    """A small set of atomic operations that leadership and membership are built on."""

    name: ClassVar[str]

    def start(self) -> None:  # noqa: B027 - a backend without a connection has nothing to do
        """Connect, or prepare to. Idempotent.

        It may connect lazily (``redis``: the first command opens the connections), so a
        start that returns does not promise that the server answers. Raises
        :class:`~qcluster.errors.BackendUnavailable` when it cannot connect (``zookeeper``
        gives up after ``max(session_timeout, 5)`` seconds), or
        :class:`~qcluster.errors.ConfigError` for a setting the driver refuses.
        """

    def stop(self) -> None:  # noqa: B027 - a backend without a connection has nothing to do
        """Disconnect. Idempotent.

        What it leaves behind differs, so callers ``release`` their lease and
        ``remove_member`` their entry first (``Node.stop`` does):

        * ``zookeeper`` closes its session: the server deletes its election node and
          member nodes, and ``on_lost`` is called for a lease still held;
        * ``redis`` releases the leases it holds and removes the members it registered
          (owner- and session-checked), without calling ``on_lost``;
        * ``memory`` releases its lease and removes its members, without ``on_lost``;
        * ``dblock`` leaves its lease row to expire and its member rows to time out.
        """

    def __enter__(self) -> CoordinationBackend:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- leadership -------------------------------------------------------------------

    @abc.abstractmethod
    def try_acquire(self, holder: str, on_lost: LossCallback, min_token: int = 0) -> Lease | None:
        """Take the lease for ``holder`` if it is free; ``None`` if it is held.

        Never waits for another holder to let go; each server call is bounded (the
        database's timeouts, ``valid_for`` per ZooKeeper call, the socket timeout per
        Redis master).

        * A lease returned has ``backend == self.name``, ``holder == holder``,
          ``valid_for > 0``, and a token greater than any earlier one on this backend and
          at least ``min_token + 1`` (see Tokens in the module docstring).
        * ``None`` while anyone holds an unexpired lease, another holder on this very
          instance included. A holder asking again for the lease it holds gets ``None``
          (``dblock``, ``redis``, ``memory``), or, on ``zookeeper``, its own claim back
          from the same session: the same token unless ``min_token`` asks for more. That
          is how a holder resumes a claim kept through a SUSPENDED connection.
        * ``on_lost`` is kept for the lease returned, and called at most once, when the
          backend learns that the lease is lost. It is not called for a lease that
          ``release`` has given up (a report already under way may still finish).
        * Raises :class:`~qcluster.errors.BackendUnavailable` when it cannot tell (the
          server unreachable, ``redis``: fewer than a majority of masters answered).
          Then the caller holds nothing: a claim the server may have kept anyway is
          given back, or blocks others only until it expires.

        Not idempotent: each call is a new campaign.
        """

    @abc.abstractmethod
    def renew(self, lease: Lease) -> bool:
        """Keep ``lease``: ``True`` if it is still held, ``False`` if it is gone for sure.

        * ``True``: the holder may act as leader for ``lease.valid_for`` seconds from the
          moment this call was sent (``dblock`` and ``redis`` push the expiry forward;
          ``zookeeper`` checks that the session and the election node are still there,
          the session keeping the claim alive).
        * ``False``: the lease expired, was taken or deleted, or its session ended. The
          backend calls ``on_lost`` before returning, unless it already did. ``False``
          too, without ``on_lost``, for a lease that was released. Once ``False``, always
          ``False`` for that lease: the holder campaigns anew.
        * Raises :class:`~qcluster.errors.BackendUnavailable` when it cannot tell (no
          answer, a ZooKeeper connection SUSPENDED, too few Redis masters). The caller
          keeps its local deadline and steps down when it passes.

        Idempotent; safe to call while ``on_lost`` runs on another thread.
        """

    @abc.abstractmethod
    def release(self, lease: Lease) -> None:
        """Give ``lease`` up, if it is still held. Idempotent.

        Owner-checked: it deletes only the claim that acquire made, never another
        holder's, so a stale holder's late release leaves the new lease alone. ``dblock``
        compares the holder and the token; ``redis`` the random owner value of that
        acquire, ``zookeeper`` its election node and ``memory`` its instance, so there a
        lease that this instance did not acquire is ignored. After it returns
        ``on_lost`` is not called for that lease, ``renew`` returns ``False``, and
        ``read_leader`` no longer returns what was published under it; normally the lease
        is free for another holder at once (a server that did not answer frees it when
        the claim expires).

        May raise :class:`~qcluster.errors.BackendUnavailable`; the claim then expires on
        its own. ``redis`` and ``zookeeper`` swallow a server's failure here (they log it
        and let the claim expire, or sweep it later) and raise only when not started.
        """

    # -- leader publication ----------------------------------------------------------

    @abc.abstractmethod
    def publish_leader(self, lease: Lease, info: LeaderInfo) -> None:
        """Record ``info`` as the leader's, only while ``lease`` is held.

        The check and the write are one atomic step on the server (a transaction on
        ``dblock`` and ``zookeeper``, a compare-and-set script on each Redis master). If
        the lease is gone it writes nothing and reports the loss (``on_lost``, once); a
        lease whose loss was already reported is ignored. Published info lives no longer
        than its lease (see :meth:`read_leader`). Idempotent: the last write wins.

        Raises :class:`~qcluster.errors.BackendUnavailable` when it cannot write.
        """

    @abc.abstractmethod
    def read_leader(self) -> LeaderInfo | None:
        """The info published under the lease that is held now, as any instance sees it.

        ``None`` if no unexpired lease is held, or its holder has not published. Info
        published under an earlier lease is not returned; ``dblock`` tells leases apart
        by node id only, so a node that leads again shows its earlier info until it
        publishes, and it reads ``epoch`` from the cluster row (the cluster's epoch),
        not from the published info. Read-only. Raises
        :class:`~qcluster.errors.BackendUnavailable` (``redis``: fewer than a majority of
        masters answered).
        """

    # -- membership ------------------------------------------------------------------

    @abc.abstractmethod
    def heartbeat_member(self, member: MemberInfo) -> None:
        """Register ``member``, or refresh its liveness and every field. Idempotent.

        There is one entry per node id: a new incarnation (another ``session``) replaces
        the old one's. Every field is stored except ``last_seen``, which the backend sets
        on read. ``zookeeper`` re-registers the members it was given after a new session,
        by itself; the others wait for the next heartbeat.

        Raises :class:`~qcluster.errors.BackendUnavailable` (``redis``: only if no
        master answered), :class:`~qcluster.errors.InputError` for a node id the backend
        cannot store (``zookeeper``: one that is no valid node name).
        """

    @abc.abstractmethod
    def remove_member(self, member: MemberInfo) -> None:
        """Take ``member`` off the list: only this incarnation's entry (same node id and
        session); another incarnation's is left alone. Idempotent: an entry already gone
        is no error. Raises :class:`~qcluster.errors.BackendUnavailable`."""

    @abc.abstractmethod
    def live_members(self) -> list[MemberInfo]:
        """The members whose liveness signal has not timed out, sorted by node id.

        A member drops out once ``member_timeout`` seconds have passed since its last
        heartbeat, on the server's clock (``zookeeper`` also drops it when its session
        ends). Each entry is what was heartbeated, with ``last_seen`` filled in: seconds
        since the Unix epoch on the server's clock, comparable only with other
        ``last_seen`` of the same backend. Raises
        :class:`~qcluster.errors.BackendUnavailable` (``redis``: only if no master
        answered; the answers are merged, keeping each node's freshest entry).
        """


class LossReport:
    """One lease's ``on_lost``, called at most once: every backend keeps one per lease.

    ``report`` calls the callback the first time only, and logs (does not propagate) an
    exception it raises; ``cancel`` (the lease was released) makes later reports do
    nothing. Thread-safe: the callback runs on the reporting thread, outside this
    object's lock.
    """

    def __init__(self, callback: LossCallback) -> None:
        self._callback: LossCallback | None = callback
        self._lock = threading.Lock()

    @property
    def done(self) -> bool:
        """Reported or cancelled: the lease is not to be led on, nor reported again."""
        with self._lock:
            return self._callback is None

    def report(self, reason: str) -> bool:
        """Call the callback with ``reason`` unless it was called or cancelled before.
        Whether this call reported."""
        with self._lock:
            callback, self._callback = self._callback, None
        if callback is None:
            return False
        log.warning("leadership lost: %s", reason)
        try:
            callback(reason)
        except Exception:
            log.exception("on_lost callback failed")
        return True

    def cancel(self) -> None:
        """Never report: the lease was given up, which is not a loss."""
        with self._lock:
            self._callback = None


# -- how member and leader records are stored ------------------------------------------

_MEMBER_FIELDS = tuple(f.name for f in dataclasses.fields(MemberInfo) if f.name != "last_seen")
_LEADER_FIELDS = tuple(f.name for f in dataclasses.fields(LeaderInfo))
_SEQUENCES = ("roles", "tags", "backends")


def member_to_dict(member: MemberInfo) -> dict[str, Any]:
    """``member`` as JSON-able fields, without ``last_seen`` (the backend's to fill in)."""
    fields = {name: getattr(member, name) for name in _MEMBER_FIELDS}
    for key in _SEQUENCES:
        fields[key] = list(fields[key])
    return fields


def member_from_dict(fields: Mapping[str, Any], last_seen: float | None) -> MemberInfo:
    """A member read back from ``fields``: a field this version does not know (a newer
    node wrote it) is ignored, a missing one takes its default, and the sequences become
    tuples (empty if missing). ``last_seen`` is the server's time of the last heartbeat."""
    known: dict[str, Any] = {k: fields[k] for k in _MEMBER_FIELDS if k in fields}
    for key in _SEQUENCES:
        known[key] = tuple(known.get(key) or ())
    return MemberInfo(**known, last_seen=last_seen)


def leader_to_dict(info: LeaderInfo) -> dict[str, Any]:
    """``info`` as JSON-able fields."""
    return dataclasses.asdict(info)


def leader_from_dict(fields: Mapping[str, Any]) -> LeaderInfo:
    """Leader info read back from ``fields``, ignoring the ones this version does not
    know (a backend's own, such as ZooKeeper's ``election_node``, or a newer node's)."""
    return LeaderInfo(**{k: fields[k] for k in _LEADER_FIELDS if k in fields})
