"""Fixtures of the contract suite: every backend on a real server, behind one harness.

``backend_kit`` runs each test five times: dblock on SQLite, dblock on PostgreSQL,
ZooKeeper, Redis (Redlock over three masters), and the in-process ``memory`` backend
(several instances on one :class:`~backends.memory.MemoryServer`, which needs no server
process). ``kit.new()`` makes another started backend instance, as another node's process
would have; all are stopped after the test.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from backends.base import CoordinationBackend, Lease

SHORT = 1.0  # member timeout, and the lease of the tests that let a lease lapse
LEASE = 5.0  # the lease of the other tests: long enough never to lapse by accident
ZK_SESSION = 2.0


@dataclasses.dataclass
class Kit:
    """One backend kind on its server, for one test."""

    kind: str
    _make: Callable[..., CoordinationBackend]
    _leader_epoch: Callable[[Lease, str], int]
    _made: list[CoordinationBackend] = dataclasses.field(default_factory=list)

    def new(self, **overrides: Any) -> CoordinationBackend:
        """A new started backend instance (another node's view of the same cluster)."""
        backend = self._make(**overrides)
        self._made.append(backend)
        backend.start()
        return backend

    def leader_epoch(self, lease: Lease, node_id: str) -> int:
        """The epoch a leader publishes: on dblock, a real epoch taken in the database."""
        return self._leader_epoch(lease, node_id)

    def close(self) -> None:
        for backend in reversed(self._made):
            backend.stop()


def _dblock_kit(request: pytest.FixtureRequest, url_fixture: str, kind: str) -> Kit:
    from backends.dblock import DBLockBackend
    from qcluster.store.cluster import ensure_cluster, take_epoch
    from qcluster.store.db import Database

    url: str = request.getfixturevalue(url_fixture)
    admin = Database(url)
    admin.upgrade()
    ensure_cluster(admin, "contract", "dblock")
    engines: list[Database] = [admin]

    def make(lease_seconds: float = LEASE, member_timeout: float = SHORT) -> CoordinationBackend:
        db = Database(url)  # a node's own engine
        engines.append(db)
        return DBLockBackend(db, lease_seconds=lease_seconds, member_timeout=member_timeout)

    def epoch(lease: Lease, node_id: str) -> int:
        return take_epoch(admin, node_id=node_id, uri="", lease=lease)

    def dispose() -> None:
        for db in engines:
            db.engine.dispose()

    request.addfinalizer(dispose)
    return Kit(kind, make, epoch)


def _zookeeper_kit(request: pytest.FixtureRequest) -> Kit:
    from backends.zookeeper import ZooKeeperBackend

    zk = request.getfixturevalue("zk")

    def make(
        session_timeout: float = ZK_SESSION, member_timeout: float = SHORT
    ) -> CoordinationBackend:
        return ZooKeeperBackend(
            zk.hosts,
            cluster="contract",
            chroot=zk.chroot,
            session_timeout=session_timeout,
            member_timeout=member_timeout,
        )

    return Kit("zookeeper", make, lambda lease, node_id: lease.token)


def _redis_kit(request: pytest.FixtureRequest) -> Kit:
    from backends.redis import RedisBackend

    urls: list[str] = request.getfixturevalue("redis_urls")
    prefix: str = request.getfixturevalue("redis_prefix")
    cluster = f"contract-{uuid.uuid4().hex[:8]}"  # also names the connections (CLIENT KILL)

    def make(
        lease_seconds: float = LEASE, member_timeout: float = SHORT, urls: list[str] = urls
    ) -> CoordinationBackend:
        return RedisBackend(
            urls,
            cluster=cluster,
            lease_seconds=lease_seconds,
            key_prefix=prefix,
            member_timeout=member_timeout,
        )

    return Kit("redis", make, lambda lease, node_id: lease.token)


def _memory_kit() -> Kit:
    from backends.memory import MemoryBackend, MemoryServer

    server = MemoryServer()  # one per test: the nodes of one cluster share it

    def make(lease_seconds: float = LEASE, member_timeout: float = SHORT) -> CoordinationBackend:
        return MemoryBackend(server, lease_seconds=lease_seconds, member_timeout=member_timeout)

    return Kit("memory", make, lambda lease, node_id: lease.token)


KINDS = ["dblock-sqlite", "dblock-postgresql", "zookeeper", "redis", "memory"]


@pytest.fixture(params=KINDS)
def backend_kit(request: pytest.FixtureRequest) -> Iterator[Kit]:
    """Each test runs once per backend kind; servers start only for the kinds selected."""
    kind: str = request.param
    if kind == "dblock-sqlite":
        kit = _dblock_kit(request, "sqlite_url", kind)
    elif kind == "dblock-postgresql":
        kit = _dblock_kit(request, "pg_url", kind)
    elif kind == "zookeeper":
        kit = _zookeeper_kit(request)
    elif kind == "redis":
        kit = _redis_kit(request)
    else:
        kit = _memory_kit()
    try:
        yield kit
    finally:
        kit.close()


@pytest.fixture
def zk_kit(request: pytest.FixtureRequest) -> Iterator[Kit]:
    kit = _zookeeper_kit(request)
    try:
        yield kit
    finally:
        kit.close()


@pytest.fixture
def redis_kit(request: pytest.FixtureRequest) -> Iterator[Kit]:
    kit = _redis_kit(request)
    try:
        yield kit
    finally:
        kit.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def dblock_kit(request: pytest.FixtureRequest) -> Iterator[Kit]:
    kind = f"dblock-{request.param}"
    kit = _dblock_kit(request, "sqlite_url" if request.param == "sqlite" else "pg_url", kind)
    try:
        yield kit
    finally:
        kit.close()
