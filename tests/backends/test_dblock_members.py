"""dblock membership when two processes are given one node id (issue 14, attack): the
first heartbeat of a process takes the node's row, every later one only keeps it, so the
process whose row was taken learns it at its next heartbeat (MemberReplaced) and the node
stops. SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from backends.base import MemberInfo
from backends.dblock import DBLockBackend
from qcluster.errors import MemberReplaced
from qcluster.store.db import Database


def test_the_process_whose_row_another_took_is_told_at_its_next_heartbeat(
    db: Database
) -> None:
    old, new = (DBLockBackend(db, lease_seconds=2, member_timeout=3) for _ in range(2))
    first = MemberInfo("w1", "s-old", ("worker",), "PYRO:a@127.0.0.1:1", 1)
    second = MemberInfo("w1", "s-new", ("worker",), "PYRO:b@127.0.0.1:2", 1)
    old.heartbeat_member(first)
    old.heartbeat_member(first)  # its own row: kept
    new.heartbeat_member(second)  # a restart takes the row at once
    with pytest.raises(MemberReplaced, match="node id 'w1'"):
        old.heartbeat_member(first)
    assert [(m.node_id, m.session) for m in old.live_members()] == [("w1", "s-new")]
    new.heartbeat_member(second)
