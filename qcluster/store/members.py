"""Reads of ``qc_members`` for the leader's recovery (the table's one writer is
``backends/dblock.py``): when the database last heard a worker session, whatever the
cluster's backend (every node heartbeats the database, docs/DESIGN.md invariant 7)."""

from __future__ import annotations

from collections.abc import Collection
from typing import NamedTuple

import sqlalchemy as sa

from qcluster.store import schema
from qcluster.store.db import Database


class Heard(NamedTuple):
    """A session's ``qc_members`` row: its RPC address, and the seconds since its last
    heartbeat on the database's clock."""

    node_id: str
    uri: str | None
    silent: float


def last_heard(db: Database, sessions: Collection[str]) -> dict[str, Heard]:
    """The sessions of ``sessions`` that still have a member row (a node's row is deleted
    when it leaves, and replaced when it restarts as a new session)."""
    if not sessions:
        return {}
    m = schema.members
    with db.read() as conn:
        now = db.now(conn)
        rows = conn.execute(sa.select(m.c.node_id, m.c.session, m.c.uri, m.c.last_seen)
                            .where(m.c.session.in_(sorted(sessions)))).all()
    return {r.session: Heard(r.node_id, r.uri, max(0.0, now - r.last_seen)) for r in rows}
