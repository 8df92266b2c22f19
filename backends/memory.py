"""``memory``: a coordination backend inside one process, for tests.

A :class:`MemoryServer` plays the coordination server: one lease, the leader info and the
members, every operation atomic under one lock. Each :class:`MemoryBackend` is one
node's connection to it, with a session of its own; several instances that share a
server contend as the nodes of one cluster do. It keeps the rules of
:mod:`backends.base` as the other backends do, and the contract suite runs on it:

* acquire takes the lease if it is free or expired; the token is ``max(counter,
  min_token) + 1`` and the counter keeps it, so tokens only grow;
* renew, release and publish act only on the lease that this instance's session
  acquired for that holder, with that token;
* a lease expires ``lease_seconds`` after the last acquire or renew, on the server's
  clock (``clock``, ``time.time`` unless given: a test may move it); a member drops out
  ``member_timeout`` seconds after its last heartbeat, on the same clock;
* loss is reported (``on_lost``, once) when renew or publish find the lease gone, when
  another holder takes it over after it expired (on that acquirer's thread), and when a
  test injects it.

Failure injection, on a backend instance (one node):

* :meth:`MemoryBackend.lose_lease`: the server takes the lease away now; ``on_lost`` is
  called at once, as a ZooKeeper watch or a refused renew would;
* :meth:`MemoryBackend.expire_session`: the session ends as a ZooKeeper session expires:
  its lease is lost and its member entries are gone; the instance goes on with a new
  session (its members come back with their next heartbeat);
* :meth:`MemoryBackend.fail_next`: the next N calls raise
  :class:`~qcluster.errors.BackendUnavailable` and change nothing, as an unreachable
  server would.

Test-only: it cannot be chosen in a config (``backends.names`` does not list it, and
``backends.loader`` refuses the name). A config cannot promise that no other process
shares its database, and a node in another process would see another, empty server:
two leaders, fighting over the epoch.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable

from backends.base import (
    CoordinationBackend,
    LeaderInfo,
    Lease,
    LossCallback,
    LossReport,
    MemberInfo,
    leader_from_dict,
    leader_to_dict,
    member_from_dict,
    member_to_dict,
)
from qcluster.errors import BackendUnavailable


@dataclasses.dataclass
class _Grant:
    """The lease as the server keeps it."""

    session: int
    holder: str
    token: int
    expires_at: float
    loss: LossReport
    info: str | None = None  # the leader info published under this lease (JSON)

    def owned(self, session: int, lease: Lease) -> bool:
        return (self.session, self.holder, self.token) == (session, lease.holder, lease.token)


@dataclasses.dataclass(frozen=True)
class _Entry:
    """A member as the server keeps it: the stored record, whose session wrote it, when."""

    record: str  # JSON, through the codec of backends.base
    member_session: str
    session: int
    seen: float


class MemoryServer:
    """The shared state of :class:`MemoryBackend` instances: one per simulated cluster.

    Thread-safe; no method calls a loss callback while holding the lock. ``clock`` is
    the server's clock (seconds since the Unix epoch): lease expiry and member liveness.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._counter = 0  # the fencing counter: only grows
        self._sessions = 0
        self._grant: _Grant | None = None
        self._members: dict[str, _Entry] = {}

    def new_session(self) -> int:
        with self._lock:
            self._sessions += 1
            return self._sessions

    def acquire(
        self, session: int, holder: str, min_token: int, ttl: float, loss: LossReport
    ) -> int | None:
        with self._lock:
            now, old = self.clock(), self._grant
            if old is not None and old.expires_at >= now:
                return None
            token = self._counter = max(self._counter, min_token) + 1
            self._grant = _Grant(session, holder, token, now + ttl, loss)
        if old is not None:
            old.loss.report("the memory lease expired and another holder took it")
        return token

    def renew(self, session: int, lease: Lease, ttl: float) -> bool:
        with self._lock:
            grant, now = self._grant, self.clock()
            if grant is None or not grant.owned(session, lease) or grant.expires_at < now:
                return False
            grant.expires_at = now + ttl
            return True

    def release(self, session: int, lease: Lease) -> None:
        with self._lock:
            if self._grant is not None and self._grant.owned(session, lease):
                self._grant = None

    def publish(self, session: int, lease: Lease, info: LeaderInfo) -> bool:
        with self._lock:
            grant = self._grant
            if grant is None or not grant.owned(session, lease) or grant.expires_at < self.clock():
                return False
            grant.info = json.dumps(leader_to_dict(info))
            return True

    def read_leader(self) -> LeaderInfo | None:
        with self._lock:
            grant = self._grant
            if grant is None or grant.expires_at < self.clock() or grant.info is None:
                return None
            return leader_from_dict(json.loads(grant.info))

    def heartbeat(self, session: int, member: MemberInfo) -> None:
        record = json.dumps(member_to_dict(member))
        with self._lock:
            entry = _Entry(record, member.session, session, self.clock())
            self._members[member.node_id] = entry

    def remove(self, member: MemberInfo) -> None:
        with self._lock:
            entry = self._members.get(member.node_id)
            if entry is not None and entry.member_session == member.session:
                del self._members[member.node_id]

    def live_members(self, timeout: float) -> list[MemberInfo]:
        with self._lock:
            horizon = self.clock() - timeout
            live = [e for e in self._members.values() if e.seen >= horizon]
        members = [member_from_dict(json.loads(e.record), e.seen) for e in live]
        return sorted(members, key=lambda m: m.node_id)

    def revoke(self, session: int | None, reason: str) -> bool:
        """Take the lease away now (from ``session`` only, unless ``None``), reporting
        the loss to its holder. Whether a lease was taken."""
        with self._lock:
            grant = self._grant
            if grant is None or (session is not None and grant.session != session):
                return False
            self._grant = None
        grant.loss.report(reason)
        return True

    def end_session(self, session: int, reason: str | None) -> None:
        """Drop everything ``session`` holds: its lease (reported lost with ``reason``,
        or given up silently if ``None``) and its member entries."""
        with self._lock:
            grant = self._grant
            if grant is not None and grant.session == session:
                self._grant = None
            else:
                grant = None
            for node_id in [k for k, e in self._members.items() if e.session == session]:
                del self._members[node_id]
        if grant is not None and reason is not None:
            grant.loss.report(reason)


class MemoryBackend(CoordinationBackend):
    """One node's connection to a :class:`MemoryServer`. Not selectable in config."""

    name = "memory"

    def __init__(
        self, server: MemoryServer, *, lease_seconds: float = 10.0, member_timeout: float = 10.0
    ) -> None:
        if lease_seconds <= 0 or member_timeout <= 0:
            raise ValueError("lease_seconds and member_timeout must be positive")
        self.server = server
        self.lease_seconds = lease_seconds
        self.member_timeout = member_timeout
        self._lock = threading.Lock()  # guards the fields below; never held over a report
        self._session: int | None = None  # None: not started
        self._held: dict[tuple[str, int], LossReport] = {}  # leases acquired here
        self._failures = 0
        self._failure_reason = ""

    def __repr__(self) -> str:
        return f"<MemoryBackend session={self._session}>"

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._session is None:
                self._session = self.server.new_session()

    def stop(self) -> None:
        with self._lock:
            session, self._session = self._session, None
            held, self._held = list(self._held.values()), {}
        for loss in held:
            loss.cancel()  # giving up on stop is not a loss
        if session is not None:
            self.server.end_session(session, None)

    # -- failure injection ------------------------------------------------------------

    def lose_lease(self, reason: str = "the memory lease was taken away (injected)") -> bool:
        """The server takes this instance's lease away now; ``on_lost`` is called at once,
        on this thread. Whether there was a lease to lose."""
        return self.server.revoke(self._started(), reason)

    def expire_session(self, reason: str = "the memory session expired (injected)") -> None:
        """End this instance's session: its lease is lost (``on_lost`` at once) and its
        member entries are gone. Later calls run in a new session."""
        with self._lock:
            old = self._session
            if old is None:
                raise BackendUnavailable("the memory backend is not started")
            self._session = self.server.new_session()
        self.server.end_session(old, reason)

    def fail_next(self, calls: int, reason: str = "injected failure") -> None:
        """The next ``calls`` calls of the interface (any but ``start`` and ``stop``; the
        injections do not count) raise BackendUnavailable and change nothing.
        ``fail_next(0)`` heals at once."""
        with self._lock:
            self._failures, self._failure_reason = max(0, calls), reason

    def _call(self, action: str) -> int:
        """This instance's session, for one call; or the injected failure."""
        with self._lock:
            session, failing = self._session, self._failures > 0
            if failing:
                self._failures -= 1
        if session is None:
            raise BackendUnavailable("the memory backend is not started")
        if failing:
            raise BackendUnavailable(f"memory backend unavailable while {action}: "
                                     f"{self._failure_reason}")
        return session

    def _started(self) -> int:
        if (session := self._session) is None:
            raise BackendUnavailable("the memory backend is not started")
        return session

    # -- leadership -------------------------------------------------------------------

    def try_acquire(self, holder: str, on_lost: LossCallback, min_token: int = 0) -> Lease | None:
        session = self._call("campaigning")
        loss = LossReport(on_lost)
        token = self.server.acquire(session, holder, min_token, self.lease_seconds, loss)
        if token is None:
            return None
        with self._lock:
            self._held = {k: v for k, v in self._held.items() if not v.done}
            self._held[(holder, token)] = loss
        return Lease(self.name, holder, token, self.lease_seconds)

    def renew(self, lease: Lease) -> bool:
        session = self._call("renewing the lease")
        with self._lock:
            loss = self._held.get((lease.holder, lease.token))
        if loss is None or loss.done:
            return False  # released, never acquired here, or its loss was reported
        if self.server.renew(session, lease, self.lease_seconds):
            return True
        loss.report("the memory lease expired or was taken")
        return False

    def release(self, lease: Lease) -> None:
        session = self._call("releasing the lease")
        with self._lock:
            loss = self._held.pop((lease.holder, lease.token), None)
        if loss is None:
            return  # not acquired here: another instance's lease is never touched
        loss.cancel()
        self.server.release(session, lease)

    # -- leader publication ----------------------------------------------------------

    def publish_leader(self, lease: Lease, info: LeaderInfo) -> None:
        session = self._call("publishing the leader")
        with self._lock:
            loss = self._held.get((lease.holder, lease.token))
        if loss is None or loss.done:
            return
        if not self.server.publish(session, lease, info):
            loss.report("the memory lease expired or was taken")

    def read_leader(self) -> LeaderInfo | None:
        self._call("reading the leader")
        return self.server.read_leader()

    # -- membership ------------------------------------------------------------------

    def heartbeat_member(self, member: MemberInfo) -> None:
        self.server.heartbeat(self._call("registering a member"), member)

    def remove_member(self, member: MemberInfo) -> None:
        self._call("removing a member")
        self.server.remove(member)

    def live_members(self) -> list[MemberInfo]:
        self._call("listing members")
        return self.server.live_members(self.member_timeout)
