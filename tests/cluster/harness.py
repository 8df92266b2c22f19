"""A cluster of real ``qcluster start`` processes, and the exactly-once check.

Each node is its own process (:class:`tests.helpers.NodeProcess`), killed with SIGKILL,
paused with SIGSTOP, stopped with SIGTERM. The check reads two independent records: the
runs table, and the lines that ``jobs.examples:record_run`` appends from inside each job
through ``current_run()``.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from qcluster.store import schema
from qcluster.store.cluster import ClusterState, read_cluster
from qcluster.store.db import Database
from tests.helpers import (
    NodeProcess,
    read_records,
    run_cli,
    start_node,
    wait_for,
    write_config,
    write_job_file,
)

SETTLED = ("succeeded", "failed", "missed", "lost")


class Cluster:
    """Scheduler and worker processes on one config."""

    def __init__(self, tmp_path: Path, config: Path, db_url: str) -> None:
        self.tmp_path = tmp_path
        self.config = config
        self.db = Database(db_url)
        self.nodes: dict[str, NodeProcess] = {}
        self.records = tmp_path / "records.jsonl"

    def start(self, node_id: str, role: str) -> NodeProcess:
        return self.start_with(node_id, role, self.config)

    def start_with(self, node_id: str, role: str, config: Path) -> NodeProcess:
        """Start node ``node_id`` with ``role`` on a config of its own."""
        old = self.nodes.get(node_id)
        if old is not None:
            old.close()
        log = self.tmp_path / f"{node_id}.{int(time.time() * 1000)}.log"
        node = start_node(config, node_id=node_id, role=role, log_path=log)
        self.nodes[node_id] = node
        return node

    def close(self) -> None:
        for node in self.nodes.values():
            with contextlib.suppress(Exception):
                node.close()
        self.db.dispose()

    # -- leadership -------------------------------------------------------------------------

    def state(self) -> ClusterState:
        state = read_cluster(self.db)
        assert state is not None
        return state

    def wait_leader(self, *, other_than: str | None = None, after_epoch: int = 0,
                    timeout: float = 30.0) -> ClusterState:
        """Wait until a live node leads at an epoch above ``after_epoch``."""
        def ready() -> ClusterState | None:
            try:
                s = self.state()
            except Exception:  # the database may be down in an outage test
                return None
            node = self.nodes.get(s.leader_id or "")
            if (s.epoch > after_epoch and s.leader_id != other_than and node is not None
                    and node.running() and s.leader_uri):
                return s
            return None

        found = wait_for(ready, timeout=timeout, what=f"a leader after epoch {after_epoch}")
        assert isinstance(found, ClusterState)
        return found

    # -- jobs and runs --------------------------------------------------------------------------

    def add_second_jobs(self, n: int, **extra: Any) -> list[str]:
        ids = [f"tick{i}" for i in range(n)]
        jobs = [{"id": i, "func": "jobs.examples:record_run", "every": "1s",
                 "kwargs": {"path": str(self.records)}, **extra} for i in ids]
        run_cli("jobs", "apply", str(write_job_file(self.tmp_path / "jobs.toml", jobs)),
                config=self.config)
        return ids

    def start_small(self, jobs: int) -> tuple[ClusterState, list[str], float]:
        """Two schedulers and a worker with ``jobs`` one-second jobs, two seconds into
        their runs: (the leader's state, the job ids, the first fire time)."""
        for s in ("s1", "s2"):
            self.start(s, "scheduler")
        self.start("w1", "worker")
        leader = self.wait_leader()
        ids = self.add_second_jobs(jobs)
        first = wait_for(lambda: min((r.scheduled_at for r in self.runs()), default=None),
                         timeout=30, what="the first fire")
        assert isinstance(first, float)
        time.sleep(2)
        assert leader.leader_id is not None
        return leader, ids, first

    def runs(self) -> list[Any]:
        with self.db.read() as conn:
            return list(conn.execute(sa.select(schema.runs).order_by(schema.runs.c.id)))

    def wait_settled(self, until: float, timeout: float = 40.0) -> list[Any]:
        """Wait until every run scheduled up to ``until`` has a final status."""
        def settled() -> list[Any] | None:
            rows = self.runs()
            open_ = [r for r in rows if r.scheduled_at <= until and r.status not in SETTLED]
            return None if open_ else rows

        rows = wait_for(settled, timeout=timeout, what=f"runs up to {until} to settle")
        assert isinstance(rows, list)
        return rows

    def leader_logs(self) -> str:
        return "\n".join(f"--- {k}\n{n.log_tail(3000)}" for k, n in self.nodes.items())


def check_exactly_once(rows: list[Any], records: list[dict[str, Any]], job_ids: list[str],
                       start: float, end: float) -> collections.Counter[str]:
    """Every (job, second) in [start, end] ran exactly once or is a ``missed`` row; none
    ran twice; no row is silently absent. Returns the count of each final status."""
    executed = collections.Counter((r["job_id"], r["scheduled_at"]) for r in records)
    twice = {k: n for k, n in executed.items() if n > 1}
    assert not twice, f"fires that ran more than once: {sorted(twice)[:10]}"
    by_key = {(r.job_id, r.scheduled_at): r for r in rows}
    statuses: collections.Counter[str] = collections.Counter()
    for job_id in job_ids:
        t = float(int(start))
        while t <= end:
            row = by_key.get((job_id, t))
            assert row is not None, f"fire {job_id}@{t} has no run row (silently absent)"
            statuses[row.status] += 1
            ran = executed.get((job_id, t), 0)
            if row.status == "succeeded":
                assert ran == 1, f"{job_id}@{t} is succeeded but ran {ran} times"
            else:
                assert row.status == "missed", f"{job_id}@{t} ended {row.status}: {row.error}"
                assert ran == 0, f"{job_id}@{t} is missed but ran"
            t += 1.0
    return statuses


@contextlib.contextmanager
def cluster(tmp_path: Path, config: Path, db_url: str) -> Iterator[Cluster]:
    c = Cluster(tmp_path, config, db_url)
    try:
        yield c
    finally:
        c.close()


def upgrade_database(config: Path) -> None:
    """What ``qcluster db upgrade`` does for ``config`` (the tables, and the cluster row),
    called in this process: a CLI process would add one to three seconds to the setup of
    every test that needs the tables. The command itself is tested in tests/cli."""
    from qcluster.client.admin import upgrade_db
    from qcluster.settings import load_settings

    upgrade_db(load_settings(config, env={}))


def records_of(c: Cluster) -> list[dict[str, Any]]:
    return read_records(c.records) if c.records.exists() else []


def run_outage(tmp_path: Path, db_url: str, overrides: dict[str, Any],
               stop: Any, start: Any, outage: float) -> dict[str, int]:
    """Two schedulers and a worker; ``stop()`` a server, see the leader step down, wait
    ``outage`` s, ``start()`` it again, see a newer leader, and check exactly-once."""
    config = write_config(tmp_path, db_url, **overrides)
    upgrade_database(config)
    with cluster(tmp_path, config, db_url) as c:
        old, jobs, first = c.start_small(2)
        leader = old.leader_id
        assert leader is not None
        stop()
        wait_for(lambda: "stepping down" in c.nodes[leader].log(), timeout=20,
                 what="the leader to step down when its backend went away")
        time.sleep(outage)
        start()
        back = c.wait_leader(after_epoch=old.epoch, timeout=60)
        time.sleep(5)
        end = time.time() - 2
        rows = c.wait_settled(end)
        statuses = check_exactly_once(rows, records_of(c), jobs, first, end)
        assert statuses["succeeded"] > 0
        assert back.epoch > old.epoch
        return dict(statuses)
