"""Routing with real processes (issue 16, items 2 and 3), on PostgreSQL.

Tags: three workers, two with ``gpu``; a job that asks for ``gpu`` runs only on those, one
that asks for ``gpu`` and ``eu`` only on the one with both, and one that asks for a tag no
worker has is recorded ``missed`` past its grace, saying so; when a worker with that tag
joins, the job runs there.

Affinity groups: three jobs of one group, on two schedulers and three workers, all run on
one worker; when it is killed (SIGKILL) they move together to one other worker (the third
never runs one), recorded in ``qc_groups``; the leader is killed too, and the new one keeps
the group where it is. Every attempt ran once.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.cluster.harness import SETTLED, Cluster, cluster, records_of, upgrade_database
from tests.helpers import run_cli, run_json, wait_for, write_config, write_job_file

pytestmark = pytest.mark.cluster


def _worker_config(tmp_path: Path, pg_url: str, name: str, *tags: str) -> Path:
    return write_config(tmp_path, pg_url, name=f"{name}.toml", worker={"tags": list(tags)})


def _by_job(c: Cluster) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for r in c.runs():
        out.setdefault(r.job_id, []).append(r)
    return out


def test_tags_route_runs_and_a_missing_tag_is_missed_then_runs_when_a_worker_has_it(
        pg_url: str, tmp_path: Path) -> None:
    config = write_config(tmp_path, pg_url)
    upgrade_database(config)
    with cluster(tmp_path, config, pg_url) as c:
        c.start("s1", "scheduler")
        c.start_with("gpu", "worker", _worker_config(tmp_path, pg_url, "gpu", "gpu"))
        c.start_with("plain", "worker", _worker_config(tmp_path, pg_url, "plain"))
        c.start_with("both", "worker", _worker_config(tmp_path, pg_url, "both", "gpu", "eu"))
        c.wait_leader()
        path = str(c.records)
        jobs = [{"id": "g", "func": "jobs.examples:record_run", "every": "1s",
                 "tags": ["gpu"], "kwargs": {"path": path}},
                {"id": "ge", "func": "jobs.examples:record_run", "every": "1s",
                 "tags": ["gpu", "eu"], "kwargs": {"path": path}},
                {"id": "t", "func": "jobs.examples:record_run", "every": "1s",
                 "tags": ["tpu"], "misfire_grace_seconds": 2, "kwargs": {"path": path}}]
        run_cli("jobs", "apply", str(write_job_file(tmp_path / "jobs.toml", jobs)),
                config=config)
        wait_for(lambda: len([r for r in c.runs() if r.job_id == "t"
                              and r.status == "missed"]) >= 3, timeout=40,
                 what="three runs of t missed")
        status = run_json("cluster", "status", "--json", config=config)
        assert {m["node_id"]: sorted(m["tags"]) for m in status["members"]
                if "worker" in m["roles"]} == {"gpu": ["gpu"], "plain": [], "both": ["eu", "gpu"]}
        joined = time.time()
        c.start_with("tpu", "worker", _worker_config(tmp_path, pg_url, "tpu", "tpu"))
        wait_for(lambda: [r for r in c.runs() if r.job_id == "t" and r.status == "succeeded"],
                 timeout=30, what="a run of t, on the worker with tpu")
        time.sleep(2)
        rows = c.wait_settled(time.time() - 3)
        records = records_of(c)
    ran = {(r["job_id"], r["worker"]) for r in records}
    assert {w for j, w in ran if j == "g"} <= {"gpu", "both"} and ("g", "gpu") in ran
    assert {w for j, w in ran if j == "ge"} == {"both"}
    assert {w for j, w in ran if j == "t"} == {"tpu"}
    # (Missed once the worker had joined, a run says only that it was not sent in time.)
    missed = [r for r in rows if r.job_id == "t" and r.status == "missed"
              and r.finished_at < joined]
    assert len(missed) >= 3
    assert all("no live worker has the tags tpu" in (r.error or "") for r in missed), \
        {r.error for r in missed}
    assert not [r for r in rows if r.job_id in ("g", "ge") and r.status not in SETTLED
                and r.scheduled_at < time.time() - 5]
    assert len({(r["run_id"], r["attempt"]) for r in records}) == len(records)


def test_a_group_shares_one_worker_and_moves_together_when_it_is_killed(
        pg_url: str, tmp_path: Path) -> None:
    config = write_config(tmp_path, pg_url)
    upgrade_database(config)
    with cluster(tmp_path, config, pg_url) as c:
        for name, role in (("s1", "scheduler"), ("s2", "scheduler"), ("w1", "worker"),
                           ("w2", "worker"), ("w3", "worker")):
            c.start(name, role)
        first = c.wait_leader()
        path = str(c.records)
        jobs = [{"id": f"g{i}", "func": "jobs.examples:record_run", "every": "1s",
                 "group": "etl", "recover": True, "kwargs": {"path": path, "sleep": 0.3}}
                for i in (1, 2, 3)]
        run_cli("jobs", "apply", str(write_job_file(tmp_path / "jobs.toml", jobs)),
                config=config)
        wait_for(lambda: len([r for r in c.runs() if r.status == "succeeded"]) >= 9,
                 timeout=30, what="nine runs of the group")
        home = _placed(c)
        assert home is not None
        shown = run_json("jobs", "show", "g2", "--json", config=config)
        assert (shown["group"], shown["group_worker"]) == ("etl", home)
        killed_at = time.time()
        c.nodes[home].kill()
        wait_for(lambda: _placed(c) not in (None, home), timeout=30, what="the group to move")
        new_home = _placed(c)
        assert new_home is not None
        time.sleep(3)
        assert first.leader_id is not None
        c.nodes[first.leader_id].kill()  # the new leader reads where the group sits
        c.wait_leader(other_than=first.leader_id, after_epoch=first.epoch)
        time.sleep(6)
        c.wait_settled(time.time() - 4)
        status = run_json("cluster", "status", "--json", config=config)
        records = records_of(c)
        rows = c.runs()  # read after the records: every run a record names has its row
    third = ({"w1", "w2", "w3"} - {home, new_home}).pop()
    ran_on = {(r["job_id"], r["worker"]) for r in records}
    assert not [j for j, w in ran_on if w == third], "a run of the group left its worker"
    after = [r for r in records if r["scheduled_at"] > killed_at + 8]
    assert after and {r["worker"] for r in after} == {new_home}
    assert {r["job_id"] for r in after} == {"g1", "g2", "g3"}  # moved together
    assert [(g["name"], g["worker"], g["moves"]) for g in status["groups"]] == [
        ("etl", new_home, 1)]
    assert len({(r["run_id"], r["attempt"]) for r in records}) == len(records)
    attempts = {r.id: r.attempt for r in rows}  # a recovered run is at a later attempt
    assert all(r["attempt"] <= attempts[r["run_id"]] for r in records)


def _placed(c: Cluster) -> str | None:
    with c.db.read() as conn:
        return conn.execute(sa.text("SELECT worker FROM qc_groups WHERE name = 'etl'")
                            ).scalar_one_or_none()


def test_broadcast_runs_on_every_live_worker_and_one_that_joins_gets_the_next_fire(
        pg_url: str, tmp_path: Path) -> None:
    config = write_config(tmp_path, pg_url)
    upgrade_database(config)
    with cluster(tmp_path, config, pg_url) as c:
        for name, role in (("s1", "scheduler"), ("w1", "worker"), ("w2", "worker")):
            c.start(name, role)
        c.wait_leader()
        path = str(c.records)
        run_cli("jobs", "add", "sweep", "--func", "jobs.examples:record_run", "--every", "1s",
                "--broadcast", "--kwarg", f"path={path}", config=config)
        wait_for(lambda: len(records_of(c)) >= 6, timeout=30, what="broadcast runs")
        joined = time.time()
        c.start("w3", "worker")
        wait_for(lambda: [r for r in records_of(c) if r["worker"] == "w3"], timeout=30,
                 what="a run on the worker that joined")
        time.sleep(3)
        c.wait_settled(time.time() - 3)
        records = records_of(c)
        rows = c.runs()
    by_time: dict[float, list[str]] = {}
    for r in records:
        by_time.setdefault(r["scheduled_at"], []).append(r["worker"])
    assert all(len(ws) == len(set(ws)) for ws in by_time.values()), "a worker ran one twice"
    before = [sorted(ws) for t, ws in by_time.items() if t < joined - 1]
    assert before and all(ws == ["w1", "w2"] for ws in before), before
    last = max(by_time)
    assert sorted(by_time[last]) == ["w1", "w2", "w3"], by_time[last]
    assert {r.slot for r in rows} <= {"@w1", "@w2", "@w3"}
    keys = [(r.scheduled_at, r.slot) for r in rows]
    assert len(keys) == len(set(keys))
    assert len({(r["run_id"], r["attempt"]) for r in records}) == len(records)


def test_a_sharded_parent_runs_every_shard_and_its_child_once_per_fire(
        pg_url: str, tmp_path: Path) -> None:
    config = write_config(tmp_path, pg_url)
    upgrade_database(config)
    with cluster(tmp_path, config, pg_url) as c:
        for name, role in (("s1", "scheduler"), ("w1", "worker"), ("w2", "worker"),
                           ("w3", "worker")):
            c.start(name, role)
        c.wait_leader()
        path = str(c.records)
        jobs = [{"id": "idx", "func": "jobs.examples:record_run", "every": "2s", "shards": 4,
                 "kwargs": {"path": path, "sleep": 0.3}},
                {"id": "report", "func": "jobs.examples:record_run", "after": ["idx"],
                 "kwargs": {"path": path}}]
        run_cli("jobs", "apply", str(write_job_file(tmp_path / "jobs.toml", jobs)),
                config=config)
        wait_for(lambda: len([r for r in records_of(c) if r["job_id"] == "report"]) >= 4,
                 timeout=40, what="four reports")
        time.sleep(1)
        c.wait_settled(time.time() - 3)
        records = records_of(c)
        rows = c.runs()
    shards: dict[float, list[tuple[int, int]]] = {}
    for r in records:
        if r["job_id"] == "idx":
            shards.setdefault(r["scheduled_at"], []).append((r["shard"], r["shards"]))
    reports = collections.Counter(r["scheduled_at"] for r in records if r["job_id"] == "report")
    assert reports and all(n == 1 for n in reports.values()), reports
    for at in reports:  # each report came after all four shards of its fire time
        assert sorted(shards[at]) == [(i, 4) for i in range(4)], (at, shards.get(at))
        ends = [r.finished_at for r in rows if r.job_id == "idx" and r.scheduled_at == at]
        (child,) = [r for r in rows if r.job_id == "report" and r.scheduled_at == at]
        assert child.started_at >= max(ends)
    assert len({w for r in records if r["job_id"] == "idx" for w in [r["worker"]]}) > 1
