"""Moving a running cluster from one coordination backend to another.

The cluster row says which phase the cluster is in (:class:`~qcluster.store.cluster.Phase`;
docs/DESIGN.md invariant 9, "Migration between backends"):

``stable`` on A
    Leaders hold A.
``joint`` from A to B
    Leaders hold A *and* B (:mod:`backends.joint`). A node that has not yet seen the
    joint phase still campaigns on A alone and meets the joint leader there.
``stable`` on B
    Reached only when every live scheduler node honours the joint phase (its member
    record carries the joint phase's ``config_version``): from then on, nobody campaigns
    on A alone, and a joint node meets a B-only node on B.

At every step any two nodes that could lead contend on one common lock, and whatever the
locks say, ``take_epoch`` refuses a lease that does not cover the phase, so a node that
slept through a phase change cannot take an epoch. Going back from ``joint`` to
``stable`` on A is safe at once (every joint node holds A).

Who moves the phases: ``qcluster backend migrate`` starts a move (or rolls one back) by
writing the cluster row; the leader finishes it when every scheduler node has joined
(:func:`drive`, once a second). The leader also starts a move by itself when every live
scheduler node's config names the same other backend and each of them started under the
current config version: a rolling restart with edited configs takes the same path as the
command, and nodes still running with an older config do not pull the cluster back.

This module decides; ``qcluster/store/cluster.py``, the owner of ``qc_cluster``, writes
(:func:`~qcluster.store.cluster.lock_cluster`, then
:func:`~qcluster.store.cluster.change_phase`, in one transaction under the row lock).
"""

from __future__ import annotations

import dataclasses
import enum

from backends.base import MemberInfo
from backends.loader import BACKENDS
from qcluster.errors import Fenced, InputError
from qcluster.store.cluster import ClusterState, Phase, change_phase, lock_cluster
from qcluster.store.db import Database


class Move(enum.Enum):
    STARTED = "started"
    RESUMED = "resumed"
    ROLLED_BACK = "rolled back"
    NOTHING = "nothing to do"


@dataclasses.dataclass(frozen=True)
class Progress:
    """Where a move stands, as the CLI shows it."""

    state: ClusterState
    joined: list[str]
    waiting: list[tuple[str, str]]  # (node id, why it has not joined)

    @property
    def done(self) -> bool:
        return self.state.phase == Phase.STABLE


def request_move(
    db: Database, to: str, *, epoch: int | None = None, expect_version: int | None = None
) -> tuple[Move, ClusterState]:
    """Start a move to ``to``, resume the one under way, or roll it back.

    ``epoch``: the leader's epoch, when the leader makes the move (fenced); the CLI passes
    ``None`` and relies on the row lock alone (it never leads, so it fences nobody out).
    ``expect_version``: the config version the caller's checks were made on; if the
    phase changed since, nothing is written (InputError).
    """
    if to not in BACKENDS:
        raise InputError(f"unknown backend {to!r}; choose one of {', '.join(BACKENDS)}")
    with db.write() as conn:
        state = lock_cluster(conn)
        if epoch is not None and state.epoch != epoch:
            raise Fenced(f"epoch {epoch} is no longer current (now {state.epoch})")
        if expect_version is not None and state.config_version != expect_version:
            raise InputError(
                f"the cluster's phase changed while the command checked it (config version "
                f"{expect_version} -> {state.config_version}); run it again"
            )
        target: str | None
        if state.phase == Phase.JOINT:
            if state.target_backend == to:
                return Move.RESUMED, state
            if state.backend != to:
                raise InputError(
                    f"the cluster is moving from {state.backend} to {state.target_backend}; "
                    f"finish that (--to {state.target_backend}) or roll it back "
                    f"(--to {state.backend}) first"
                )
            phase, target, move = Phase.STABLE, None, Move.ROLLED_BACK
        elif state.backend == to:
            return Move.NOTHING, state
        else:
            phase, target, move = Phase.JOINT, to, Move.STARTED
        new = change_phase(db, conn, state, phase, target_backend=target)
    return move, new


def complete_move(db: Database, *, epoch: int, version: int) -> ClusterState | None:
    """Leave the joint phase ``version`` for the target backend alone. Fenced on the
    leader's epoch; ``None`` if the phase changed meanwhile (rolled back, say)."""
    with db.write() as conn:
        state = lock_cluster(conn)
        if state.epoch != epoch:
            raise Fenced(f"epoch {epoch} is no longer current (now {state.epoch})")
        if (state.phase != Phase.JOINT or state.config_version != version
                or not state.target_backend):
            return None
        # config_version becomes version + 1: change_phase adds one to the checked version.
        return change_phase(db, conn, state, Phase.STABLE, backend=state.target_backend,
                            target_backend=None)


def schedulers(members: list[MemberInfo]) -> list[MemberInfo]:
    return [m for m in members if "scheduler" in m.roles]


def progress(state: ClusterState, members: list[MemberInfo]) -> Progress:
    """Which live scheduler nodes honour the current phase, and why the others do not."""
    joined: list[str] = []
    waiting: list[tuple[str, str]] = []
    for m in schedulers(members):
        if m.config_version >= state.config_version:
            joined.append(m.node_id)
        else:
            waiting.append((m.node_id, m.status or "has not seen the new phase yet"))
    return Progress(state, joined, waiting)


def cannot_use(state: ClusterState, capabilities: tuple[str, ...]) -> str | None:
    """Why a node whose config can use ``capabilities`` cannot honour the phase, or None."""
    missing = [b for b in state.required if b not in capabilities]
    if not missing:
        return None
    where = (f"is moving from {state.backend} to {state.target_backend}"
             if state.phase == Phase.JOINT else f"runs the {state.backend} backend")
    return (
        f"the cluster {where} (config version {state.config_version}) and this node's "
        f"config has no [coordination.{missing[0]}] servers; update the config and restart"
    )


def config_vote(state: ClusterState, members: list[MemberInfo]) -> str | None:
    """The backend every live scheduler node's config asks for, if the cluster should
    move there: all name the same other backend, all can use both, and all started
    under the current config version (a node still running an older config has not
    asked for anything since the last move)."""
    if state.phase != Phase.STABLE:
        return None
    nodes = schedulers(members)
    if not nodes:
        return None
    wanted = {m.backends[0] if m.backends else "" for m in nodes}
    if len(wanted) != 1:
        return None
    to = wanted.pop()
    if not to or to == state.backend or to not in BACKENDS:
        return None
    for m in nodes:
        if m.started_version != state.config_version:
            return None
        if to not in m.backends or state.backend not in m.backends:
            return None
    return to


def plan(state: ClusterState, to: str, members: list[MemberInfo]) -> list[str]:
    """The steps a move to ``to`` takes from ``state``, as lines for ``--dry-run``."""
    nodes = [m.node_id for m in schedulers(members)]
    who = ", ".join(nodes) or "(no live scheduler node)"
    if state.phase == Phase.JOINT and state.target_backend == to:
        return [
            f"resume the move from {state.backend} to {to} (joint phase, config version "
            f"{state.config_version})",
            f"wait until every live scheduler node honours it: {who}",
            f"then the leader switches the cluster to {to} alone "
            f"(config version {state.config_version + 1})",
        ]
    if state.phase == Phase.JOINT:
        return [
            f"roll back the move from {state.backend} to {state.target_backend}: the "
            f"cluster runs {state.backend} alone again (config version "
            f"{state.config_version + 1}); joint leaders keep their {state.backend} lease",
        ]
    if state.backend == to:
        return [f"nothing to do: the cluster already runs {to}"]
    v = state.config_version
    return [
        f"1. joint phase (config version {v + 1}): a leader must hold both the {state.backend} "
        f"and the {to} lease; the current leader takes its {to} lease as well",
        f"2. wait until every live scheduler node honours the joint phase: {who}",
        f"3. the leader switches the cluster to {to} alone (config version {v + 2}) and "
        f"gives its {state.backend} lease back",
        "the schedule keeps running throughout; the SQL epoch keeps growing",
    ]
