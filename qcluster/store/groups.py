"""The owner of ``qc_groups``: which worker each affinity group sits on (issue 16, item 2;
docs/DESIGN.md, "Routing").

Only the leader writes it, in a transaction fenced on its epoch: its dispatcher places a
group on a worker when the group's first run is sent, and moves it only when that worker
is no longer a live member. A new leader reads the placements when its term starts, so a
group stays where it was across leader changes. Anyone reads (``cluster status``,
``jobs show``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from qcluster.store import schema


def placements(conn: Connection, names: Sequence[str] | None = None) -> dict[str, str]:
    """Each group's worker (node id): every group's, or those of ``names``."""
    g = schema.groups
    query = sa.select(g.c.name, g.c.worker)
    if names is not None:
        query = query.where(g.c.name.in_(sorted(set(names))))
    return {name: worker for name, worker in conn.execute(query)}


def place(conn: Connection, name: str, worker: str, *, epoch: int, now: float) -> None:
    """Group ``name`` sits on ``worker`` from now on (the caller's fenced transaction): a
    new row, or a move (``moves`` counts them)."""
    g = schema.groups
    insert = (postgresql.insert(g) if conn.dialect.name == "postgresql" else sqlite.insert(g))
    stmt = insert.values(name=name, worker=worker, placed_at=now, epoch=epoch, moves=0)
    conn.execute(stmt.on_conflict_do_update(
        index_elements=["name"],
        set_={"worker": worker, "placed_at": now, "epoch": epoch,
              "moves": sa.case((g.c.worker == worker, g.c.moves), else_=g.c.moves + 1)}))


def list_groups(conn: Connection) -> list[dict[str, Any]]:
    """Every placement, by name: ``name``, ``worker``, ``since`` (seconds since the Unix
    epoch), ``moves``."""
    g = schema.groups
    return [{"name": r.name, "worker": r.worker, "since": float(r.placed_at),
             "moves": int(r.moves)}
            for r in conn.execute(sa.select(g).order_by(g.c.name))]
