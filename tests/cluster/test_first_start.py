"""Three nodes started at the same moment on an empty database (issue 11).

Nothing exists yet: no tables, no cluster row, no lease row, no member rows. Every node
creates the schema, the cluster row, its member row and the lease row at about the same
time. Those races are expected, so they must be settled without an error: one leader,
the schema at head, and not one ERROR line or traceback in any node's log.

Left alone, the nodes rarely collide at the lease row: the schema upgrade, which they
take turns at, spaces them out by more than the width of the race. On PostgreSQL the test
therefore lines them up there: as soon as the schema exists, before any lease row does,
it locks ``qc_lease`` and lets go only once all three nodes wait for it, so that their
first campaigns meet an empty lease table together.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from qcluster.store import schema
from qcluster.store.cluster import read_cluster
from qcluster.store.db import SCHEMA_HEAD
from tests.cluster.harness import Cluster, cluster
from tests.helpers import TEST_SETTINGS, wait_for, write_config

pytestmark = pytest.mark.cluster

NODES = ("n1", "n2", "n3")
FORBIDDEN = ("ERROR", "Traceback", "UniqueViolation", "IntegrityError")


def _tables(url: str) -> list[str]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return sorted(sa.inspect(conn).get_table_names())
    finally:
        engine.dispose()


def _gone(c: Cluster) -> None:
    gone = [n for n in NODES if not c.nodes[n].running()]
    assert not gone, f"{gone} exited during start-up\n{c.leader_logs()}"


def _line_up_at_the_lease_row(c: Cluster, url: str) -> None:
    """Lock ``qc_lease`` as soon as the schema is committed, and let go once every node
    waits for it, so that their first campaigns run together (PostgreSQL). Call it right
    after starting the nodes."""
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            deadline = time.monotonic() + 60
            while True:  # poll often: the first node campaigns soon after its upgrade
                _gone(c)
                assert time.monotonic() < deadline, f"no schema\n{c.leader_logs()}"
                conn.exec_driver_sql("BEGIN")
                try:
                    conn.exec_driver_sql("LOCK TABLE qc_lease IN ACCESS EXCLUSIVE MODE NOWAIT")
                    break
                except DBAPIError:  # not created (committed) yet, or just being created
                    conn.exec_driver_sql("ROLLBACK")
                    time.sleep(0.002)
            rows = conn.exec_driver_sql("SELECT count(*) FROM qc_lease").scalar_one()
            assert rows == 0, "the gate came too late: a node had already made the lease row"

            def waiting() -> bool:
                _gone(c)
                n = conn.exec_driver_sql(
                    "SELECT count(DISTINCT pid) FROM pg_locks "
                    "WHERE relation = 'qc_lease'::regclass AND NOT granted"
                ).scalar_one()
                return bool(n == len(NODES))

            try:
                wait_for(waiting, timeout=60, interval=0.02,
                         what="every node to wait at the lease row", details=c.leader_logs)
            finally:
                conn.exec_driver_sql("COMMIT")  # all three campaign at once from here
    finally:
        engine.dispose()


@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
def test_three_nodes_started_at_once_on_an_empty_database(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> None:
    url: str = request.getfixturevalue("pg_url" if kind == "postgresql" else "sqlite_url")
    if kind == "postgresql":
        assert _tables(url) == [], "the test needs a fresh, empty database"
    else:
        assert not (tmp_path / "qcluster.db").exists()
    config = write_config(tmp_path, url)
    lease = float(TEST_SETTINGS["coordination"]["dblock"]["lease_seconds"])
    with cluster(tmp_path, config, url) as c:
        # No `db upgrade` first: each node finds an empty database and sets it up. The
        # three are started back to back, so their start-ups overlap.
        for node_id in NODES:
            c.start(node_id, "all")
        if kind == "postgresql":
            _line_up_at_the_lease_row(c, url)

        def elected() -> bool:
            _gone(c)
            if not c.db.is_current():
                return False
            state = read_cluster(c.db)
            return state is not None and state.epoch > 0

        wait_for(elected, timeout=60, what="a leader", details=c.leader_logs)
        leader = c.wait_leader(timeout=10)
        # Let the two followers campaign several times against the held lease, and the
        # leader renew it, before looking.
        time.sleep(3 * lease)

        logs = {node_id: c.nodes[node_id].log() for node_id in NODES}
        for node_id, text in logs.items():
            assert c.nodes[node_id].running(), f"{node_id} exited\n{c.leader_logs()}"
            bad = [line for line in text.splitlines() if any(w in line for w in FORBIDDEN)]
            assert not bad, f"the log of {node_id} has errors:\n" + "\n".join(bad[:20])

        leading = [n for n, text in logs.items() if "leading the cluster at epoch" in text]
        assert leading == [leader.leader_id], f"leaders: {leading}\n{c.leader_logs()}"
        now = c.state()
        assert (now.epoch, now.leader_id) == (leader.epoch, leader.leader_id)
        assert now.epoch == 1, "only one node may ever have taken an epoch"

        assert c.db.current_revision() == SCHEMA_HEAD
        assert c.db.is_current()
        with c.db.read() as conn:
            clusters = conn.execute(sa.select(sa.func.count()).select_from(schema.cluster))
            assert clusters.scalar_one() == 1
            lease_rows = conn.execute(sa.select(schema.lease)).all()
        assert [(r.name, r.holder) for r in lease_rows] == [("leader", leader.leader_id)]

        def members() -> list[str] | None:
            with c.db.read() as conn:
                ids = sorted(conn.execute(sa.select(schema.members.c.node_id)).scalars())
            return ids if ids == list(NODES) else None

        wait_for(members, timeout=10, what="three member rows")
