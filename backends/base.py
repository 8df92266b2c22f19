"""The coordination backend interface.

A backend settles which scheduler node leads, and keeps the list of live members. It is
built from a few atomic operations; the leadership loop (campaign, renew, step down) is
written once, in :mod:`qcluster.leader.election`, on top of them.

Rules every backend keeps (the contract suite in ``tests/contract`` checks each one on a
real server):

* ``try_acquire`` never blocks for long: it returns a :class:`Lease` or ``None``.
* A lease's ``token`` is greater than the token of every lease that was acquired before
  it by another holder, and greater than ``min_token``. The same holder may get its own
  token back when it resumes the same claim (a ZooKeeper session that reconnected).
* At most one unexpired lease exists at a time, as far as the server can tell.
* ``on_lost`` is called, from any thread, as soon as the backend learns that the lease
  is gone (expired, taken, session suspended or lost, key deleted). It is called at most
  once per lease and must not block.
* ``renew`` returns ``False`` when the lease is gone, and raises
  :class:`~qcluster.errors.BackendUnavailable` when it cannot tell. The caller decides
  on a local monotonic deadline (``Lease.valid_for``) when to step down.
* ``release`` only ever deletes the caller's own lease (owner-checked).
* Members carry a liveness signal: a member that stops calling ``heartbeat_member``
  drops out of ``live_members`` after the backend's member timeout.

Backends raise only :class:`~qcluster.errors.QClusterError` subclasses; driver
exceptions are translated at the boundary.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from types import TracebackType
from typing import ClassVar

LossCallback = Callable[[str], None]
"""Called with a one-line reason when a lease is lost."""


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


class CoordinationBackend(abc.ABC):
    """A small set of atomic operations that leadership and membership are built on."""

    name: ClassVar[str]

    def start(self) -> None:  # noqa: B027 - a backend without a connection has nothing to do
        """Connect. Idempotent."""

    def stop(self) -> None:  # noqa: B027 - a backend without a connection has nothing to do
        """Disconnect and drop any lease and membership held. Idempotent."""

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
        """Take leadership if it is free, without blocking. ``None`` if someone holds it."""

    @abc.abstractmethod
    def renew(self, lease: Lease) -> bool:
        """Extend the lease. ``False`` (and ``on_lost``) if it is gone."""

    @abc.abstractmethod
    def release(self, lease: Lease) -> None:
        """Give the lease up, if the caller still holds it. Never touches another's lease."""

    # -- leader publication ----------------------------------------------------------

    @abc.abstractmethod
    def publish_leader(self, lease: Lease, info: LeaderInfo) -> None:
        """Record who leads, while holding ``lease``."""

    @abc.abstractmethod
    def read_leader(self) -> LeaderInfo | None:
        """The current leader's info, or ``None`` if no lease is held."""

    # -- membership ------------------------------------------------------------------

    @abc.abstractmethod
    def heartbeat_member(self, member: MemberInfo) -> None:
        """Register the member, or refresh its liveness and fields."""

    @abc.abstractmethod
    def remove_member(self, member: MemberInfo) -> None:
        """Leave the cluster (only this incarnation: same node id and session)."""

    @abc.abstractmethod
    def live_members(self) -> list[MemberInfo]:
        """Members whose liveness signal has not timed out."""
