"""Live migration between coordination backends (docs/DESIGN.md invariant 9).

The phase transitions of the cluster row (:mod:`qcluster.leader.migration`), the epoch rules of
each phase (:func:`qcluster.store.cluster.take_epoch`, ``record_lease``), the joint lease
(:mod:`backends.joint`), the pure decisions (``config_vote``, ``progress``,
``cannot_use``, ``plan``), the ``qcluster backend`` commands and the 0001 -> 0002 schema
upgrade. Real servers, no ``qcluster start``: the row is driven by calling the library
the way a leader would.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

import qcluster.store.migrations
from backends.base import CoordinationBackend, LeaderInfo, Lease, LossCallback, MemberInfo
from backends.dblock import DBLockBackend
from backends.joint import JointBackend, combine, merge_members
from backends.loader import load_backend_by_name
from qcluster.errors import Fenced, InputError, QClusterError
from qcluster.leader.election import Leadership
from qcluster.leader.migration import (
    Move,
    cannot_use,
    complete_move,
    config_vote,
    plan,
    progress,
    request_move,
)
from qcluster.settings import Settings, load_settings
from qcluster.store import schema
from qcluster.store.cluster import (
    ClusterState,
    Phase,
    WrongBackend,
    ensure_cluster,
    read_cluster,
    record_lease,
    take_epoch,
)
from qcluster.store.db import Database
from tests.cluster.harness import upgrade_database
from tests.conftest import DatabaseFactory, ZkNamespace
from tests.helpers import assert_cli_error, run_cli, run_cli_many, run_json, write_config


def ignore(_reason: str) -> None:
    """An ``on_lost`` callback for leases whose loss the test does not watch."""


def current(db: Database) -> ClusterState:
    state = read_cluster(db)
    assert state is not None, "the cluster row is missing"
    return state


def uri(node: str) -> str:
    return f"PYRO:{node}@127.0.0.1:1"


# -- fixtures ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Rig:
    """A cluster on PostgreSQL whose config can also use ZooKeeper: the backends a node
    would build from it, each as another node's instance."""

    settings: Settings
    db: Database
    zk: ZkNamespace
    made: list[CoordinationBackend] = dataclasses.field(default_factory=list)

    def backend(self, name: str) -> CoordinationBackend:
        backend = load_backend_by_name(name, self.settings, self.db)
        self.made.append(backend)
        backend.start()
        return backend

    def joint(self) -> JointBackend:
        return JointBackend([self.backend("dblock"), self.backend("zookeeper")])

    def close(self) -> None:
        for backend in reversed(self.made):
            backend.stop()


def zk_coordination(zk: ZkNamespace) -> dict[str, Any]:
    return {"backend": "dblock", "zookeeper": {"hosts": list(zk.hosts), "chroot": zk.chroot}}


@pytest.fixture
def rig(tmp_path: Path, pg_url: str, zk: ZkNamespace, make_db: DatabaseFactory) -> Iterator[Rig]:
    settings = load_settings(write_config(tmp_path, pg_url, coordination=zk_coordination(zk)))
    r = Rig(settings, make_db(pg_url, cluster=settings.cluster.name), zk)
    try:
        yield r
    finally:
        r.close()


# -- 1. phase transitions of the cluster row ------------------------------------------------


def test_a_move_starts_resumes_and_rolls_back(db: Database) -> None:
    start = current(db)
    assert (start.backend, start.phase, start.target_backend) == ("dblock", Phase.STABLE, None)

    move, joint = request_move(db, "zookeeper")
    assert move is Move.STARTED
    assert (joint.backend, joint.phase, joint.target_backend) == (
        "dblock", Phase.JOINT, "zookeeper")
    assert joint.config_version == start.config_version + 1
    assert joint.phase_since is not None
    assert joint.required == ("dblock", "zookeeper")
    assert current(db) == joint

    move, again = request_move(db, "zookeeper")
    assert move is Move.RESUMED
    assert again == joint
    assert current(db) == joint, "resuming a move must not touch the row"

    move, back = request_move(db, "dblock")
    assert move is Move.ROLLED_BACK
    assert (back.backend, back.phase, back.target_backend) == ("dblock", Phase.STABLE, None)
    assert back.config_version == joint.config_version + 1
    assert back.phase_since is not None and back.phase_since >= joint.phase_since
    assert current(db) == back

    move, same = request_move(db, "dblock")
    assert move is Move.NOTHING
    assert same == back
    assert current(db) == back


def test_phases_are_stored_as_the_strings_existing_databases_hold(db: Database) -> None:
    assert {p.value for p in Phase} == {"stable", "joint"}

    def stored() -> str:
        with db.read() as conn:
            return str(conn.execute(sa.select(schema.cluster.c.phase)).scalar_one())

    assert stored() == "stable" and current(db).phase is Phase.STABLE
    _, joint = request_move(db, "zookeeper")
    assert stored() == "joint" and joint.phase is Phase.JOINT
    assert current(db).phase is Phase.JOINT
    request_move(db, "dblock")
    assert stored() == "stable" and current(db).phase is Phase.STABLE

    with db.write() as conn:
        conn.execute(schema.cluster.update().values(phase="split"))  # a later version's
    with pytest.raises(QClusterError, match="phase 'split' is not one this qcluster knows"):
        read_cluster(db)


def test_a_third_backend_or_an_unknown_one_is_refused_during_a_move(db: Database) -> None:
    _, joint = request_move(db, "zookeeper")
    with pytest.raises(InputError, match=r"--to zookeeper.*--to dblock"):
        request_move(db, "redis")
    assert current(db) == joint
    with pytest.raises(InputError, match="unknown backend 'bogus'"):
        request_move(db, "bogus")
    assert current(db) == joint


def test_an_unknown_backend_is_refused_when_stable(db: Database) -> None:
    before = current(db)
    with pytest.raises(InputError, match="unknown backend"):
        request_move(db, "joint")  # a JointBackend's name, not a backend one can run
    assert current(db) == before


def test_a_leaders_move_is_fenced_on_its_epoch(db: Database) -> None:
    backend = DBLockBackend(db, lease_seconds=30.0, member_timeout=3.0)
    lease = backend.try_acquire("a", ignore)
    assert lease is not None
    epoch = take_epoch(db, node_id="a", uri=uri("a"), lease=lease)
    before = current(db)
    with pytest.raises(Fenced):
        request_move(db, "zookeeper", epoch=epoch - 1)
    assert current(db) == before
    move, joint = request_move(db, "zookeeper", epoch=epoch)
    assert move is Move.STARTED and joint.phase == Phase.JOINT


def test_complete_move_is_fenced_and_checks_the_version(db: Database) -> None:
    backend = DBLockBackend(db, lease_seconds=30.0, member_timeout=3.0)
    lease = backend.try_acquire("a", ignore)
    assert lease is not None
    epoch = take_epoch(db, node_id="a", uri=uri("a"), lease=lease)
    _, joint = request_move(db, "zookeeper")

    with pytest.raises(Fenced):
        complete_move(db, epoch=epoch - 1, version=joint.config_version)
    assert current(db) == joint
    with pytest.raises(Fenced):
        complete_move(db, epoch=epoch + 1, version=joint.config_version)
    assert current(db) == joint

    assert complete_move(db, epoch=epoch, version=joint.config_version - 1) is None
    assert current(db) == joint

    done = complete_move(db, epoch=epoch, version=joint.config_version)
    assert done is not None
    assert (done.backend, done.phase, done.target_backend) == ("zookeeper", Phase.STABLE, None)
    assert done.config_version == joint.config_version + 1
    assert done.epoch == epoch, "finishing a move takes no epoch"
    assert done.phase_since is not None
    assert current(db) == done
    # the same (now old) joint version again: the phase changed meanwhile
    assert complete_move(db, epoch=epoch, version=joint.config_version) is None
    assert current(db) == done


def test_complete_move_after_a_rollback_does_nothing(db: Database) -> None:
    _, joint = request_move(db, "zookeeper")
    _, back = request_move(db, "dblock")
    assert complete_move(db, epoch=back.epoch, version=joint.config_version) is None
    assert complete_move(db, epoch=back.epoch, version=back.config_version) is None
    assert current(db) == back


def test_two_moves_at_once_start_one_joint_phase(db: Database) -> None:
    """Two operators (or an operator and the leader) ask at once: the row lock serializes
    them, so one starts the move and the other resumes it; the version goes up once."""
    start = current(db)
    barrier = threading.Barrier(2)
    results: list[Move] = []
    errors: list[BaseException] = []

    def ask() -> None:
        barrier.wait(5)
        try:
            results.append(request_move(db, "zookeeper")[0])
        except BaseException as e:  # reported below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert sorted(m.value for m in results) == ["resumed", "started"]
    assert current(db).config_version == start.config_version + 1


# -- 2. which leases may take an epoch in each phase ----------------------------------------


def test_a_single_backend_lease_takes_no_epoch_in_the_joint_phase(db: Database) -> None:
    backend = DBLockBackend(db, lease_seconds=30.0, member_timeout=3.0)
    _, joint = request_move(db, "zookeeper")
    lease = backend.try_acquire("b", ignore, joint.min_token)
    assert lease is not None
    with pytest.raises(WrongBackend, match="moving from 'dblock' to 'zookeeper'"):
        take_epoch(db, node_id="b", uri=uri("b"), lease=lease)
    assert current(db) == joint, "a refused lease must leave the row as it was"
    # rolled back: the same dblock lease is all the phase needs
    _, back = request_move(db, "dblock")
    epoch = take_epoch(db, node_id="b", uri=uri("b"), lease=lease)
    assert epoch == back.epoch + 1
    assert current(db).leader_tokens is not None
    assert current(db).tokens == {"dblock": lease.token}


def test_take_epoch_follows_the_phase_through_a_whole_move(rig: Rig) -> None:
    db = rig.db
    epochs: list[int] = []
    _, joint = request_move(db, "zookeeper")

    # joint phase: a node that holds the dblock lease alone cannot lead
    dblock_b = rig.backend("dblock")
    solo = dblock_b.try_acquire("b", ignore, joint.min_token)
    assert solo is not None
    with pytest.raises(WrongBackend, match="needs a claim on both"):
        take_epoch(db, node_id="b", uri=uri("b"), lease=solo)
    assert current(db) == joint
    dblock_b.release(solo)

    # a joint lease takes the epoch and records both tokens
    joint_a = rig.joint()
    wide = joint_a.try_acquire("a", ignore, current(db).min_token)
    assert wide is not None
    epochs.append(take_epoch(db, node_id="a", uri=uri("a"), lease=wide))
    state = current(db)
    assert state.epoch == epochs[-1] == joint.epoch + 1
    assert (state.leader_id, state.leader_backend) == ("a", "dblock+zookeeper")
    assert state.leader_tokens is not None
    assert json.loads(state.leader_tokens) == {
        "dblock": wide.parts[0].token, "zookeeper": wide.parts[1].token,
    }
    assert state.leader_token == wide.token == wide.parts[1].token
    assert state.tokens == wide.tokens

    # the move finishes: stable on zookeeper
    done = complete_move(db, epoch=epochs[-1], version=joint.config_version)
    assert done is not None and (done.backend, done.phase) == ("zookeeper", Phase.STABLE)

    # the joint lease still covers what the phase needs (zookeeper)
    epochs.append(take_epoch(db, node_id="a", uri=uri("a"), lease=wide))

    # a gives its dblock claim back; b's dblock-only lease is now worth nothing
    joint_a.parts[0].release(wide.parts[0])
    solo = dblock_b.try_acquire("b", ignore, current(db).min_token)
    assert solo is not None
    with pytest.raises(WrongBackend, match="runs the 'zookeeper' backend"):
        take_epoch(db, node_id="b", uri=uri("b"), lease=solo)
    assert current(db).epoch == epochs[-1]

    # a's zookeeper claim goes too and c wins the election
    old_zk = wide.parts[1]
    joint_a.parts[1].release(old_zk)
    zk_c = rig.backend("zookeeper")
    lease_c = zk_c.try_acquire("c", ignore, current(db).min_token)
    assert lease_c is not None and lease_c.token > old_zk.token
    epochs.append(take_epoch(db, node_id="c", uri=uri("c"), lease=lease_c))
    assert current(db).tokens["zookeeper"] == lease_c.token
    assert current(db).tokens["dblock"] == wide.parts[0].token, "dblock's history stays"

    # a wakes up holding its old zookeeper claim: an older token is fenced out
    with pytest.raises(Fenced, match="zookeeper lease token"):
        take_epoch(db, node_id="a", uri=uri("a"), lease=old_zk)
    with pytest.raises(Fenced):
        take_epoch(db, node_id="a", uri=uri("a"), lease=wide)
    after = current(db)
    assert (after.epoch, after.leader_id) == (epochs[-1], "c")
    assert epochs == sorted(set(epochs)) and epochs[0] > joint.epoch


def test_record_lease_widens_and_narrows_the_leaders_lease(rig: Rig) -> None:
    db = rig.db
    dblock_a = rig.backend("dblock")
    narrow = dblock_a.try_acquire("a", ignore)
    assert narrow is not None
    epoch = take_epoch(db, node_id="a", uri=uri("a"), lease=narrow)
    _, joint = request_move(db, "zookeeper", epoch=epoch)

    # the leader takes its zookeeper claim as well, above every token seen
    zk_a = rig.backend("zookeeper")
    claim = zk_a.try_acquire("a", ignore, max(current(db).min_token, narrow.token))
    assert claim is not None and claim.token > narrow.token
    wide = combine([narrow, claim])
    with pytest.raises(Fenced):
        record_lease(db, node_id="a", epoch=epoch - 1, lease=wide)
    with pytest.raises(Fenced):
        record_lease(db, node_id="b", epoch=epoch, lease=wide)
    assert current(db) == joint
    record_lease(db, node_id="a", epoch=epoch, lease=wide)
    state = current(db)
    assert state.epoch == epoch, "recording a lease takes no epoch"
    assert state.leader_backend == "dblock+zookeeper"
    assert state.tokens == {"dblock": narrow.token, "zookeeper": claim.token}

    # stable on zookeeper: the leader gives dblock back and records the narrower lease
    done = complete_move(db, epoch=epoch, version=joint.config_version)
    assert done is not None
    dblock_a.release(narrow)
    record_lease(db, node_id="a", epoch=epoch, lease=claim)
    state = current(db)
    assert (state.leader_backend, state.leader_token) == ("zookeeper", claim.token)
    assert state.tokens == {"dblock": narrow.token, "zookeeper": claim.token}
    assert state.min_token == max(narrow.token, claim.token)


def test_record_lease_refuses_a_dblock_claim_that_is_gone(rig: Rig) -> None:
    db = rig.db
    dblock_a = rig.backend("dblock")
    lease = dblock_a.try_acquire("a", ignore)
    assert lease is not None
    epoch = take_epoch(db, node_id="a", uri=uri("a"), lease=lease)
    dblock_a.release(lease)
    before = current(db)
    with pytest.raises(Fenced, match="dblock lease"):
        record_lease(db, node_id="a", epoch=epoch, lease=lease)
    assert current(db) == before


# -- 3. the joint lease -------------------------------------------------------------------------


def test_joint_acquire_gives_the_first_claim_back_when_the_second_is_held(rig: Rig) -> None:
    zk_b = rig.backend("zookeeper")
    held = zk_b.try_acquire("b", ignore)
    assert held is not None
    joint_a = rig.joint()
    assert joint_a.try_acquire("a", ignore) is None
    # a took the dblock row (token 1) and gave it back: c gets it at once, with token 2
    dblock_c = rig.backend("dblock")
    lease_c = dblock_c.try_acquire("c", ignore)
    assert lease_c is not None, "the joint attempt left its dblock claim behind"
    assert lease_c.token == 2, "the joint attempt never took the dblock claim"
    # and once b lets go, a joint lease can be had (after c lets go of dblock too)
    dblock_c.release(lease_c)
    zk_b.release(held)
    assert joint_a.try_acquire("a", ignore) is not None


def test_joint_tokens_grow_part_by_part(rig: Rig) -> None:
    floor = 10**12  # far above ZooKeeper's czxids: its token base must be raised
    lease = rig.joint().try_acquire("a", ignore, floor)
    assert lease is not None
    first, second = lease.parts
    assert lease.backend == "dblock+zookeeper"
    assert lease.backends == ("dblock", "zookeeper")
    assert first.token > floor
    assert second.token > first.token
    assert lease.token == second.token > floor
    assert lease.valid_for == min(first.valid_for, second.valid_for)
    assert lease.part("dblock") == first and lease.part("redis") is None


@pytest.mark.parametrize("lost", ["dblock", "zookeeper"])
def test_joint_renew_fails_when_one_part_is_lost(rig: Rig, zk_admin: Any, lost: str) -> None:
    joint = rig.joint()
    losses: list[str] = []
    lease = joint.try_acquire("a", losses.append)
    assert lease is not None
    assert joint.renew(lease) is True
    if lost == "dblock":
        # the row's expiry passed and another node took it
        claim = lease.parts[0]
        with rig.db.write() as conn:
            conn.execute(schema.lease.update().where(schema.lease.c.name == "leader")
                         .values(holder="intruder", token=claim.token + 1))
    else:
        # an operator (or a session expiry) deleted the election node
        election = f"{rig.zk.chroot}/qcluster/{rig.settings.cluster.name}/election"
        children = zk_admin.get_children(election)
        assert children, "the joint lease holds no ZooKeeper election node"
        for child in children:
            zk_admin.delete(f"{election}/{child}")
    assert joint.renew(lease) is False
    assert losses, "on_lost was not called"


def test_joint_release_gives_back_both_claims(rig: Rig) -> None:
    joint = rig.joint()
    lease = joint.try_acquire("a", ignore)
    assert lease is not None
    dblock_b, zk_b = rig.backend("dblock"), rig.backend("zookeeper")
    assert dblock_b.try_acquire("b", ignore) is None
    assert zk_b.try_acquire("b", ignore) is None
    joint.release(lease)
    assert dblock_b.try_acquire("b", ignore) is not None
    assert zk_b.try_acquire("b", ignore) is not None


def test_joint_backend_needs_two_different_parts(rig: Rig) -> None:
    one = rig.backend("dblock")
    with pytest.raises(ValueError):
        JointBackend([one])
    with pytest.raises(ValueError):
        JointBackend([one, rig.backend("dblock")])


# -- 4. pure decisions --------------------------------------------------------------------------


def cluster_state(**changes: Any) -> ClusterState:
    base = ClusterState(
        name="t", backend="dblock", phase=Phase.STABLE, target_backend=None, config_version=3,
        epoch=5, leader_id=None, leader_uri=None, leader_since=None, leader_backend=None,
        leader_token=0,
    )
    return dataclasses.replace(base, **changes)


def member(node_id: str, *, roles: tuple[str, ...] = ("scheduler", "worker"),
           backends: tuple[str, ...] = ("zookeeper", "dblock"), config_version: int = 3,
           started_version: int = 3, status: str = "", session: str = "s") -> MemberInfo:
    return MemberInfo(node_id=node_id, session=session, roles=roles, backends=backends,
                      config_version=config_version, started_version=started_version,
                      status=status)


def test_config_vote_moves_only_when_every_scheduler_asks() -> None:
    state = cluster_state()
    nodes = [member("a"), member("b"), member("c", roles=("scheduler",))]
    assert config_vote(state, nodes) == "zookeeper"

    old = [*nodes[:2], member("c", started_version=2)]
    assert config_vote(state, old) is None, "a node started before the last move voted"

    # a node whose config names dblock (no zookeeper servers at all)
    assert config_vote(state, [*nodes[:2], member("c", backends=("dblock",))]) is None
    # a node that names zookeeper but cannot use the cluster's backend
    assert config_vote(state, [*nodes[:2], member("c", backends=("zookeeper",))]) is None
    # split opinions
    assert config_vote(state, [*nodes[:2], member("c", backends=("redis", "dblock"))]) is None


def test_config_vote_ignores_workers() -> None:
    state = cluster_state()
    workers = [member("w1", roles=("worker",), backends=("dblock",), started_version=0),
               member("w2", roles=("worker",), backends=(), started_version=1)]
    assert config_vote(state, [member("a"), *workers]) == "zookeeper"
    assert config_vote(state, workers) is None, "no scheduler node: nobody asked"


def test_config_vote_never_in_joint_or_when_already_there() -> None:
    nodes = [member("a"), member("b")]
    joint = cluster_state(phase=Phase.JOINT, target_backend="zookeeper")
    assert config_vote(joint, nodes) is None
    assert config_vote(cluster_state(backend="zookeeper"), nodes) is None
    assert config_vote(cluster_state(), []) is None


def test_progress_lists_who_honours_the_phase() -> None:
    state = cluster_state(phase=Phase.JOINT, target_backend="zookeeper", config_version=4)
    members = [
        member("a", config_version=4),
        member("b", config_version=5),  # a later phase honours this one too
        member("c", config_version=3, status="not campaigning: no zookeeper servers"),
        member("d", config_version=0),
        member("w", roles=("worker",), config_version=0),
    ]
    p = progress(state, members)
    assert p.joined == ["a", "b"]
    assert p.waiting == [("c", "not campaigning: no zookeeper servers"),
                         ("d", "has not seen the new phase yet")]
    assert not p.done
    assert progress(cluster_state(), members).done


def test_cannot_use_says_what_the_phase_needs() -> None:
    stable = cluster_state()
    joint = cluster_state(phase=Phase.JOINT, target_backend="zookeeper", config_version=4)
    moved = cluster_state(backend="zookeeper", config_version=5)
    assert cannot_use(stable, ("dblock",)) is None
    assert cannot_use(joint, ("dblock", "zookeeper")) is None
    assert cannot_use(joint, ("zookeeper", "dblock")) is None
    assert cannot_use(moved, ("zookeeper",)) is None

    why = cannot_use(joint, ("dblock",))
    assert why is not None
    assert "moving from dblock to zookeeper" in why
    assert "config version 4" in why and "[coordination.zookeeper]" in why
    why = cannot_use(moved, ("dblock", "redis"))
    assert why is not None and "runs the zookeeper backend" in why


def test_plan_names_the_steps_and_versions() -> None:
    state = cluster_state(config_version=7)
    steps = plan(state, "zookeeper", [member("a"), member("w", roles=("worker",))])
    assert len(steps) == 4
    assert "config version 8" in steps[0] and "config version 9" in steps[2]
    assert steps[1].endswith(": a"), "only the live scheduler nodes are waited for"
    assert plan(state, "dblock", []) == ["nothing to do: the cluster already runs dblock"]
    joint = cluster_state(phase=Phase.JOINT, target_backend="zookeeper", config_version=8)
    assert plan(joint, "zookeeper", [])[0].startswith("resume the move")
    back = plan(joint, "dblock", [])
    assert len(back) == 1 and back[0].startswith("roll back") and "config version 9" in back[0]


def test_cluster_state_tokens_and_floor() -> None:
    assert cluster_state().tokens == {}
    assert cluster_state(leader_token=4).min_token == 4
    old = cluster_state(leader_backend="dblock", leader_token=7)
    assert old.tokens == {"dblock": 7}
    assert old.min_token == 7
    both = cluster_state(leader_backend="zookeeper", leader_token=90,
                         leader_tokens=json.dumps({"dblock": 120, "zookeeper": 90}))
    assert both.tokens == {"dblock": 120, "zookeeper": 90}
    assert both.min_token == 120, "the floor is above every backend's newest token"


def test_merge_members_keeps_every_incarnation_and_never_compares_clocks() -> None:
    # Each listing's last_seen is on its own server's clock: a ZooKeeper clock ahead of the
    # database's must not hide the live incarnation (its runs would be declared lost).
    old = dataclasses.replace(member("a", session="1"), last_seen=50.0)  # ZooKeeper clock
    new = dataclasses.replace(member("a", session="2"), last_seen=20.0)  # database clock
    same = dataclasses.replace(member("a", session="1"), last_seen=30.0)
    b = member("b")
    assert merge_members([[new, b], [old]]) == [old, new, b]
    assert {(m.node_id, m.session) for m in merge_members([[old], [new]])} == {
        ("a", "1"), ("a", "2")}
    assert merge_members([[old], [same]]) == [old], "the same incarnation keeps its first"


# -- 5. the command line ------------------------------------------------------------------------


@dataclasses.dataclass
class CliCluster:
    config: Path
    db: Database
    settings: Settings


@pytest.fixture
def cli(tmp_path: Path, pg_url: str, zk: ZkNamespace, make_db: DatabaseFactory) -> CliCluster:
    """A config on PostgreSQL that names dblock and has ZooKeeper servers; `db upgrade` done.
    Members stay live for 30 s, so that one registered here outlives a CLI call."""
    config = write_config(tmp_path, pg_url, coordination=zk_coordination(zk),
                          cluster={"member_timeout_seconds": 30})
    upgrade_database(config)
    return CliCluster(config, make_db(pg_url, upgrade=False, cluster=None), load_settings(config))


def test_cli_dry_run_prints_the_plan_and_changes_nothing(cli: CliCluster) -> None:
    before = current(cli.db)
    text, js = run_cli_many(
        [("backend", "migrate", "--to", "zookeeper", "--dry-run"),
         ("backend", "migrate", "--to", "zookeeper", "--dry-run", "--json")],
        config=cli.config,
    )
    assert "plan (dry run, nothing changed): the cluster runs dblock" in text.stdout
    assert "1. joint phase (config version 2)" in text.stdout
    assert "alone (config version 3)" in text.stdout
    result = json.loads(js.stdout)
    assert result["dry_run"] is True
    assert result["phase"] == "stable" and len(result["plan"]) == 4
    assert current(cli.db) == before


def test_cli_refuses_a_move_its_config_cannot_make(cli: CliCluster, tmp_path: Path,
                                                   pg_url: str) -> None:
    no_zk = write_config(tmp_path, pg_url, name="nozk.toml")
    before = current(cli.db)
    result = run_cli("backend", "migrate", "--to", "zookeeper", config=no_zk, check=False)
    assert_cli_error(result, "no [coordination.zookeeper] servers")
    assert current(cli.db) == before


def test_cli_refuses_an_unknown_backend_as_a_usage_error(cli: CliCluster) -> None:
    before = current(cli.db)
    result = run_cli("backend", "migrate", "--to", "bogus", config=cli.config, check=False)
    assert result.returncode == 2
    assert_cli_error(result, "bogus")
    assert current(cli.db) == before


def test_cli_refuses_while_a_scheduler_lacks_the_target(cli: CliCluster) -> None:
    dblock = load_backend_by_name("dblock", cli.settings, cli.db)
    old = MemberInfo(node_id="old", session="x", roles=("scheduler",), backends=("dblock",))
    dblock.heartbeat_member(old)
    # a worker without zookeeper does not matter; it is not in the way
    dblock.heartbeat_member(MemberInfo(node_id="w", session="y", roles=("worker",),
                                       backends=("dblock",)))
    before = current(cli.db)
    result = run_cli("backend", "migrate", "--to", "zookeeper", config=cli.config, check=False)
    # only "old" is named: the worker w lacks zookeeper too, and does not matter
    assert_cli_error(result, "scheduler node(s) old have no [coordination.zookeeper]")
    assert current(cli.db) == before

    # once "old" has stopped heartbeating (it died), it is in nobody's way
    with cli.db.write() as conn:
        conn.execute(schema.members.update().where(schema.members.c.node_id == "old")
                     .values(last_seen=schema.members.c.last_seen - 3600))
    result = run_cli("backend", "migrate", "--to", "zookeeper", "--dry-run", config=cli.config)
    assert "(no live scheduler node)" in result.stdout
    assert current(cli.db) == before


def test_cli_backend_status_json(cli: CliCluster) -> None:
    dblock = load_backend_by_name("dblock", cli.settings, cli.db)
    dblock.heartbeat_member(MemberInfo(
        node_id="n1", session="x", roles=("scheduler",), backends=("dblock", "zookeeper"),
        config_version=1, started_version=1,
    ))
    status = run_json("backend", "status", "--json", config=cli.config)
    assert (status["backend"], status["phase"], status["target_backend"]) == (
        "dblock", "stable", None)
    assert status["config_version"] == 1
    assert status["joined"] == ["n1"] and status["waiting"] == []
    assert [s["node_id"] for s in status["schedulers"]] == ["n1"]


def test_cli_migrate_times_out_going_on_then_rolls_back(cli: CliCluster) -> None:
    start = current(cli.db)
    result = run_cli("backend", "migrate", "--to", "zookeeper", "--timeout", "1",
                     config=cli.config, check=False)
    assert_cli_error(result, "not done after 1s", "it goes on", "--to dblock")
    assert "joint phase (config version 2)" in result.stdout
    joint = current(cli.db)
    assert (joint.backend, joint.phase, joint.target_backend) == (
        "dblock", Phase.JOINT, "zookeeper")
    assert joint.config_version == start.config_version + 1

    status = run_json("backend", "status", "--json", config=cli.config)
    assert (status["backend"], status["phase"], status["target_backend"]) == (
        "dblock", "joint", "zookeeper")
    assert status["config_version"] == joint.config_version

    back = run_cli("backend", "migrate", "--to", "dblock", config=cli.config)
    assert "rolled back" in back.stdout
    final = current(cli.db)
    assert (final.backend, final.phase, final.target_backend) == ("dblock", Phase.STABLE, None)
    assert final.config_version == start.config_version + 2
    assert final.epoch == start.epoch, "the CLI never takes an epoch"


def test_cli_migrate_to_the_current_backend_does_nothing(cli: CliCluster) -> None:
    before = current(cli.db)
    result = run_cli("backend", "migrate", "--to", "dblock", config=cli.config)
    assert "nothing to do" in result.stdout
    assert current(cli.db) == before


def test_cli_during_a_move(cli: CliCluster) -> None:
    _, joint = request_move(cli.db, "zookeeper")
    third, back, resume = run_cli_many(
        [("backend", "migrate", "--to", "redis"),
         ("backend", "migrate", "--to", "dblock", "--dry-run"),
         ("backend", "migrate", "--to", "zookeeper", "--dry-run")],
        config=cli.config, check=False,
    )
    assert_cli_error(third, "moving from dblock to zookeeper", "--to dblock")
    assert back.returncode == 0, back.stderr
    assert "roll back the move from dblock to zookeeper" in back.stdout
    assert resume.returncode == 0, resume.stderr
    assert "resume the move from dblock to zookeeper" in resume.stdout
    assert current(cli.db) == joint


def dead_zookeeper_config(tmp_path: Path, pg_url: str, port: int) -> Path:
    """A config whose ZooKeeper server does not answer (nothing listens on ``port``)."""
    zk = {"hosts": [f"127.0.0.1:{port}"], "session_timeout": 1}
    config = write_config(tmp_path, pg_url, name="deadzk.toml",
                          coordination={"backend": "dblock", "zookeeper": zk})
    upgrade_database(config)
    return config


def test_cli_refuses_a_move_to_an_unreachable_zookeeper(
        tmp_path: Path, pg_url: str, free_port: Callable[[], int]) -> None:
    config = dead_zookeeper_config(tmp_path, pg_url, free_port())
    db = Database(pg_url)
    try:
        before = current(db)
        result = run_cli("backend", "migrate", "--to", "zookeeper", config=config, check=False)
        assert current(db) == before, "a move to an unreachable backend must not start"
        assert_cli_error(result, "cannot reach zookeeper")
    finally:
        db.dispose()


def test_cli_rolls_back_while_the_target_is_unreachable(
        tmp_path: Path, pg_url: str, free_port: Callable[[], int]) -> None:
    config = dead_zookeeper_config(tmp_path, pg_url, free_port())
    db = Database(pg_url)
    try:
        _, joint = request_move(db, "zookeeper")
        status, back = run_cli_many(
            [("backend", "status", "--json"), ("backend", "migrate", "--to", "dblock")],
            config=config, check=False,
        )
        final = current(db)
        assert (final.backend, final.phase, final.target_backend) == ("dblock", Phase.STABLE, None)
        assert final.config_version == joint.config_version + 1
        assert back.returncode == 0 and "rolled back" in back.stdout
        assert status.returncode == 0 and json.loads(status.stdout)["backend"] == "dblock"
    finally:
        db.dispose()


# -- 6. the schema upgrade ----------------------------------------------------------------------


def upgrade_to(db: Database, revision: str) -> None:
    """``alembic upgrade <revision>``, configured as :meth:`Database.upgrade` does."""
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(qcluster.store.migrations.__file__).parent))
    with db.write() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def columns(db: Database, table: str) -> set[str]:
    return {c["name"] for c in sa.inspect(db.engine).get_columns(table)}


def test_a_0001_database_upgrades_and_keeps_its_cluster(db_url: str) -> None:
    db = Database(db_url)
    try:
        upgrade_to(db, "0001")
        assert db.current_revision() == "0001" and not db.is_current()
        assert "leader_tokens" not in columns(db, "qc_cluster")
        with db.write() as conn:
            now = db.now(conn)
            conn.execute(sa.text(
                "INSERT INTO qc_cluster (id, name, backend, phase, target_backend, "
                "config_version, epoch, leader_id, leader_uri, leader_since, leader_backend, "
                "leader_token) VALUES (1, 'prod', 'dblock', 'stable', NULL, 1, 7, 'n1', "
                "'PYRO:n1@h:1', :now, 'dblock', 5)"), {"now": now})
            conn.execute(sa.text(
                "INSERT INTO qc_members (node_id, session, roles, uri, capacity, tags, "
                "backends, config_version, status, last_seen) VALUES ('n1', 's', "
                "'scheduler', NULL, 0, '[]', 'dblock', 1, '', :now)"), {"now": now})

        db.upgrade()
        assert db.is_current()
        assert {"leader_tokens", "phase_since"} <= columns(db, "qc_cluster")
        assert "started_version" in columns(db, "qc_members")
        assert sa.inspect(db.engine).has_table("qc_alembic_version")

        state = current(db)
        assert (state.name, state.backend, state.phase, state.epoch) == (
            "prod", "dblock", Phase.STABLE, 7)
        assert (state.leader_id, state.leader_backend, state.leader_token) == ("n1", "dblock", 5)
        assert state.leader_tokens is None and state.phase_since is None
        assert state.tokens == {"dblock": 5}
        assert state.min_token == 5
        members = DBLockBackend(db, lease_seconds=30.0, member_timeout=60.0).live_members()
        assert [(m.node_id, m.started_version) for m in members] == [("n1", 0)]

        # the fallback fences: another node with the recorded token cannot lead
        with pytest.raises(Fenced, match="older than the newest"):
            take_epoch(db, node_id="n2", uri=uri("n2"), lease=Lease("dblock", "n2", 5, 1.0))
        backend = DBLockBackend(db, lease_seconds=30.0, member_timeout=60.0)
        lease = backend.try_acquire("n2", ignore, state.min_token)
        assert lease is not None and lease.token > 5
        assert take_epoch(db, node_id="n2", uri=uri("n2"), lease=lease) == 8
        assert current(db).tokens == {"dblock": lease.token}

        # and a move works on the upgraded row
        move, joint = request_move(db, "zookeeper")
        assert move is Move.STARTED and joint.config_version == 2
    finally:
        db.dispose()



def test_a_move_checked_on_an_older_phase_writes_nothing(db_url: str) -> None:
    db = Database(db_url)
    try:
        db.upgrade()
        ensure_cluster(db, "t", "dblock")
        before = current(db)
        request_move(db, "zookeeper")  # someone else moved first
        moved = current(db)
        with pytest.raises(InputError, match="changed while the command checked"):
            request_move(db, "dblock", expect_version=before.config_version)
        assert current(db) == moved
    finally:
        db.dispose()


def test_migrate_refuses_a_timeout_that_is_not_a_number(tmp_path: Path, pg_url: str) -> None:
    config = write_config(tmp_path, pg_url)
    for bad in ("nan", "inf", "0", "-1", "soon"):
        result = run_cli("backend", "migrate", "--to", "zookeeper", "--timeout", bad,
                         config=config, check=False)
        assert_cli_error(result, "timeout")


class _LosingWhileAcquiring(CoordinationBackend):
    """A backend whose lease is reported lost while ``try_acquire`` is still running (a
    joint lease's first part, lost while its second part is being taken)."""

    name = "dblock"

    def __init__(self) -> None:
        self.released: list[Lease] = []

    def try_acquire(self, holder: str, on_lost: LossCallback, min_token: int = 0) -> Lease:
        on_lost("session suspended")
        return Lease("dblock", holder, min_token + 1, 5.0)

    def renew(self, lease: Lease) -> bool:
        return True

    def release(self, lease: Lease) -> None:
        self.released.append(lease)

    def publish_leader(self, lease: Lease, info: LeaderInfo) -> None:
        pass

    def read_leader(self) -> LeaderInfo | None:
        return None

    def heartbeat_member(self, member: MemberInfo) -> None:
        pass

    def remove_member(self, member: MemberInfo) -> None:
        pass

    def live_members(self) -> list[MemberInfo]:
        return []


def test_a_lease_lost_while_it_is_being_acquired_is_not_led_on() -> None:
    backend = _LosingWhileAcquiring()
    elected: list[Lease] = []
    leadership = Leadership(
        "n1", plan=lambda: backend, on_elected=elected.append, on_revoked=lambda r: None,
        halt=lambda: None, min_token=lambda: 0, campaign_interval=0.05,
    )
    leadership.start()
    try:
        deadline = time.monotonic() + 5
        while len(backend.released) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        leadership.stop()
    assert elected == [], "led on a lease that was lost while being acquired"
    assert len(backend.released) >= 2, "each lost claim must be given back"


def test_schema_head_names_the_newest_alembic_revision() -> None:
    from alembic.script import ScriptDirectory

    from qcluster.store.db import SCHEMA_HEAD

    script = ScriptDirectory(str(Path(qcluster.store.migrations.__file__).parent))
    assert script.get_current_head() == SCHEMA_HEAD
