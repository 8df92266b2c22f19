"""How long a database session may wait, derived from the lease (docs/DESIGN.md invariant
8): every PostgreSQL session gets ``lock_timeout``, ``statement_timeout`` and
``idle_in_transaction_session_timeout``, and every SQLite connection a busy timeout, all
shorter than the shortest lease this config can hold.

So ``take_epoch`` (``FOR UPDATE`` on the cluster row) never waits longer than the lease on
a lock that a dead session (cut off, its transaction open) still holds: it gives up after
``lock`` seconds with a clear error, and the leadership loop campaigns again. The server
ends such a session itself after ``idle_in_transaction`` seconds (or ``statement`` seconds
for a statement under way), which releases its locks.
"""

from __future__ import annotations

import dataclasses

from qcluster.settings.model import Settings

#: Fractions of the lease. The lock wait is the shortest, so a leader that waited the whole
#: of it still has half its lease left to step down in.
LOCK_FRACTION = 0.5
STATEMENT_FRACTION = 0.8
IDLE_FRACTION = 0.8


@dataclasses.dataclass(frozen=True)
class SessionTimeouts:
    """Seconds; each one shorter than ``lease``."""

    lease: float
    lock: float
    statement: float
    idle_in_transaction: float


def lease_seconds(settings: Settings) -> float:
    """The shortest lease this config can hold: ``[coordination.dblock] lease_seconds``,
    and ``[coordination.zookeeper] session_timeout`` and ``[coordination.redis]
    lease_seconds`` when the config has their servers (a migration may move the cluster
    onto any of them)."""
    c = settings.coordination
    leases = {"dblock": c.dblock.lease_seconds, "zookeeper": c.zookeeper.session_timeout,
              "redis": c.redis.lease_seconds}
    return min(leases[name] for name in c.capabilities())


def session_timeouts(settings: Settings) -> SessionTimeouts:
    lease = lease_seconds(settings)
    return SessionTimeouts(lease=lease, lock=lease * LOCK_FRACTION,
                           statement=lease * STATEMENT_FRACTION,
                           idle_in_transaction=lease * IDLE_FRACTION)
