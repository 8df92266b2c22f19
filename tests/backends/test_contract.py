"""The rules of :mod:`backends.base`, checked on every backend (``backend_kit``).

Each test runs on dblock (SQLite and PostgreSQL), ZooKeeper, Redis (Redlock over three
masters) and memory. The failures that only some backends can have (a session expiring,
a key deleted, a server restarted, or memory's injected ones) are in ``test_failures.py``.
"""

from __future__ import annotations

import dataclasses
import time

from backends.base import CoordinationBackend, LeaderInfo, Lease, MemberInfo
from tests.backends.conftest import SHORT, Kit
from tests.backends.helpers import LossRecorder, wait_until


def _acquire(
    backend: CoordinationBackend, holder: str, min_token: int = 0
) -> tuple[Lease, LossRecorder]:
    lost = LossRecorder()
    lease = backend.try_acquire(holder, lost, min_token)
    assert lease is not None, f"{holder} could not acquire a free lease"
    return lease, lost


# -- leadership ---------------------------------------------------------------------------


def test_acquire_when_free_returns_a_lease(backend_kit: Kit) -> None:
    a = backend_kit.new()
    lease, lost = _acquire(a, "node-a")
    assert lease.backend == a.name
    assert lease.holder == "node-a"
    assert lease.token > 0
    assert lease.valid_for > 0
    assert lost.calls == 0


def test_second_holder_gets_none_while_the_lease_is_held(backend_kit: Kit) -> None:
    a, b = backend_kit.new(), backend_kit.new()
    _acquire(a, "node-a")
    assert b.try_acquire("node-b", LossRecorder()) is None
    # Another holder on the same instance is refused too.
    assert a.try_acquire("node-c", LossRecorder()) is None


def test_renew_keeps_the_lease(backend_kit: Kit) -> None:
    a, b = backend_kit.new(), backend_kit.new()
    lease, lost = _acquire(a, "node-a")
    for _ in range(3):
        assert a.renew(lease) is True
        assert b.try_acquire("node-b", LossRecorder()) is None
    assert lost.calls == 0


def test_release_lets_another_holder_acquire(backend_kit: Kit) -> None:
    a, b = backend_kit.new(), backend_kit.new()
    lease_a, lost_a = _acquire(a, "node-a")
    a.release(lease_a)
    lease_b, _ = _acquire(b, "node-b")
    assert lease_b.token > lease_a.token
    assert a.renew(lease_a) is False
    assert lost_a.calls == 0  # giving a lease up is not losing it


def test_release_by_a_non_owner_does_nothing(backend_kit: Kit) -> None:
    a, b = backend_kit.new(), backend_kit.new()
    lease, lost = _acquire(a, "node-a")
    b.release(Lease(lease.backend, "node-b", lease.token, lease.valid_for))
    b.release(Lease(lease.backend, "node-a", lease.token + 1, lease.valid_for))
    a.release(Lease(lease.backend, "intruder", lease.token, lease.valid_for))
    assert b.try_acquire("node-b", LossRecorder()) is None
    assert a.renew(lease) is True
    assert lost.calls == 0


def test_tokens_only_grow_across_a_sequence_of_holders(backend_kit: Kit) -> None:
    nodes = [backend_kit.new(), backend_kit.new(), backend_kit.new()]
    tokens = []
    for i in range(6):
        node = nodes[i % 3]
        lease, _ = _acquire(node, f"node-{i % 3}")
        tokens.append(lease.token)
        node.release(lease)
    assert tokens == sorted(tokens)
    assert len(set(tokens)) == len(tokens)


def test_min_token_is_honoured_and_later_tokens_stay_above_it(backend_kit: Kit) -> None:
    a, b = backend_kit.new(), backend_kit.new()
    floor = 10**9  # far above what a fresh server has counted (a zxid, an INCR)
    lease_a, _ = _acquire(a, "node-a", min_token=floor)
    assert lease_a.token > floor
    a.release(lease_a)
    lease_b, _ = _acquire(b, "node-b")  # no floor passed: still above the earlier token
    assert lease_b.token > lease_a.token
    b.release(lease_b)
    lease_c, _ = _acquire(a, "node-a", min_token=lease_b.token)
    assert lease_c.token > lease_b.token


# -- leader publication -------------------------------------------------------------------


def _info(kit: Kit, lease: Lease) -> LeaderInfo:
    epoch = kit.leader_epoch(lease, lease.holder)
    return LeaderInfo(lease.holder, f"PYRO:control@127.0.0.1:{9000 + epoch % 1000}", epoch,
                      round(time.time(), 3))  # fmt: skip


def test_leader_info_is_published_and_read_by_other_nodes(backend_kit: Kit) -> None:
    a, b = backend_kit.new(), backend_kit.new()
    assert b.read_leader() is None
    lease, _ = _acquire(a, "node-a")
    info = _info(backend_kit, lease)
    a.publish_leader(lease, info)
    assert b.read_leader() == info
    assert a.read_leader() == info


def test_leader_info_is_none_after_release(backend_kit: Kit) -> None:
    a, b = backend_kit.new(), backend_kit.new()
    lease, _ = _acquire(a, "node-a")
    a.publish_leader(lease, _info(backend_kit, lease))
    a.release(lease)
    assert b.read_leader() is None


def test_publish_by_a_holder_that_lost_its_lease_changes_nothing(backend_kit: Kit) -> None:
    a, b = backend_kit.new(), backend_kit.new()
    lease_a, _ = _acquire(a, "node-a")
    a.release(lease_a)
    lease_b, _ = _acquire(b, "node-b")
    info_b = _info(backend_kit, lease_b)
    b.publish_leader(lease_b, info_b)
    a.publish_leader(lease_a, LeaderInfo("node-a", "PYRO:stale@127.0.0.1:1", 1, 1.0))
    assert a.read_leader() == info_b


# -- membership ---------------------------------------------------------------------------


def _member(node_id: str, **changes: object) -> MemberInfo:
    member = MemberInfo(
        node_id=node_id,
        session=f"{node_id}-session",
        roles=("scheduler", "worker"),
        uri=f"PYRO:worker@127.0.0.1:{7000 + len(node_id)}",
        capacity=4,
        tags=("gpu", "eu"),
        backends=("dblock", "zookeeper"),
        config_version=3,
        status="follower",
    )
    return dataclasses.replace(member, **changes)  # type: ignore[arg-type]


def _listed(backend: CoordinationBackend) -> dict[str, MemberInfo]:
    members = backend.live_members()
    return {m.node_id: m for m in members}


def test_members_register_list_refresh_and_remove(backend_kit: Kit) -> None:
    a, b = backend_kit.new(), backend_kit.new()
    m1, m2 = _member("node-1"), _member("node-2", roles=("worker",), tags=())
    a.heartbeat_member(m1)
    b.heartbeat_member(m2)
    listed = _listed(a)
    assert sorted(listed) == ["node-1", "node-2"]
    for m in (m1, m2):
        assert dataclasses.replace(listed[m.node_id], last_seen=None) == m
        assert listed[m.node_id].last_seen is not None

    m1_new = dataclasses.replace(m1, status="leader", capacity=8)
    a.heartbeat_member(m1_new)
    refreshed = _listed(b)["node-1"]
    assert dataclasses.replace(refreshed, last_seen=None) == m1_new
    assert (refreshed.last_seen or 0) >= (listed["node-1"].last_seen or 0)

    a.remove_member(dataclasses.replace(m1, session="another-incarnation"))
    assert "node-1" in _listed(b)  # not this incarnation's entry: left alone
    a.remove_member(m1)
    assert sorted(_listed(b)) == ["node-2"]


def test_member_that_stops_heartbeating_drops_out_after_the_timeout(backend_kit: Kit) -> None:
    a, b = backend_kit.new(), backend_kit.new()
    alive, silent = _member("node-alive"), _member("node-silent")
    a.heartbeat_member(alive)
    b.heartbeat_member(silent)
    assert sorted(_listed(a)) == ["node-alive", "node-silent"]
    started = time.monotonic()

    def silent_gone() -> bool:
        a.heartbeat_member(alive)  # the other one keeps beating
        return sorted(_listed(a)) == ["node-alive"]

    wait_until(silent_gone, timeout=SHORT * 4 + 2, interval=0.1)
    assert time.monotonic() - started >= SHORT * 0.5
