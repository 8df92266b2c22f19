"""The cluster row (``qc_cluster``): the active backend and migration phase, the fencing
epoch, who leads. The owner of the table: no other module writes it (Alembic revisions
aside; ``tests/store/test_owners.py``). Others call these functions:
:mod:`qcluster.leader.migration` decides phase changes and writes them with
:func:`lock_cluster` and :func:`change_phase`; ``backends/dblock`` publishes its leader with
:func:`record_leader`.

Epochs only grow (docs/DESIGN.md invariant 2). A node takes a new epoch only right after it
won a lease, only if that lease covers every backend the current phase requires, and only
if each of its tokens is not older than the newest token taken on that backend before: a
paused ex-leader that wakes up with its old lease cannot fence out the leader that
followed it. When the lease includes ``dblock``, the lease row itself is checked in the
same transaction, on the database clock.

Phases (:class:`Phase`; see :mod:`qcluster.leader.migration`): ``stable`` on ``backend``; or
``joint``, moving from ``backend`` to ``target_backend``, when a leader must hold both.
Every phase change adds one to ``config_version`` and sets ``phase_since`` on the database
clock (:func:`change_phase`, the one place that writes a phase after the first).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from backends.base import LeaderInfo, Lease
from qcluster.errors import Fenced, QClusterError
from qcluster.store import schema
from qcluster.store.db import Database


class Phase(enum.StrEnum):
    """A migration phase. The values are what ``qc_cluster.phase`` holds in existing
    databases (and ``store/schema.py``'s default): they never change."""

    STABLE = "stable"  # the cluster runs ``backend`` alone
    JOINT = "joint"  # moving from ``backend`` to ``target_backend``: a leader holds both


@dataclasses.dataclass(frozen=True)
class ClusterState:
    name: str
    backend: str
    phase: Phase
    target_backend: str | None
    config_version: int
    epoch: int
    leader_id: str | None
    leader_uri: str | None
    leader_since: float | None
    leader_backend: str | None
    leader_token: int
    leader_tokens: str | None = None
    phase_since: float | None = None

    @property
    def required(self) -> tuple[str, ...]:
        """The backends a leader must hold a claim on in this phase, in the order to take
        them (the one the cluster runs first)."""
        if self.phase == Phase.JOINT and self.target_backend:
            return (self.backend, self.target_backend)
        return (self.backend,)

    @property
    def tokens(self) -> dict[str, int]:
        """The newest token each backend's leaders have taken an epoch with."""
        if self.leader_tokens:
            return {str(k): int(v) for k, v in json.loads(self.leader_tokens).items()}
        if self.leader_backend:
            return {self.leader_backend: self.leader_token}
        return {}

    @property
    def min_token(self) -> int:
        """A floor for the next lease's tokens, on whatever backend: above every token
        seen, so tokens keep growing across migrations (and a backend that lost its data,
        a Redis restarted empty or a new ZooKeeper, cannot go backwards)."""
        return max([self.leader_token, *self.tokens.values()])


class WrongBackend(QClusterError):
    """This node's config cannot honour the cluster's active backend."""


def from_row(row: Any) -> ClusterState:
    return ClusterState(
        name=row.name, backend=row.backend, phase=_phase(row.phase),
        target_backend=row.target_backend,
        config_version=row.config_version, epoch=int(row.epoch), leader_id=row.leader_id,
        leader_uri=row.leader_uri, leader_since=row.leader_since,
        leader_backend=row.leader_backend, leader_token=int(row.leader_token),
        leader_tokens=row.leader_tokens, phase_since=row.phase_since,
    )


def _phase(stored: str) -> Phase:
    try:
        return Phase(stored)
    except ValueError:
        known = ", ".join(Phase)
        raise QClusterError(
            f"the cluster row's phase {stored!r} is not one this qcluster knows ({known})"
        ) from None


def read_cluster(db: Database) -> ClusterState | None:
    c = schema.cluster
    with db.read() as conn:
        row = conn.execute(sa.select(c).where(c.c.id == 1)).one_or_none()
    return None if row is None else from_row(row)


def ensure_cluster(db: Database, name: str, backend: str) -> ClusterState:
    """The cluster row; a new cluster takes its name and backend from this node's config."""
    c = schema.cluster
    insert = postgresql.insert if db.dialect == "postgresql" else sqlite.insert
    with db.write() as conn:
        # Two nodes starting at once on a new database: one insert wins, neither fails.
        conn.execute(
            insert(c).values(id=1, name=name, backend=backend, phase=Phase.STABLE,
                             config_version=1, epoch=0, leader_token=0)
            .on_conflict_do_nothing(index_elements=["id"])
        )
        row = conn.execute(sa.select(c).where(c.c.id == 1)).one()
    return from_row(row)


def take_epoch(db: Database, *, node_id: str, uri: str, lease: Lease,
               valid_until: float | None = None) -> int:
    """Take the next epoch for ``lease``'s holder, or raise Fenced / WrongBackend.

    ``valid_until`` is the lease's local deadline (``time.monotonic()``; the leadership
    loop's): once the row's lock is granted, a lease that ran out meanwhile takes no epoch
    (QClusterError), whatever its backend. The wait for the lock itself is bounded by the
    session's ``lock_timeout`` (``settings/timeouts.py``), shorter than the lease."""
    c = schema.cluster
    with db.write() as conn:
        state = lock_cluster(conn)
        if valid_until is not None and time.monotonic() >= valid_until:
            late = time.monotonic() - valid_until
            raise QClusterError(f"the {lease.backend} lease ran out {late:.1f}s before the "
                                "cluster row was locked; no epoch taken")
        _check_lease(state, lease, node_id)
        now = db.now(conn)
        _check_dblock_claim(db, conn, lease, now)
        epoch = state.epoch + 1
        conn.execute(
            c.update().where(c.c.id == 1).values(
                epoch=epoch, leader_id=node_id, leader_uri=uri, leader_since=now,
                **_lease_values(state, lease),
            )
        )
    return epoch


def record_lease(db: Database, *, node_id: str, epoch: int, lease: Lease) -> None:
    """Record that the leader at ``epoch`` now holds ``lease`` (a migration widened or
    narrowed it). Fenced: raises :class:`Fenced` if another epoch was taken since."""
    c = schema.cluster
    with db.write() as conn:
        state = lock_cluster(conn)
        if state.epoch != epoch or state.leader_id != node_id:
            raise Fenced(f"epoch {epoch} is no longer current (now {state.epoch})")
        _check_dblock_claim(db, conn, lease, db.now(conn))
        conn.execute(c.update().where(c.c.id == 1).values(**_lease_values(state, lease)))


def lock_cluster(conn: Connection) -> ClusterState:
    """The cluster row, locked (``FOR UPDATE``) until the caller's transaction ends, so that
    the caller's checks on it (an epoch, a config version) still hold when it writes with
    :func:`change_phase` in the same transaction."""
    c = schema.cluster
    return from_row(conn.execute(sa.select(c).where(c.c.id == 1).with_for_update()).one())


def change_phase(
    db: Database,
    conn: Connection,
    state: ClusterState,
    phase: Phase,
    *,
    target_backend: str | None,
    backend: str | None = None,
) -> ClusterState:
    """Move the cluster from ``state`` (read by :func:`lock_cluster` on ``conn``) to
    ``phase``, on ``backend`` (default: the current one) towards ``target_backend``.

    Adds one to ``config_version`` and sets ``phase_since`` on the database clock. Not
    fenced by itself: the caller checks the epoch or the version on the locked ``state``
    first, in this transaction (:mod:`qcluster.leader.migration`). Returns the row as
    written."""
    c = schema.cluster
    conn.execute(
        c.update().where(c.c.id == 1).values(
            backend=state.backend if backend is None else backend, phase=phase,
            target_backend=target_backend, config_version=state.config_version + 1,
            phase_since=db.now(conn),
        )
    )
    return from_row(conn.execute(sa.select(c).where(c.c.id == 1)).one())


def record_leader(conn: Connection, info: LeaderInfo) -> None:
    """Write who leads (``leader_id``, ``leader_uri``, ``leader_since``) on the caller's
    connection. Not fenced: ``backends/dblock`` calls it only after it found its lease row
    still held, in the same transaction."""
    c = schema.cluster
    conn.execute(
        c.update().where(c.c.id == 1)
        .values(leader_id=info.node_id, leader_uri=info.uri, leader_since=info.since)
    )


def _check_lease(state: ClusterState, lease: Lease, node_id: str) -> None:
    missing = [b for b in state.required if b not in lease.backends]
    if missing:
        if state.phase == Phase.JOINT:
            need = f"a claim on both {state.backend!r} and {state.target_backend!r}"
            where = f"is moving from {state.backend!r} to {state.target_backend!r}"
        else:
            need, where = f"the {state.backend!r} lease", f"runs the {state.backend!r} backend"
        raise WrongBackend(
            f"the cluster {where} and needs {need}; this node holds {lease.backend!r}"
        )
    last = state.tokens
    for backend, token in lease.tokens.items():
        seen = last.get(backend)
        if seen is not None and (
            token < seen or (token == seen and state.leader_id != node_id)
        ):
            raise Fenced(f"{backend} lease token {token} is older than the newest, {seen}")


def _check_dblock_claim(db: Database, conn: Connection, lease: Lease, now: float) -> None:
    claim = lease.part("dblock")
    if claim is None:
        return
    t = schema.lease
    held = conn.execute(
        sa.select(t.c.holder, t.c.token, t.c.expires_at).where(t.c.name == "leader")
    ).one_or_none()
    if (
        held is None
        or held.holder != claim.holder
        or held.token != claim.token
        or held.expires_at is None
        or held.expires_at < now
    ):
        raise Fenced("the dblock lease expired before the epoch could be taken")


def _lease_values(state: ClusterState, lease: Lease) -> dict[str, Any]:
    tokens = state.tokens | lease.tokens
    return {
        "leader_backend": lease.backend,
        "leader_token": lease.token,
        "leader_tokens": json.dumps(tokens, sort_keys=True),
    }

