"""Dependent jobs with real processes (issue 16, item 1): a chain a -> b -> c, a every
second, on two schedulers and three workers on PostgreSQL. The leader is killed (SIGKILL)
and then a worker mid-chain (while it runs a ``b``). Every ``b`` and ``c`` is recorded
once per ``a`` run (keyed on the parent's fire time, naming its parent run), runs when
its parent succeeded, and each attempt of a job's code ran once."""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.harness import SETTLED, Cluster, cluster, records_of, upgrade_database
from tests.helpers import run_cli, wait_for, write_config, write_job_file

pytestmark = pytest.mark.cluster
ENDED = (*SETTLED, "skipped", "cancelled")


def test_a_chain_runs_each_child_once_per_parent_run_across_a_leader_and_a_worker_kill(
        pg_url: str, tmp_path: Path) -> None:
    config = write_config(tmp_path, pg_url)
    upgrade_database(config)
    with cluster(tmp_path, config, pg_url) as c:
        for name, role in (("s1", "scheduler"), ("s2", "scheduler"), ("w1", "worker"),
                           ("w2", "worker"), ("w3", "worker")):
            c.start(name, role)
        first = c.wait_leader()
        path = str(c.records)
        jobs = [{"id": "a", "func": "jobs.examples:record_run", "every": "1s", "recover": True,
                 "kwargs": {"path": path, "sleep": 0.2}},
                {"id": "b", "func": "jobs.examples:record_run", "after": ["a"],
                 "recover": True, "kwargs": {"path": path, "sleep": 1.5}},
                {"id": "c", "func": "jobs.examples:record_run", "after": ["b:success"],
                 "recover": True, "kwargs": {"path": path, "sleep": 0.2}}]
        run_cli("jobs", "apply", str(write_job_file(tmp_path / "jobs.toml", jobs)),
                config=config)
        wait_for(lambda: [r for r in records_of(c) if r["job_id"] == "c"], timeout=30,
                 what="the first c")
        start = min(r.scheduled_at for r in c.runs() if r.job_id == "a")
        assert first.leader_id is not None
        c.nodes[first.leader_id].kill()
        c.wait_leader(other_than=first.leader_id, after_epoch=first.epoch)
        time.sleep(2)
        running = wait_for(lambda: [r.worker for r in c.runs()
                                    if r.job_id == "b" and r.status == "running"] or None,
                           timeout=20, what="a b running")
        assert isinstance(running, list)
        c.nodes[running[0]].kill()
        time.sleep(8)
        end = time.time() - 8  # every a up to here has had time to run its b and c
        rows = _wait_chains_settled(c, end)
    by_key = {(r.job_id, r.scheduled_at): r for r in rows}
    a_runs = [r for r in rows if r.job_id == "a" and start <= r.scheduled_at <= end]
    assert len(a_runs) >= int(end - start), "an a fire time has no run row"
    statuses: collections.Counter[str] = collections.Counter()
    for a in a_runs:
        b = by_key.get(("b", a.scheduled_at))
        assert b is not None, f"a@{a.scheduled_at} ({a.status}) has no b"
        statuses[f"a {a.status}, b {b.status}"] += 1
        if a.status != "succeeded":
            assert b.status == "skipped" and b.parent_run == a.id, (a.status, b.status)
            continue
        assert (b.status, b.parent_run) == ("succeeded", a.id), (b.status, b.error)
        cc = by_key.get(("c", a.scheduled_at))
        assert cc is not None and (cc.status, cc.parent_run) == ("succeeded", b.id), cc
    retried_b = [r for r in rows if r.job_id == "b" and r.attempt > 1]
    assert retried_b, f"no b was run again after its worker was killed: {statuses}"
    _check_each_attempt_ran_once(rows, records_of(c))


def _wait_chains_settled(c: Cluster, end: float) -> list[Any]:
    def settled() -> list[Any] | None:
        rows = c.runs()
        if any(r.scheduled_at <= end and r.status not in ENDED for r in rows):
            return None
        keys = {(r.job_id, r.scheduled_at) for r in rows}
        for r in rows:  # each ended a of the window has its b, each succeeded b its c
            if r.scheduled_at > end:
                continue
            child = {"a": "b", "b": "c"}.get(r.job_id)
            if child and (child, r.scheduled_at) not in keys and (
                    r.job_id == "a" or r.status == "succeeded"):
                return None
        return rows

    rows = wait_for(settled, timeout=60, what=f"the chains up to {end} to settle")
    assert isinstance(rows, list)
    return rows


def _check_each_attempt_ran_once(rows: list[Any], records: list[dict[str, Any]]) -> None:
    """No attempt of a run ran twice; a succeeded run's last attempt ran (once)."""
    ran = collections.Counter((r["job_id"], r["scheduled_at"], r["attempt"]) for r in records)
    twice = [k for k, n in ran.items() if n > 1]
    assert not twice, f"attempts that ran twice: {twice[:10]}"
    for row in rows:
        if row.status == "succeeded":
            assert ran[(row.job_id, row.scheduled_at, row.attempt)] == 1, row
