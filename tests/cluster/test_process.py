"""A real cluster: ``qcluster start`` processes driven through the CLI.

One scheduler node (s1) and one SEPARATE worker node (w1) run as two processes on one
database, SQLite and then PostgreSQL. They start once per database, for the whole module
(a node pair takes seconds to start on a loaded machine), and the tests below run on them
in the order written; the last one stops them. Each test uses its own job.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import unavailable
from tests.helpers import (
    NodeProcess,
    parse_time,
    read_records,
    run_cli,
    run_json,
    runs_json,
    start_node,
    wait_for,
    write_config,
)
from tests.servers import create_database, drop_database

pytestmark = pytest.mark.cluster

RECORD = "jobs.examples:record_run"
WAIT = 60.0  # generous: the machine is shared and small; nothing here measures speed


@dataclass
class Cluster:
    """The two nodes of one database, and where their files go."""

    config: Path
    dir: Path
    scheduler: NodeProcess
    worker: NodeProcess

    def logs(self) -> str:
        return f"{self.scheduler.log_tail()}\n{self.worker.log_tail()}"

    def assert_running(self) -> None:
        for node in (self.scheduler, self.worker):
            assert node.running(), f"node exited with {node.returncode}\n{node.log_tail()}"

    def add_every_second(self, job_id: str) -> tuple[str, Path]:
        """Add ``job_id``: record_run into <dir>/<job_id>.jsonl every second. Returns the
        CLI's output and the record file."""
        path = self.dir / f"{job_id}.jsonl"
        result = run_cli("jobs", "add", job_id, "--func", RECORD, "--every", "1s",
                         "--kwarg", f"path={path}", config=self.config)
        return result.stdout.strip(), path

    def wait_runs(self, job_id: str, what: str, ok: Callable[[list[dict[str, Any]]], bool],
                  timeout: float = WAIT) -> list[dict[str, Any]]:
        """Poll ``runs list --job`` until ``ok(runs)``; return the runs (newest first)."""

        def check() -> list[dict[str, Any]] | None:
            runs = runs_json(self.config, job=job_id)
            return runs if ok(runs) else None

        runs = wait_for(check, timeout, interval=0.5, what=what, details=self.logs)
        assert runs is not None
        return runs


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def cluster_db_url(request: pytest.FixtureRequest,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh database for the module's cluster: the same two kinds as ``db_url``, but
    one database for all the tests of a kind, so its nodes start once."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('cluster-db') / 'qcluster.db'}"
        return
    admin_url: str = request.getfixturevalue("pg_admin_url")
    name = f"qct_{uuid.uuid4().hex[:12]}"
    try:
        url = create_database(admin_url, name)
    except Exception as e:
        unavailable(f"cannot create a PostgreSQL database: {e}")
    yield url
    drop_database(admin_url, name)


@pytest.fixture(scope="module")
def cluster(cluster_db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """s1 (``--role scheduler``) leading and w1 (``--role worker``) a live member."""
    work = tmp_path_factory.mktemp("cluster")
    config = write_config(work, cluster_db_url)
    # Create the schema first: nodes that start together on an empty database race to
    # create it (reported as a product bug), and this is the documented path anyway.
    run_cli("db", "upgrade", config=config)
    with (start_node(config, node_id="s1", role="scheduler", log_path=work / "s1.log") as s1,
          start_node(config, node_id="w1", role="worker", log_path=work / "w1.log") as w1):
        c = Cluster(config, work, s1, w1)

        def ready() -> bool:
            c.assert_running()
            status = run_json("cluster", "status", "--json", config=config)
            leader = (status["leader"] or {}).get("node_id")
            return leader == "s1" and {m["node_id"] for m in status["members"]} == {"s1", "w1"}

        wait_for(ready, WAIT, interval=0.5, what="s1 to lead with w1 a live member",
                 details=c.logs)
        yield c


def whole_second(at: datetime) -> bool:
    return at.microsecond == 0


# -- the tests, in the order they run on one cluster ---------------------------------------


def test_cluster_status_shows_the_leader_and_both_members(cluster: Cluster) -> None:
    cluster.assert_running()
    status = run_json("cluster", "status", "--json", config=cluster.config)
    assert (status["cluster"], status["backend"]) == ("qcluster", "dblock")
    assert status["epoch"] >= 1
    leader = status["leader"]
    assert leader["node_id"] == "s1" and leader["uri"].startswith("PYRO:")
    assert parse_time(leader["since"]) <= datetime.now(UTC)
    members = {m["node_id"]: m for m in status["members"]}
    assert members["s1"]["roles"] == ["scheduler"]
    assert members["w1"]["roles"] == ["worker"] and members["w1"]["uri"].startswith("PYRO:")
    for member in members.values():
        assert parse_time(member["last_seen"]) <= datetime.now(UTC) + timedelta(seconds=5)


def test_job_added_while_a_leader_runs_goes_through_the_leader(cluster: Cluster) -> None:
    cluster.assert_running()
    text, _ = cluster.add_every_second("via-leader")
    assert text == "added job via-leader (via leader s1)"
    run_cli("jobs", "remove", "via-leader", config=cluster.config)


def test_every_second_job_runs_once_per_fire_time_on_the_worker(cluster: Cluster) -> None:
    cluster.assert_running()
    _, records_path = cluster.add_every_second("tick")
    runs = cluster.wait_runs(
        "tick", "at least 5 runs of tick, all succeeded",
        lambda rs: len(rs) >= 5 and all(r["status"] == "succeeded" for r in rs))
    records = read_records(records_path)

    times = [parse_time(r["scheduled_at"]) for r in runs]
    assert len(set(times)) == len(times), "a (job, scheduled_at) pair has two runs"
    oldest, newest = min(times), max(times)
    expected = [oldest + timedelta(seconds=n) for n in range(len(times))]
    assert sorted(times) == expected, "fire times are not every whole second without a gap"
    for run in runs:
        at = parse_time(run["scheduled_at"])
        assert whole_second(at), run
        assert (run["worker"], run["leader"], run["attempt"]) == ("w1", "s1", 1), run
        assert run["epoch"] >= 1, run
        assert run["error"] is None, run
        started, finished = parse_time(run["started_at"]), parse_time(run["finished_at"])
        assert at <= parse_time(run["dispatched_at"]) <= started <= finished, run

    # What the job itself saw agrees with the runs table (runs after our query may have
    # been recorded since; they are newer than every run we hold).
    seen = {r["run_id"]: r for r in records if r["scheduled_at"] <= newest.timestamp()}
    assert sorted(seen) == sorted(r["run_id"] for r in runs)
    for run in runs:
        record = seen[run["run_id"]]
        assert record["job_id"] == "tick"
        assert record["scheduled_at"] == parse_time(run["scheduled_at"]).timestamp()
        assert (record["worker"], record["epoch"], record["attempt"]) == (
            "w1", run["epoch"], 1)


def test_jobs_run_fires_the_job_at_once(cluster: Cluster) -> None:
    cluster.assert_running()
    run_cli("jobs", "add", "manual", "--func", RECORD, "--cron", "0 0 1 1 *",
            "--kwarg", f"path={cluster.dir / 'manual.jsonl'}", config=cluster.config)
    before = datetime.now(UTC)
    reply = run_json("jobs", "run", "manual", "--json", config=cluster.config)
    assert reply["via"] == "leader s1"
    runs = cluster.wait_runs("manual", "the fired run of manual to succeed",
                             lambda rs: any(r["status"] == "succeeded" for r in rs))
    assert len(runs) == 1
    (run,) = runs
    assert before <= parse_time(run["scheduled_at"]) <= datetime.now(UTC)
    assert (run["worker"], run["leader"]) == ("w1", "s1")
    assert [r["run_id"] for r in read_records(cluster.dir / "manual.jsonl")] == [run["run_id"]]
    assert reply["run_id"] == run["run_id"]


def test_runs_show_prints_what_a_run_returned_and_wrote(cluster: Cluster) -> None:
    """Issue 17 item 1, on real nodes: the run's return value and its log record, kept
    by the worker and read back by the CLI."""
    cluster.assert_running()
    run_cli("jobs", "add", "greeter", "--func", "jobs.examples:hello", "--cron", "0 0 1 1 *",
            "--kwarg", "name=ops", config=cluster.config)
    run_id = run_json("jobs", "run", "greeter", "--json", config=cluster.config)["run_id"]
    (run,) = cluster.wait_runs("greeter", "greeter's run to succeed with its output",
                               lambda rs: rs[0]["status"] == "succeeded" and rs[0]["has_output"])
    assert run["run_id"] == run_id
    shown = run_json("runs", "show", str(run_id), "--json", config=cluster.config)
    text = f"hello ops from w1 (run {run_id}, attempt 1)"
    (attempt,) = shown["attempts"]
    assert (attempt["attempt"], attempt["result"]) == (1, repr(text))
    assert f"INFO jobs.examples: {text}" in attempt["output"]
    printed = run_cli("runs", "show", str(run_id), config=cluster.config).stdout
    assert f"returned: {text!r}" in printed and f"jobs.examples: {text}" in printed


def test_pause_stops_the_runs_and_resume_starts_them_again(cluster: Cluster) -> None:
    cluster.assert_running()
    cluster.add_every_second("pausable")
    cluster.wait_runs("pausable", "2 runs of pausable", lambda rs: len(rs) >= 2)

    paused = run_cli("jobs", "pause", "pausable", config=cluster.config)
    paused_at = datetime.now(UTC)
    assert paused.stdout.strip() == "paused job pausable (via leader s1)"
    time.sleep(3)  # three fire times pass
    during = runs_json(cluster.config, job="pausable")
    late = [r for r in during if parse_time(r["scheduled_at"]) > paused_at]
    assert late == [], f"runs fired after the pause took effect at {paused_at}"
    job = run_json("jobs", "show", "pausable", "--json", config=cluster.config)
    assert (job["paused"], job["next_run_time"]) == (True, None), job

    resume_from = datetime.now(UTC)
    resumed = run_cli("jobs", "resume", "pausable", config=cluster.config)
    assert resumed.stdout.strip() == "resumed job pausable (via leader s1)"
    after = cluster.wait_runs(
        "pausable", "2 succeeded runs of pausable after the resume",
        lambda rs: sum(parse_time(r["scheduled_at"]) > resume_from
                       and r["status"] == "succeeded" for r in rs) >= 2)
    skipped = [r for r in after if paused_at < parse_time(r["scheduled_at"]) < resume_from]
    assert skipped == [], "fire times inside the pause were made up after the resume"
    assert len(after) > len(during)


def test_sigterm_stops_both_nodes_with_exit_status_0(cluster: Cluster) -> None:
    cluster.assert_running()
    cluster.scheduler.terminate()
    cluster.worker.terminate()
    assert cluster.scheduler.wait(10) == 0, cluster.scheduler.log_tail()
    assert cluster.worker.wait(10) == 0, cluster.worker.log_tail()
    for node in (cluster.scheduler, cluster.worker):
        assert "Traceback" not in node.log(), node.log_tail()
    # A stopping node hands over at once: no leader and no member is left behind.
    status = run_json("cluster", "status", "--json", config=cluster.config)
    assert status["leader"] is None and status["members"] == [], status


# -- the demo -------------------------------------------------------------------------------

FINISHED_RUN = re.compile(r"^\S+Z\s+demo-\S+\s+(succeeded|failed)\s+on\s", re.MULTILINE)


def test_demo_in_an_empty_directory_prints_a_finished_run_and_stops_on_sigint(
    tmp_path: Path,
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with start_node(None, node_id=None, demo=True, cwd=empty,
                    log_path=tmp_path / "demo.log") as demo:
        # The demo's own promise is a run within 15 s of starting; this waits for it.
        wait_for(lambda: FINISHED_RUN.search(demo.log()) or not demo.running(), 15,
                 interval=0.2, what="the demo to print a finished run", details=demo.log_tail)
        assert demo.running(), demo.log_tail()
        demo.interrupt()
        assert demo.wait(10) == 0, demo.log_tail()
    assert "Traceback" not in demo.log() and "error:" not in demo.log(), demo.log_tail()
    assert (empty / "qcluster.db").exists(), "the demo's database is not in its directory"
