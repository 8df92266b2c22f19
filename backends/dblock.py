"""``dblock``: leadership as a lease row in the shared database, as Quartz clusters do.

The lease row ``qc_lease('leader')`` holds the holder, a token and an expiry on the
*database's* clock, so no two machines' wall clocks are ever compared. Every step is one
short transaction: a row lock (``FOR UPDATE``) on PostgreSQL, ``BEGIN IMMEDIATE`` on
SQLite.

* acquire: take the row if it is free or expired; the token becomes
  ``max(token, min_token) + 1``, so it only grows.
* renew: push the expiry forward only if the row still names this holder and token and
  has not expired.
* release: clear the row only if it still names this holder and token.

Membership is the ``qc_members`` table, with ``last_seen`` on the database clock.

This module is the one writer of ``qc_lease`` and ``qc_members``
(``tests/store/test_owners.py``). The leader it publishes goes into ``qc_cluster``
through that table's owner, :func:`qcluster.store.cluster.record_leader`, in the
transaction that checks the lease row.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, RowMapping

from backends.base import (
    CoordinationBackend,
    LeaderInfo,
    Lease,
    LossCallback,
    LossReport,
    MemberInfo,
    member_from_dict,
    member_to_dict,
)
from qcluster.errors import MemberReplaced
from qcluster.store import schema
from qcluster.store.cluster import record_leader
from qcluster.store.db import Database

log = logging.getLogger(__name__)

LEASE_NAME = "leader"


class DBLockBackend(CoordinationBackend):
    """A lease row in the shared database."""

    name = "dblock"

    def __init__(self, db: Database, *, lease_seconds: float, member_timeout: float) -> None:
        self.db = db
        self.lease_seconds = lease_seconds
        self.member_timeout = member_timeout
        # The newest lease's loss report, by token: a lease row has one holder at a time.
        self._losses: dict[int, LossReport] = {}
        self._lock = threading.Lock()
        self._registered: set[str] = set()  # sessions whose first heartbeat committed

    # -- leadership -------------------------------------------------------------------

    def try_acquire(self, holder: str, on_lost: LossCallback, min_token: int = 0) -> Lease | None:
        t = schema.lease
        with self.db.write() as conn:
            held_by, held_token, expires_at = self._lock_lease_row(conn)
            now = self.db.now(conn)
            if held_by is not None and expires_at is not None and expires_at >= now:
                return None
            token = max(held_token, min_token) + 1
            conn.execute(
                t.update()
                .where(t.c.name == LEASE_NAME)
                .values(holder=holder, token=token, expires_at=now + self.lease_seconds)
            )
        with self._lock:
            self._losses = {token: LossReport(on_lost)}
        return Lease(self.name, holder, token, self.lease_seconds)

    def _lock_lease_row(self, conn: Connection) -> tuple[str | None, int, float | None]:
        """The lease row's (holder, token, expires_at), the row locked for this
        transaction; made (free, token 0) if missing.

        Nodes that start together on a new database campaign together: a row lock cannot
        order them while there is no row to lock, and two plain INSERTs would collide on
        the primary key (one node failing with a UniqueViolation). ``ON CONFLICT DO
        NOTHING`` cannot fail that way: on PostgreSQL a second insert waits for the first
        one's transaction and then inserts nothing. The ``FOR UPDATE`` that follows then
        sees the committed row (READ COMMITTED takes a new snapshot per statement) and
        queues the campaigns behind one another as usual, so exactly one of them takes
        the row. On SQLite the write transaction's ``BEGIN IMMEDIATE`` already runs them
        one at a time. A free row with token 0 changes nothing for the first campaign:
        its token is still ``max(0, min_token) + 1``.
        """
        t = schema.lease
        query = (
            sa.select(t.c.holder, t.c.token, t.c.expires_at)
            .where(t.c.name == LEASE_NAME)
            .with_for_update()
        )
        row = conn.execute(query).one_or_none()
        if row is None:  # only on a new database: no INSERT on every campaign
            dialect = postgresql if self.db.dialect == "postgresql" else sqlite
            conn.execute(
                dialect.insert(t)
                .values(name=LEASE_NAME, holder=None, token=0, expires_at=None)
                .on_conflict_do_nothing(index_elements=["name"])
            )
            row = conn.execute(query).one()
        return row.holder, int(row.token), row.expires_at

    def renew(self, lease: Lease) -> bool:
        t = schema.lease
        with self.db.write() as conn:
            now = self.db.now(conn)
            done = conn.execute(
                t.update()
                .where(
                    t.c.name == LEASE_NAME,
                    t.c.holder == lease.holder,
                    t.c.token == lease.token,
                    t.c.expires_at >= now,
                )
                .values(expires_at=now + self.lease_seconds)
            ).rowcount
        if done == 1:
            return True
        self._lost(lease, "the lease row expired or was taken")
        return False

    def release(self, lease: Lease) -> None:
        t = schema.lease
        with self.db.write() as conn:
            conn.execute(
                t.update()
                .where(t.c.name == LEASE_NAME, t.c.holder == lease.holder,
                       t.c.token == lease.token)
                .values(holder=None, expires_at=None)
            )
        with self._lock:
            loss = self._losses.pop(lease.token, None)
        if loss is not None:
            loss.cancel()

    def _lost(self, lease: Lease, reason: str) -> None:
        with self._lock:
            loss = self._losses.pop(lease.token, None)
        if loss is not None:
            loss.report(reason)

    # -- leader publication ----------------------------------------------------------

    def publish_leader(self, lease: Lease, info: LeaderInfo) -> None:
        with self.db.write() as conn:
            if not self._holds(conn, lease):
                self._lost(lease, "the lease row expired or was taken")
                return
            record_leader(conn, info)

    def read_leader(self) -> LeaderInfo | None:
        t, c = schema.lease, schema.cluster
        with self.db.read() as conn:
            now = self.db.now(conn)
            row = conn.execute(
                sa.select(t.c.holder, t.c.expires_at, c.c.leader_id, c.c.leader_uri,
                          c.c.epoch, c.c.leader_since)
                .select_from(t.join(c, sa.true()))
                .where(t.c.name == LEASE_NAME, c.c.id == 1)
            ).one_or_none()
        if (
            row is None
            or row.holder is None
            or row.expires_at is None
            or row.expires_at < now
            or row.leader_id != row.holder
        ):
            return None
        return LeaderInfo(row.leader_id, row.leader_uri or "", int(row.epoch),
                          float(row.leader_since or 0.0))

    def _holds(self, conn: Connection, lease: Lease) -> bool:
        t = schema.lease
        now = self.db.now(conn)
        row = conn.execute(
            sa.select(t.c.holder, t.c.token, t.c.expires_at).where(t.c.name == LEASE_NAME)
        ).one_or_none()
        return (
            row is not None
            and row.holder == lease.holder
            and row.token == lease.token
            and row.expires_at is not None
            and row.expires_at >= now
        )

    # -- membership ------------------------------------------------------------------

    def heartbeat_member(self, member: MemberInfo) -> None:
        m = schema.members
        fields = member_to_dict(member)
        values = fields | {
            # The columns' own forms (store/schema.py): comma lists, and tags as JSON.
            "roles": ",".join(member.roles),
            "tags": json.dumps(fields["tags"]),
            "backends": ",".join(member.backends),
            "last_seen": self.db.now_expr(),
        }
        # A process's first heartbeat takes the node's row whatever it held (a restart
        # replaces the incarnation that died); every later one only updates the row while
        # it is still this session's. Another process that took the id (two nodes started
        # with one id) makes the next heartbeat raise MemberReplaced, and the node stops.
        first = member.session not in self._registered
        with self.db.write() as conn:
            dialect = postgresql if self.db.dialect == "postgresql" else sqlite
            stmt = dialect.insert(m).values(**values)
            update = {k: stmt.excluded[k] for k in values if k != "node_id"}
            upsert = stmt.on_conflict_do_update(
                index_elements=["node_id"], set_=update,
                where=None if first else m.c.session == member.session)
            written = conn.execute(upsert.returning(m.c.node_id)).first()
        if written is None:
            raise MemberReplaced(f"another process registered node id {member.node_id!r}; "
                                 "two nodes must not share an id")
        self._registered.add(member.session)

    def remove_member(self, member: MemberInfo) -> None:
        m = schema.members
        with self.db.write() as conn:
            conn.execute(
                m.delete().where(m.c.node_id == member.node_id, m.c.session == member.session)
            )

    def live_members(self) -> list[MemberInfo]:
        m = schema.members
        with self.db.read() as conn:
            now = self.db.now(conn)
            rows = conn.execute(
                sa.select(m).where(m.c.last_seen >= now - self.member_timeout)
                .order_by(m.c.node_id)
            ).all()
        return [_member(r._mapping) for r in rows]


def _member(row: RowMapping) -> MemberInfo:
    """A ``qc_members`` row read back: the columns' own forms undone, then the codec."""
    fields: dict[str, Any] = dict(row) | {
        "roles": [x for x in (row["roles"] or "").split(",") if x],
        "tags": json.loads(row["tags"] or "[]"),
        "backends": [x for x in (row["backends"] or "").split(",") if x],
    }
    return member_from_dict(fields, row["last_seen"])
