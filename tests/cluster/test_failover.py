"""Cluster correctness with real processes: every fire runs exactly once or is recorded as
missed, across leader crashes (SIGKILL), pauses (SIGSTOP), worker deaths, a database
outage and a graceful hand-over (SIGTERM), on every backend."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.harness import (
    Cluster,
    check_exactly_once,
    cluster,
    records_of,
    run_outage,
    upgrade_database,
)
from tests.helpers import TEST_SETTINGS, run_cli, wait_for, write_config

pytestmark = pytest.mark.cluster

BACKENDS = ["dblock-sqlite", "dblock-postgresql", "zookeeper", "redis"]


def make_config(request: pytest.FixtureRequest, kind: str, tmp_path: Path) -> tuple[Path, str]:
    if kind == "dblock-sqlite":
        url = request.getfixturevalue("sqlite_url")
        return write_config(tmp_path, url), url
    url = request.getfixturevalue("pg_url")
    if kind == "dblock-postgresql":
        return write_config(tmp_path, url), url
    if kind == "zookeeper":
        zk = request.getfixturevalue("zk")
        coordination = {"backend": "zookeeper", "zookeeper": {
            "hosts": list(zk.hosts), "chroot": zk.chroot, "session_timeout": 3.0}}
        return write_config(tmp_path, url, coordination=coordination), url
    coordination = {"backend": "redis", "redis": {
        "urls": request.getfixturevalue("redis_urls"), "lease_seconds": 2,
        "key_prefix": request.getfixturevalue("redis_prefix")}}
    return write_config(tmp_path, url, coordination=coordination), url


@pytest.fixture(params=BACKENDS)
def any_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    config, url = make_config(request, request.param, tmp_path)
    upgrade_database(config)
    with cluster(tmp_path, config, url) as c:
        yield c


def _finish(c: Cluster, job_ids: list[str], start: float, end: float) -> dict[str, int]:
    rows = c.wait_settled(end)
    statuses = check_exactly_once(rows, records_of(c), job_ids, start, end)
    assert statuses["succeeded"] > 0
    return dict(statuses)


def _first_fire(c: Cluster) -> float:
    found = wait_for(lambda: min((r.scheduled_at for r in c.runs()), default=None),
                     timeout=30, what="the first fire")
    assert isinstance(found, float)
    return found


def test_leader_killed_twice_every_fire_runs_exactly_once(any_cluster: Cluster) -> None:
    c = any_cluster
    for s in ("s1", "s2", "s3"):
        c.start(s, "scheduler")
    for w in ("w1", "w2"):
        c.start(w, "worker")
    first = c.wait_leader()
    jobs = c.add_second_jobs(5)
    start = _first_fire(c)
    leader = first
    for _ in range(2):
        time.sleep(6)  # a few seconds of fires, with the killed node back as a follower
        killed = leader.leader_id
        assert killed is not None
        c.nodes[killed].kill()
        leader = c.wait_leader(other_than=killed, after_epoch=leader.epoch)
        c.start(killed, "scheduler")  # the node comes back as a follower
    time.sleep(8)
    end = time.time() - 3
    statuses = _finish(c, jobs, start, end)
    assert end - start >= 20
    assert leader.epoch >= first.epoch + 2
    print(f"statuses over {end - start:.0f}s: {statuses}")


def test_paused_leader_commits_nothing_after_takeover(any_cluster: Cluster) -> None:
    c = any_cluster
    old, jobs, start = c.start_small(3)
    assert old.leader_id is not None
    c.nodes[old.leader_id].pause()
    new = c.wait_leader(other_than=old.leader_id, after_epoch=old.epoch)
    time.sleep(2)
    c.nodes[old.leader_id].resume()
    time.sleep(6)
    end = time.time() - 3
    _finish(c, jobs, start, end)
    took_over = new.leader_since
    assert took_over is not None
    late = [r for r in c.runs() if r.epoch == old.epoch and r.created_at > took_over]
    assert late == [], "the paused ex-leader committed runs after the takeover"
    assert c.nodes[old.leader_id].running()
    assert "stepping down" in c.nodes[old.leader_id].log()
    assert c.state().epoch == new.epoch, "the woken ex-leader took the cluster back"


@pytest.mark.parametrize(("any_cluster", "recover"), [
    *[pytest.param(kind, True, id=f"{kind}-recover") for kind in BACKENDS],
    # without --recover the run is only recorded lost: the backend matters less (suite time)
    *[pytest.param(kind, False, id=f"{kind}-no-recover") for kind in ("dblock-postgresql",
                                                                     "zookeeper")],
], indirect=["any_cluster"])
def test_worker_killed_mid_run(any_cluster: Cluster, recover: bool) -> None:
    c = any_cluster
    c.start("s1", "scheduler")
    c.start("w1", "worker")
    c.start("w2", "worker")
    c.wait_leader()
    flags = ["--recover"] if recover else []
    run_cli("jobs", "add", "long", "--func", "jobs.examples:record_run", "--every", "1h",
            "--kwarg", f"path={c.records}", "--kwarg", "sleep=5", *flags, config=c.config)
    run_cli("jobs", "run", "long", config=c.config)
    first = wait_for(lambda: records_of(c) or None, timeout=30, what="the long run to start")
    victim = first[0]["worker"]
    c.nodes[victim].kill()
    survivor = "w2" if victim == "w1" else "w1"

    def final() -> Any:
        rows = [r for r in c.runs() if r.job_id == "long"]
        return rows[0] if rows and rows[0].status in ("succeeded", "lost") else None

    row = wait_for(final, timeout=40, what="the killed run to end")
    if recover:
        assert row.status == "succeeded" and row.attempt == 2 and row.worker == survivor
        attempts = [(r["attempt"], r["worker"]) for r in records_of(c)]
        assert attempts == [(1, victim), (2, survivor)]
    else:
        assert row.status == "lost" and row.attempt == 1 and victim in row.error
        assert len(records_of(c)) == 1


def test_sigterm_hands_leadership_over(any_cluster: Cluster) -> None:
    c = any_cluster
    old, jobs, start = c.start_small(2)
    assert old.leader_id is not None
    c.nodes[old.leader_id].terminate()
    assert c.nodes[old.leader_id].wait() == 0
    c.wait_leader(other_than=old.leader_id, after_epoch=old.epoch, timeout=10)
    time.sleep(4)
    end = time.time() - 2
    _finish(c, jobs, start, end)


@pytest.mark.parametrize("kind", ["dblock-postgresql", "zookeeper"])
def test_leader_steps_down_when_the_database_stops(request: pytest.FixtureRequest,
                                                   tmp_path: Path, kind: str) -> None:
    pg = request.getfixturevalue("private_pg")
    url = pg.create_database("qcluster")
    overrides: dict[str, Any] = {}
    if kind == "zookeeper":
        zk = request.getfixturevalue("zk")
        overrides["coordination"] = {"backend": "zookeeper", "zookeeper": {
            "hosts": list(zk.hosts), "chroot": zk.chroot, "session_timeout": 3.0}}
    # longer than the lease and the database health timeout
    statuses = run_outage(tmp_path, url, overrides, pg.stop, pg.start, outage=8)
    assert statuses.get("missed", 0) > 0, "fires during the outage must be recorded"


def test_fire_ahead_leader_killed_every_fire_runs_once_and_never_early(
    tmp_path: Path, pg_url: str
) -> None:
    """With a fire-ahead window, runs are recorded and sent before their time: a leader
    killed with runs already sent ahead loses none and doubles none, and no job starts
    before its scheduled time."""
    config = write_config(tmp_path, pg_url, scheduler={
        **TEST_SETTINGS["scheduler"], "fire_ahead_seconds": 0.8})
    upgrade_database(config)
    with cluster(tmp_path, config, pg_url) as c:
        old, jobs, start = c.start_small(4)
        assert old.leader_id is not None
        c.nodes[old.leader_id].kill()
        c.wait_leader(other_than=old.leader_id, after_epoch=old.epoch)
        time.sleep(5)
        end = time.time() - 3
        _finish(c, jobs, start, end)
        early = [r for r in records_of(c) if r["started"] < r["scheduled_at"] - 0.005]
        assert early == [], f"runs started before their time: {early[:3]}"
        ahead = [r for r in c.runs() if r.created_at < r.scheduled_at]
        assert ahead, "no run was recorded ahead of its time: fire-ahead is not in effect"
