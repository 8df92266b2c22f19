"""The cluster row: the active backend, the fencing epoch, and who leads.

Epochs only grow (DESIGN.md invariant 2). A node takes a new epoch only right after it
won a lease, and only if its lease token is not older than the token of the last epoch
taken on the same backend: a paused ex-leader that wakes up with its old lease cannot
fence out the leader that followed it. On ``dblock`` the lease row itself is checked in
the same transaction, on the database clock.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from backends.base import Lease
from qcluster import schema
from qcluster.db import Database
from qcluster.errors import Fenced, QClusterError


@dataclasses.dataclass(frozen=True)
class ClusterState:
    name: str
    backend: str
    phase: str
    target_backend: str | None
    config_version: int
    epoch: int
    leader_id: str | None
    leader_uri: str | None
    leader_since: float | None
    leader_backend: str | None
    leader_token: int


class WrongBackend(QClusterError):
    """This node's config cannot honour the cluster's active backend."""


def _state(row: Any) -> ClusterState:
    return ClusterState(
        name=row.name, backend=row.backend, phase=row.phase, target_backend=row.target_backend,
        config_version=row.config_version, epoch=int(row.epoch), leader_id=row.leader_id,
        leader_uri=row.leader_uri, leader_since=row.leader_since,
        leader_backend=row.leader_backend, leader_token=int(row.leader_token),
    )


def read_cluster(db: Database) -> ClusterState | None:
    c = schema.cluster
    with db.read() as conn:
        row = conn.execute(sa.select(c).where(c.c.id == 1)).one_or_none()
    return None if row is None else _state(row)


def ensure_cluster(db: Database, name: str, backend: str) -> ClusterState:
    """The cluster row; a new cluster takes its name and backend from this node's config."""
    c = schema.cluster
    insert = postgresql.insert if db.dialect == "postgresql" else sqlite.insert
    with db.write() as conn:
        # Two nodes starting at once on a new database: one insert wins, neither fails.
        conn.execute(
            insert(c).values(id=1, name=name, backend=backend, phase="stable",
                             config_version=1, epoch=0, leader_token=0)
            .on_conflict_do_nothing(index_elements=["id"])
        )
        row = conn.execute(sa.select(c).where(c.c.id == 1)).one()
    return _state(row)


def take_epoch(db: Database, *, node_id: str, uri: str, lease: Lease) -> int:
    """Take the next epoch for ``lease``'s holder, or raise Fenced / WrongBackend."""
    c, t = schema.cluster, schema.lease
    with db.write() as conn:
        row = conn.execute(sa.select(c).where(c.c.id == 1).with_for_update()).one()
        if row.backend != lease.backend:
            raise WrongBackend(
                f"the cluster runs the {row.backend!r} backend; this node leads on "
                f"{lease.backend!r}"
            )
        if row.leader_backend == lease.backend and (
            lease.token < row.leader_token
            or (lease.token == row.leader_token and row.leader_id != node_id)
        ):
            raise Fenced(
                f"lease token {lease.token} is older than the last leader's {row.leader_token}"
            )
        now = db.now(conn)
        if lease.backend == "dblock":
            held = conn.execute(
                sa.select(t.c.holder, t.c.token, t.c.expires_at).where(t.c.name == "leader")
            ).one_or_none()
            if (
                held is None
                or held.holder != node_id
                or held.token != lease.token
                or held.expires_at is None
                or held.expires_at < now
            ):
                raise Fenced("the lease expired before the epoch could be taken")
        epoch = int(row.epoch) + 1
        conn.execute(
            c.update().where(c.c.id == 1).values(
                epoch=epoch, leader_id=node_id, leader_uri=uri, leader_since=now,
                leader_backend=lease.backend, leader_token=lease.token,
            )
        )
    return epoch


def clear_leader(db: Database, *, node_id: str, epoch: int) -> None:
    """Forget the published leader, if it is still us at ``epoch`` (graceful stop)."""
    c = schema.cluster
    with db.write() as conn:
        conn.execute(
            c.update()
            .where(c.c.id == 1, c.c.leader_id == node_id, c.c.epoch == epoch)
            .values(leader_uri=None)
        )
