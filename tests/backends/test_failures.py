"""Failure injection: each way a backend can lose a lease, on a real server.

Every test checks the same three things: the old holder learns of the loss (``on_lost``
called once, or ``renew`` returns ``False``), a new holder gets a larger token, and the
old holder's late ``release`` leaves the new lease alone. The in-process ``memory``
backend has no server to hurt: it injects the same failures itself (a lease taken away,
a session expired, calls that fail, a lease that lapses on a clock moved forward).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis

from backends.base import CoordinationBackend, LeaderInfo, Lease
from backends.memory import MemoryBackend, MemoryServer
from backends.redis import RedisBackend
from backends.zookeeper import ZooKeeperBackend
from qcluster.errors import BackendUnavailable
from tests.backends.conftest import SHORT, Kit
from tests.backends.helpers import LossRecorder, MovableClock, wait_until
from tests.backends.test_contract import _acquire, _listed, _member
from tests.servers import RedisServer, ZooKeeperServer


def _take_over(
    old: CoordinationBackend,
    old_lease: Lease,
    old_lost: LossRecorder,
    new: CoordinationBackend,
    timeout: float,
    min_token: int = 0,
) -> Lease:
    """The new holder acquires (polling until ``timeout``); check the rules of a handover."""
    new_lost = LossRecorder()

    def attempt() -> Lease | None:
        try:
            return new.try_acquire("node-new", new_lost, min_token)
        except BackendUnavailable:
            return None  # a server still coming back

    lease: Lease = wait_until(attempt, timeout)
    assert lease.token > old_lease.token
    assert _renew_outcome(old, old_lease, timeout) is False
    assert old_lost.calls == 1, old_lost.reasons  # at most once, however often asked
    old.release(old_lease)  # a stale holder's release must not touch the new lease
    assert new.renew(lease) is True
    assert new_lost.calls == 0
    return lease


def _renew_outcome(backend: CoordinationBackend, lease: Lease, timeout: float) -> bool:
    """What ``renew`` says once it can tell (it raises BackendUnavailable until then, e.g.
    while a ZooKeeper client reconnects to learn that its session expired)."""

    def outcome() -> tuple[bool] | None:
        try:
            return (backend.renew(lease),)
        except BackendUnavailable:
            return None

    answer: tuple[bool] = wait_until(outcome, timeout)
    return answer[0]


# -- dblock -------------------------------------------------------------------------------


def test_dblock_lease_lapses_and_the_next_holder_gets_a_larger_token(dblock_kit: Kit) -> None:
    a, b = dblock_kit.new(lease_seconds=SHORT), dblock_kit.new(lease_seconds=SHORT)
    lease, lost = _acquire(a, "node-a")
    assert b.try_acquire("node-b", LossRecorder()) is None
    _take_over(a, lease, lost, b, timeout=SHORT * 3 + 2)


# -- ZooKeeper ----------------------------------------------------------------------------


def _expire_session(backend: ZooKeeperBackend) -> None:
    """kazoo's trick: a second client joins the session with its id and password and
    closes it, which expires it for the first client too."""
    from kazoo.client import KazooClient

    client_id = backend._client.client_id if backend._client is not None else None
    assert client_id is not None
    other = KazooClient(hosts=",".join(backend.hosts), client_id=client_id, timeout=10.0)
    other.start(timeout=10)
    other.stop()
    other.close()


def test_lease_lost_when_zookeeper_session_expires(zk_kit: Kit) -> None:
    a, b = zk_kit.new(), zk_kit.new()
    assert isinstance(a, ZooKeeperBackend)
    a.heartbeat_member(_member("node-a"))
    lease, lost = _acquire(a, "node-a")
    a.publish_leader(lease, LeaderInfo("node-a", "PYRO:control@127.0.0.1:1", 1, 1.0))
    _expire_session(a)
    assert lost.wait(5.0), "on_lost was not called after the session expired"
    assert b.read_leader() is None  # the info names an election node that is gone
    _take_over(a, lease, lost, b, timeout=5.0)
    # The member node died with the session; the backend re-creates it on its own.
    wait_until(lambda: "node-a" in _listed(b), timeout=5.0)


def test_zookeeper_suspension_calls_on_lost_at_once(private_zk: ZooKeeperServer) -> None:
    session = 3.0
    a = ZooKeeperBackend([private_zk.hosts], cluster="c", session_timeout=session)
    b = ZooKeeperBackend([private_zk.hosts], cluster="c", session_timeout=session)
    with a, b:
        lease, lost = _acquire(a, "node-a")
        private_zk.pause()
        try:
            # kazoo notices the silence after its read timeout (2/3 of the session), which
            # is before the server may expire the session and let another node lead.
            assert lost.wait(session), "SUSPENDED did not call on_lost"
            with pytest.raises(BackendUnavailable):
                a.renew(lease)
        finally:
            private_zk.resume()
        assert lost.calls == 1

        def reacquire() -> Lease | None:
            try:
                return a.try_acquire("node-a", LossRecorder(), lease.token)
            except BackendUnavailable:
                return None  # still reconnecting

        again: Lease = wait_until(reacquire, timeout=10.0)
        # Same session: its node survived and is reused, and the token is raised above
        # min_token. Expired session: a new node with a larger czxid. Larger either way.
        assert again.token > lease.token
        assert b.try_acquire("node-b", LossRecorder()) is None
        assert a.renew(again) is True


def test_zookeeper_auth_stays_secret_and_guards_the_nodes(
    zk: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from kazoo.client import KazooClient
    from kazoo.exceptions import NoAuthError

    caplog.set_level(1)  # kazoo's BLATHER (5) too, where it logs the session password
    secret = "s3cret-Pw"
    backend = ZooKeeperBackend(
        zk.hosts, cluster="c", chroot=zk.chroot, session_timeout=2.0, auth=f"qc:{secret}"
    )
    with backend:
        lease, _ = _acquire(backend, "node-a")
        info = LeaderInfo("node-a", "PYRO:control@127.0.0.1:1", 1, 1.0)
        backend.publish_leader(lease, info)
        assert backend.read_leader() == info
        assert backend._client is not None and backend._client.client_id is not None
        session_password = backend._client.client_id[1].hex()
        stranger = KazooClient(hosts=zk.connect_string, timeout=5.0)
        stranger.start(timeout=10)
        try:
            with pytest.raises(NoAuthError):
                stranger.get("/qcluster/c/leader")
        finally:
            stranger.stop()
            stranger.close()
    assert secret not in repr(backend)
    assert caplog.records, "kazoo logged nothing: the check would prove nothing"
    assert secret not in caplog.text
    assert session_password not in caplog.text
    # Only the same credentials may clean up (the zk fixture's admin client has none).
    owner = KazooClient(
        hosts=zk.connect_string, timeout=5.0, auth_data=[("digest", f"qc:{secret}")]
    )
    owner.start(timeout=10)
    try:
        owner.delete("/qcluster", recursive=True)
    finally:
        owner.stop()
        owner.close()


# -- Redis --------------------------------------------------------------------------------


def _masters(backend: CoordinationBackend) -> list[redis.Redis[bytes]]:
    assert isinstance(backend, RedisBackend)
    return [redis.Redis.from_url(url, socket_timeout=5) for url in backend._urls]


def test_redis_lease_lost_when_the_key_is_deleted(redis_kit: Kit) -> None:
    a, b = redis_kit.new(), redis_kit.new()
    assert isinstance(a, RedisBackend)
    lease, lost = _acquire(a, "node-a")
    for master in _masters(a):  # an operator, an eviction, a failover to an empty replica
        master.delete(a._lease_key)
    assert a.renew(lease) is False
    _take_over(a, lease, lost, b, timeout=1.0)


def test_redis_lease_survives_a_killed_connection_then_lapses_unrenewed(redis_kit: Kit) -> None:
    a, b = redis_kit.new(lease_seconds=SHORT), redis_kit.new(lease_seconds=SHORT)
    assert isinstance(a, RedisBackend)
    lease, lost = _acquire(a, "node-a")
    killed = 0
    for master in _masters(a):
        for client in master.client_list():
            if client.get("name") == a._client_name:
                killed += int(master.client_kill_filter(_id=client["id"]))
    assert killed >= 3  # one connection per master at least
    assert a.renew(lease) is True  # a dropped connection is not a lost lease
    assert lost.calls == 0
    # Now the holder stops renewing (a paused process): the lease lapses on the servers.
    _take_over(a, lease, lost, b, timeout=SHORT * 3 + 1)


@contextmanager
def _redis_nodes(urls: list[str], count: int) -> Iterator[list[RedisBackend]]:
    nodes = [RedisBackend(urls, cluster="c", lease_seconds=2.0) for _ in range(count)]
    for node in nodes:
        node.start()
    try:
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def test_redis_token_exceeds_min_token_after_the_masters_restart(server_factory: Any) -> None:
    masters = [server_factory.start(RedisServer) for _ in range(3)]
    with _redis_nodes([m.url for m in masters], 2) as (a, b):
        first, _ = _acquire(a, "node-a")
        a.release(first)
        lease, lost = _acquire(a, "node-a")
        for master in masters:  # no persistence: keys and counters are gone
            master.stop()
            master.start()
        assert a.renew(lease) is False
        # The counters restarted at 0; min_token (the SQL side's last token) keeps the
        # new token above everything handed out before.
        _take_over(a, lease, lost, b, timeout=2.0, min_token=lease.token)


def test_redlock_holds_with_one_master_hung_and_cannot_tell_with_two_down(
    server_factory: Any,
) -> None:
    masters = [server_factory.start(RedisServer) for _ in range(3)]
    with _redis_nodes([m.url for m in masters], 2) as (a, b):
        masters[2].pause()  # a hung master costs one short socket timeout, not the lease
        try:
            lease, lost = _acquire(a, "node-a")
            assert b.try_acquire("node-b", LossRecorder()) is None
            assert a.renew(lease) is True
            masters[1].stop()
            with pytest.raises(BackendUnavailable):
                a.renew(lease)  # one answer of three: neither held nor lost for sure
            with pytest.raises(BackendUnavailable):
                b.try_acquire("node-b", LossRecorder())
            assert lost.calls == 0
        finally:
            masters[2].resume()


def test_redis_urls_with_passwords_stay_out_of_repr_and_errors() -> None:
    backend = RedisBackend(["redis://:hunter2@127.0.0.1:1/0"], cluster="c", lease_seconds=1.0)
    with backend:
        assert "hunter2" not in repr(backend)
        with pytest.raises(BackendUnavailable) as raised:
            backend.try_acquire("node-a", LossRecorder())
        assert "hunter2" not in str(raised.value)


# -- memory -------------------------------------------------------------------------------


@contextmanager
def _memory_nodes(
    count: int, clock: MovableClock | None = None, lease_seconds: float = 5.0
) -> Iterator[list[MemoryBackend]]:
    server = MemoryServer(clock=clock or MovableClock())
    nodes = [MemoryBackend(server, lease_seconds=lease_seconds, member_timeout=SHORT)
             for _ in range(count)]
    for node in nodes:
        node.start()
    try:
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def test_memory_lease_taken_away_calls_on_lost_at_once() -> None:
    with _memory_nodes(2) as (a, b):
        lease, lost = _acquire(a, "node-a")
        a.publish_leader(lease, LeaderInfo("node-a", "PYRO:control@127.0.0.1:1", 1, 1.0))
        assert b.lose_lease() is False  # b holds nothing: a's lease stays
        assert lost.calls == 0
        assert a.lose_lease("taken away by the test") is True
        assert lost.reasons == ["taken away by the test"]  # at once, on this thread
        assert b.read_leader() is None
        _take_over(a, lease, lost, b, timeout=1.0)


def test_memory_session_expiry_loses_the_lease_and_the_members() -> None:
    with _memory_nodes(2) as (a, b):
        a.heartbeat_member(_member("node-a"))
        b.heartbeat_member(_member("node-b"))
        lease, lost = _acquire(a, "node-a")
        a.publish_leader(lease, LeaderInfo("node-a", "PYRO:control@127.0.0.1:1", 1, 1.0))
        a.expire_session()
        assert lost.calls == 1, "on_lost was not called when the session expired"
        assert sorted(_listed(b)) == ["node-b"]  # a's entries died with its session
        assert b.read_leader() is None
        _take_over(a, lease, lost, b, timeout=1.0)
        a.heartbeat_member(_member("node-a"))  # the new session registers again
        assert sorted(_listed(b)) == ["node-a", "node-b"]


def test_memory_failing_calls_raise_backend_unavailable_and_change_nothing() -> None:
    with _memory_nodes(2) as (a, b):
        lease, lost = _acquire(a, "node-a")
        a.fail_next(3)
        for call in (lambda: a.renew(lease), lambda: a.release(lease), a.live_members):
            with pytest.raises(BackendUnavailable, match="injected failure"):
                call()
        assert a.renew(lease) is True  # the failures are used up; the lease was kept
        assert lost.calls == 0
        b.fail_next(1)
        with pytest.raises(BackendUnavailable):
            b.try_acquire("node-b", LossRecorder())
        assert b.try_acquire("node-b", LossRecorder()) is None  # a still holds it
        a.fail_next(10**6)
        a.fail_next(0)  # heals at once
        assert a.renew(lease) is True


def test_memory_lease_lapses_and_the_next_holder_gets_a_larger_token() -> None:
    clock = MovableClock()
    with _memory_nodes(2, clock, lease_seconds=SHORT) as (a, b):
        lease, lost = _acquire(a, "node-a")
        assert b.try_acquire("node-b", LossRecorder()) is None
        clock.advance(SHORT * 0.9)
        assert a.renew(lease) is True  # renewed in time: SHORT more from now
        clock.advance(SHORT * 0.9)
        assert b.try_acquire("node-b", LossRecorder()) is None
        clock.advance(SHORT * 0.2)  # the lease lapses on the server's clock
        _take_over(a, lease, lost, b, timeout=1.0)
