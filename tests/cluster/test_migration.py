"""Moving a running cluster between backends, with real processes (issue 5).

Every scenario keeps one-second jobs firing throughout and ends with the exactly-once
check: every (job, second) ran once or is a ``missed`` row, none ran twice.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.harness import (
    Cluster,
    check_exactly_once,
    cluster,
    records_of,
    upgrade_database,
)
from tests.helpers import run_cli, wait_for, write_config

pytestmark = pytest.mark.cluster


def _zk_section(zk: Any) -> dict[str, Any]:
    return {"hosts": list(zk.hosts), "chroot": zk.chroot, "session_timeout": 3.0}


def _configs(tmp_path: Path, url: str, zk: Any) -> tuple[Path, Path]:
    """(dblock named, ZooKeeper servers known; ZooKeeper named)."""
    old = write_config(tmp_path, url, coordination={
        "backend": "dblock", "zookeeper": _zk_section(zk)})
    new = write_config(tmp_path, url, name="zk.toml", coordination={
        "backend": "zookeeper", "zookeeper": _zk_section(zk)})
    return old, new


def _migrate(config: Path, to: str) -> dict[str, Any]:
    done = run_cli("backend", "migrate", "--to", to, "--timeout", "60", "--json",
                   config=config, timeout=90)
    result = json.loads(done.stdout)
    assert isinstance(result, dict)
    return result


def _longest_gap(records: list[dict[str, Any]], start: float, end: float) -> float:
    """The longest time between two starts of the same job, over fires in [start, end]."""
    by_job: dict[str, list[float]] = {}
    for r in records:
        if start <= r["scheduled_at"] <= end:
            by_job.setdefault(r["job_id"], []).append(r["started"])
    gaps = [b - a for starts in by_job.values()
            for a, b in zip(sorted(starts), sorted(starts)[1:], strict=False)]
    return max(gaps, default=0.0)


def _finish(c: Cluster, jobs: list[str], start: float) -> dict[str, int]:
    time.sleep(4)
    end = time.time() - 2
    rows = c.wait_settled(end)
    statuses = check_exactly_once(rows, records_of(c), jobs, start, end)
    assert statuses["succeeded"] > 0
    return dict(statuses)


def _three_and_two(c: Cluster, jobs: int) -> tuple[list[str], float]:
    for s in ("s1", "s2", "s3"):
        c.start(s, "scheduler")
    for w in ("w1", "w2"):
        c.start(w, "worker")
    c.wait_leader()
    ids = c.add_second_jobs(jobs)
    first = wait_for(lambda: min((r.scheduled_at for r in c.runs()), default=None),
                     timeout=30, what="the first fire")
    assert isinstance(first, float)
    time.sleep(3)
    return ids, first


def test_migrate_to_zookeeper_and_back_under_load(
    tmp_path: Path, pg_url: str, zk: Any
) -> None:
    config, _ = _configs(tmp_path, pg_url, zk)
    upgrade_database(config)
    with cluster(tmp_path, config, pg_url) as c:
        jobs, start = _three_and_two(c, 5)
        before = c.state()
        there = _migrate(config, "zookeeper")
        moved = c.state()
        assert (moved.backend, moved.phase, moved.target_backend) == ("zookeeper", "stable", None)
        assert moved.config_version == before.config_version + 2
        assert there["move"] == "started"
        wait_for(lambda: c.state().leader_backend == "zookeeper", timeout=10,
                 what="the leader to give its dblock lease back")
        time.sleep(4)
        back = _migrate(config, "dblock")
        final = c.state()
        assert (final.backend, final.phase) == ("dblock", "stable")
        assert final.config_version == before.config_version + 4
        assert final.epoch >= before.epoch  # epochs only grow, through every phase
        statuses = _finish(c, jobs, start)
        gap = _longest_gap(records_of(c), start, time.time() - 6)
        print(f"move to zookeeper {there['seconds']}s, back {back['seconds']}s, longest gap "
              f"between two starts of a 1 s job {gap:.2f}s, statuses {statuses}")


def test_leader_killed_during_the_joint_phase(tmp_path: Path, pg_url: str, zk: Any) -> None:
    config, _ = _configs(tmp_path, pg_url, zk)
    upgrade_database(config)
    with cluster(tmp_path, config, pg_url) as c:
        jobs, start = _three_and_two(c, 5)
        command = subprocess.Popen(
            [sys.executable, "-m", "qcluster", "backend", "migrate", "--to", "zookeeper",
             "--timeout", "60", "--config", str(config)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            joint = wait_for(lambda: ((s := c.state()).phase == "joint" and s) or None,
                             timeout=30, interval=0.02, what="the joint phase")
            leader = c.state()
            assert leader.leader_id is not None
            c.nodes[leader.leader_id].kill()
            new = c.wait_leader(other_than=leader.leader_id, after_epoch=leader.epoch)
            assert "+" in (new.leader_backend or "") or new.backend == "zookeeper", (
                f"a leader took over the joint phase on {new.leader_backend} alone")
            out, err = command.communicate(timeout=90)
        finally:
            if command.poll() is None:
                command.kill()
        assert command.returncode == 0, f"migrate failed: {out}\n{err}"
        assert "done: the cluster runs zookeeper" in out
        assert joint.config_version >= 2
        final = c.state()
        assert (final.backend, final.phase) == ("zookeeper", "stable")
        c.start(leader.leader_id, "scheduler")  # back as a follower, on ZooKeeper now
        statuses = _finish(c, jobs, start)
        print(f"statuses {statuses}")


def test_rolling_restart_with_edited_configs_then_a_stale_node(
    tmp_path: Path, pg_url: str, zk: Any
) -> None:
    config, edited = _configs(tmp_path, pg_url, zk)
    stale = write_config(tmp_path, pg_url, name="stale.toml")  # dblock only, no ZooKeeper
    upgrade_database(config)
    with cluster(tmp_path, config, pg_url) as c:
        for s in ("s1", "s2", "s3"):
            c.start(s, "scheduler")
        c.start("w1", "worker")
        c.wait_leader()
        jobs = c.add_second_jobs(4)
        start = wait_for(lambda: min((r.scheduled_at for r in c.runs()), default=None),
                         timeout=30, what="the first fire")
        assert isinstance(start, float)
        before = c.state()
        c.config = edited
        for s in ("s1", "s2", "s3"):
            time.sleep(2)
            assert c.state().backend == "dblock", "moved before every node was restarted"
            c.nodes[s].terminate()
            assert c.nodes[s].wait() == 0
            c.start(s, "scheduler")
        moved = wait_for(lambda: ((s := c.state()).backend == "zookeeper" and s) or None,
                         timeout=40, what="the cluster to move to ZooKeeper")
        assert moved.phase == "stable" and moved.config_version == before.config_version + 2
        assert any("every scheduler node's config names zookeeper" in n.log()
                   for n in c.nodes.values())

        # A node started with the old, dblock-only config does not lead, and says why.
        c.config = stale
        c.start("s4", "scheduler")
        wait_for(lambda: "[coordination.zookeeper]" in c.nodes["s4"].log(), timeout=20,
                 what="s4 to say why it does not campaign")

        def s4_member() -> dict[str, Any] | None:  # its status, from its next heartbeat
            status = json.loads(run_cli("cluster", "status", "--json", config=edited).stdout)
            s4 = next(m for m in status["members"] if m["node_id"] == "s4")
            return s4 if "runs the zookeeper backend" in s4["status"] else None

        s4 = wait_for(s4_member, timeout=20, what="s4's status to say why")
        assert s4["config_version"] == 0
        leader = c.state()
        assert leader.leader_id is not None
        for s in ("s1", "s2", "s3"):  # every node that could lead goes away
            c.nodes[s].kill()
        time.sleep(8)  # ZooKeeper sessions (3 s) and dblock leases (2 s) run out twice
        after = c.state()
        assert after.leader_id != "s4" and after.epoch == leader.epoch, (
            "the stale node took an epoch")
        assert c.nodes["s4"].running()
        c.config = edited
        for s in ("s1", "s2"):
            c.start(s, "scheduler")
        c.wait_leader(after_epoch=leader.epoch, timeout=40)
        statuses = _finish(c, jobs, start)
        print(f"statuses {statuses}")


def test_migrate_dblock_to_redis_and_back_with_the_command_killed(
    tmp_path: Path, pg_url: str, redis_urls: list[str], redis_prefix: str
) -> None:
    """dblock -> redis with the migrate command killed (SIGKILL) during the joint phase:
    the leader finishes the move on its own, and running the command again finds it
    done. Then back to dblock."""
    redis = {"urls": redis_urls, "lease_seconds": 2, "key_prefix": redis_prefix}
    config = write_config(tmp_path, pg_url, coordination={"backend": "dblock", "redis": redis})
    upgrade_database(config)
    with cluster(tmp_path, config, pg_url) as c:
        _, jobs, start = c.start_small(3)
        command = subprocess.Popen(
            [sys.executable, "-m", "qcluster", "backend", "migrate", "--to", "redis",
             "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(lambda: c.state().phase == "joint", timeout=30, interval=0.02,
                     what="the joint phase")
        finally:
            command.kill()
            command.wait()
        moved = wait_for(lambda: ((s := c.state()).backend == "redis" and s) or None,
                         timeout=30, what="the leader to finish the move on its own")
        assert moved.phase == "stable"
        again = _migrate(config, "redis")
        assert again["move"] == "nothing to do" and again["backend"] == "redis"
        wait_for(lambda: c.state().leader_backend == "redis", timeout=10,
                 what="the leader to give its dblock lease back")
        time.sleep(3)
        back = _migrate(config, "dblock")
        assert (c.state().backend, c.state().phase) == ("dblock", "stable")
        statuses = _finish(c, jobs, start)
        print(f"back to dblock {back['seconds']}s, statuses {statuses}")


def _status_leader(config: Path) -> dict[str, Any] | None:
    status = json.loads(run_cli("cluster", "status", "--json", config=config).stdout)
    leader = status["leader"]
    assert leader is None or isinstance(leader, dict)
    return leader


def test_the_leader_stays_visible_after_a_move_whatever_the_clis_config_names(
    tmp_path: Path, pg_url: str, zk: Any
) -> None:
    """Issue 14, point 1: a node reshaped in place onto ZooKeeper publishes itself there,
    and `cluster status` finds it with a config that names dblock, one that names
    ZooKeeper, and one that has no ZooKeeper servers at all; and again after the move
    back."""
    config, zk_config = _configs(tmp_path, pg_url, zk)
    plain = write_config(tmp_path, pg_url, name="plain.toml")  # dblock, no ZooKeeper
    upgrade_database(config)
    with cluster(tmp_path, config, pg_url) as c:
        leader, jobs, start = c.start_small(2)
        _migrate(config, "zookeeper")
        wait_for(lambda: c.state().leader_backend == "zookeeper", timeout=10,
                 what="the leader to give its dblock lease back")
        moved = c.state()
        assert moved.leader_id == leader.leader_id and moved.epoch == leader.epoch  # reshaped
        for cfg in (config, zk_config, plain):
            seen = wait_for(lambda cfg=cfg: _status_leader(cfg), timeout=10,
                            what=f"a leader in `cluster status` with {cfg.name}")
            assert seen["node_id"] == moved.leader_id and seen["epoch"] == moved.epoch
            assert seen["uri"] == moved.leader_uri
        _migrate(config, "dblock")
        back = c.state()
        for cfg in (config, zk_config, plain):
            seen = wait_for(lambda cfg=cfg: _status_leader(cfg), timeout=10,
                            what=f"a leader in `cluster status` with {cfg.name} (back)")
            assert seen["node_id"] == back.leader_id and seen["epoch"] == back.epoch
        _finish(c, jobs, start)
