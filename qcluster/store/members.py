"""Reads of ``qc_members`` for the leader's recovery (the table's one writer is
``backends/dblock.py``): when the database last heard a worker session, whatever the
cluster's backend (every node heartbeats the database, docs/DESIGN.md invariant 7)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
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
    #: The node's row is another session's now: a restart, or a second process that was
    #: given the same node id (``uri`` and ``silent`` are then that other session's).
    replaced: bool = False


def last_heard(db: Database, sessions: Collection[str],
               nodes: Mapping[str, str] | None = None) -> dict[str, Heard]:
    """The sessions of ``sessions`` that still have a member row, and (given ``nodes``,
    session -> node id) those whose node's row another session holds now. A session in
    neither has no row: it left (a leaving node deletes its own row)."""
    if not sessions:
        return {}
    m = schema.members
    node_ids = sorted({nodes[s] for s in sessions if nodes and s in nodes})
    with db.read() as conn:
        now = db.now(conn)
        rows = conn.execute(sa.select(m.c.node_id, m.c.session, m.c.uri, m.c.last_seen)
                            .where(sa.or_(m.c.session.in_(sorted(sessions)),
                                          m.c.node_id.in_(node_ids)))).all()
    by_session = {r.session: r for r in rows}
    by_node = {r.node_id: r for r in rows}
    out: dict[str, Heard] = {}
    for s in sessions:
        r = by_session.get(s)
        if r is not None:
            out[s] = Heard(r.node_id, r.uri, max(0.0, now - r.last_seen))
        elif nodes and (other := by_node.get(nodes.get(s, ""))) is not None:
            out[s] = Heard(other.node_id, other.uri, max(0.0, now - other.last_seen),
                           replaced=True)
    return out
