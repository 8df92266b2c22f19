"""``[dispatch] strategy = "consistent_hash"`` with real processes (issue 16, item 6): two
schedulers and two workers on PostgreSQL, the leader killed by SIGKILL mid-run. Each job
runs on one worker only, the same under the new leader as under the old, and every fire
runs exactly once."""

from __future__ import annotations

import collections
import time
from pathlib import Path

import pytest

from tests.cluster.harness import check_exactly_once, cluster, records_of, upgrade_database
from tests.helpers import run_json, wait_for, write_config

pytestmark = pytest.mark.cluster


def test_consistent_hash_keeps_each_job_on_one_worker_across_a_leader_kill(
        pg_url: str, tmp_path: Path) -> None:
    config = write_config(tmp_path, pg_url, dispatch={"strategy": "consistent_hash"})
    upgrade_database(config)
    with cluster(tmp_path, config, pg_url) as c:
        for name, role in (("s1", "scheduler"), ("s2", "scheduler"), ("w1", "worker"),
                           ("w2", "worker")):
            c.start(name, role)
        first = c.wait_leader()
        def workers() -> bool:  # both, before any job: a worker that joins takes its share
            status = run_json("cluster", "status", "--json", config=config)
            return sum(1 for m in status["members"] if m["uri"]) == 2

        wait_for(workers, 30, what="both workers")
        jobs = c.add_second_jobs(8)
        start = wait_for(lambda: min((r.scheduled_at for r in c.runs()), default=None),
                         timeout=30, what="the first fire")
        time.sleep(5)
        assert first.leader_id is not None
        c.nodes[first.leader_id].kill()
        second = c.wait_leader(other_than=first.leader_id, after_epoch=first.epoch)
        time.sleep(6)
        end = time.time() - 2
        rows = c.wait_settled(end)
        check_exactly_once(rows, records_of(c), jobs, start, end)
        by_job: dict[str, dict[int, set[str]]] = collections.defaultdict(
            lambda: collections.defaultdict(set))
        for r in rows:
            if r.status == "succeeded" and start <= r.scheduled_at <= end:
                by_job[r.job_id][r.epoch].add(r.worker)
        assert set(by_job) == set(jobs)
        places = {job: set().union(*epochs.values()) for job, epochs in by_job.items()}
        assert all(len(p) == 1 for p in places.values()), places  # one worker per job
        assert {second.epoch, first.epoch} <= {e for ep in by_job.values() for e in ep}
        assert {next(iter(p)) for p in places.values()} == {"w1", "w2"}  # both used
