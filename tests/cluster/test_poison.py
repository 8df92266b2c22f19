"""Runs that fight the cluster, with real ``qcluster start`` processes (issue 14, points
2-4): a poison run that kills its worker is quarantined after two deaths and the
cluster keeps firing; SIGTERM stops a node whose job never ends within its grace and
records the run ``interrupted``; a run that no worker slot takes within its grace is
recorded ``missed``; ``runs cancel`` stops a running run, and it and ``jobs remove``
stop any further attempt."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.harness import Cluster, cluster, records_of, upgrade_database
from tests.helpers import (
    TEST_ALLOW,
    TEST_SETTINGS,
    assert_cli_error,
    run_cli,
    run_cli_many,
    run_json,
    start_node,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.cluster

#: Jobs that misbehave, in a package of the test's own ([jobs] paths).
POISON_JOBS = '''
import os
import signal
import time

from jobs.examples import record_run


def kill_worker(path):
    """Record the attempt, then SIGKILL the worker process, the parent of the slot process
    the job runs in. (A job that kills its own process, a segfault or os._exit, costs
    only its slot now: tests/worker/test_slots.py.)"""
    record_run(path)
    os.kill(os.getppid(), signal.SIGKILL)


def forever(path):
    """Record the attempt, then never return."""
    record_run(path)
    while True:
        time.sleep(0.1)


def forever_in_executor(path):
    """Record the attempt, then wait forever on threads of its own ThreadPoolExecutor,
    whose threads Python's exit joins (issue 14 attack: "STILL ALIVE after 46 s")."""
    from concurrent.futures import ThreadPoolExecutor

    record_run(path)
    with ThreadPoolExecutor(max_workers=2) as ex:
        list(ex.map(lambda i: time.sleep(3600), range(2)))


def tick_forever(path, out):
    """Record the attempt, then append the time to ``out`` every 0.05 s, forever."""
    record_run(path)
    while True:
        with open(out, "a") as f:
            f.write(f"{time.time()}\\n")
        time.sleep(0.05)


def shell_forever(path, pidfile):
    """Record the attempt, then run a command that never ends (jobs.builtin:shell)."""
    from jobs.builtin import shell

    record_run(path)
    shell(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 3600"])
'''


def poison_config(tmp_path: Path, url: str, **overrides: Any) -> Path:
    package = tmp_path / "jobpaths" / "poisonjobs"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "jobs.py").write_text(POISON_JOBS)
    sections: dict[str, Any] = {
        "jobs": {"allow": [*TEST_ALLOW, "poisonjobs.*"], "paths": [str(package.parent)]},
        **overrides,
    }
    config = write_config(tmp_path, url, **sections)
    upgrade_database(config)
    return config


@pytest.fixture
def one_slot(request: pytest.FixtureRequest, tmp_path: Path, pg_url: str) -> Iterator[Cluster]:
    """One node of both roles with one worker slot, a shutdown grace of 2 s and a misfire
    grace of 4 s, or the one a test gives as its indirect parameter (a test that makes
    several CLI calls while a run waits for the slot needs more on a loaded machine)."""
    grace = getattr(request, "param", 4)
    config = poison_config(
        tmp_path, pg_url, worker={**TEST_SETTINGS["worker"], "concurrency": 1,
                                  "shutdown_grace_seconds": 2.0},
        scheduler={**TEST_SETTINGS["scheduler"], "misfire_grace_seconds": grace})
    with cluster(tmp_path, config, pg_url) as c:
        c.start("n1", "all")
        c.wait_leader()
        yield c


def add(c: Cluster, job_id: str, func: str, *flags: str) -> None:
    run_cli("jobs", "add", job_id, "--func", func, "--every", "1h",
            "--kwarg", f"path={c.records}", *flags, config=c.config)


def run_now(c: Cluster, job_id: str) -> int:
    return int(run_json("jobs", "run", job_id, "--json", config=c.config)["run_id"])


def row_of(c: Cluster, run_id: int) -> Any:
    return next(r for r in c.runs() if r.id == run_id)


def wait_status(c: Cluster, run_id: int, *statuses: str, timeout: float = 30) -> Any:
    return wait_for(lambda: (r := row_of(c, run_id)).status in statuses and r,
                    timeout=timeout, what=f"run {run_id} to be {'/'.join(statuses)}",
                    details=c.leader_logs)


def attempts_of(c: Cluster, job_id: str) -> list[int]:
    return [r["attempt"] for r in records_of(c) if r["job_id"] == job_id]


def test_a_poison_run_is_quarantined_after_two_deaths_and_the_cluster_keeps_firing(
    tmp_path: Path, pg_url: str
) -> None:
    config = poison_config(tmp_path, pg_url)
    with cluster(tmp_path, config, pg_url) as c:
        c.start("n1", "all")
        c.wait_leader()
        c.add_second_jobs(1)
        add(c, "poison", "poisonjobs.jobs:kill_worker", "--recover")
        run_id = run_now(c, "poison")
        restarts = 0

        def settled() -> Any:
            nonlocal restarts
            row = row_of(c, run_id)
            if row.status == "lost":
                return row
            if not c.nodes["n1"].running():  # a supervisor restarts what dies
                assert restarts < 5, "the poison run kept killing its node"
                restarts += 1
                c.start("n1", "all")
            return None

        row = wait_for(settled, timeout=90, interval=0.2, what="the poison run to settle",
                       details=c.leader_logs)
        assert row.attempt == 2 and row.deaths == 2
        assert "quarantined: its worker died on 2 attempts" in row.error
        assert attempts_of(c, "poison") == [1, 2]
        assert restarts == 2  # one death per attempt, and no third
        quarantined = time.time()
        # The node now stays up, and the other job fires again.
        wait_for(lambda: [r for r in c.runs() if r.job_id == "tick0"
                          and r.status == "succeeded" and r.scheduled_at > quarantined + 3],
                 timeout=30, what="the other job to run after the quarantine",
                 details=c.leader_logs)
        assert c.nodes["n1"].running()
        assert row_of(c, run_id).status == "lost" and attempts_of(c, "poison") == [1, 2]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize("job", ["forever", "forever_in_executor", "shell_forever"])
@pytest.mark.parametrize("one_slot", [60], indirect=True, ids=["grace60"])
def test_sigterm_stops_a_node_whose_job_never_ends_and_records_it_interrupted(
    one_slot: Cluster, job: str, tmp_path: Path,
) -> None:
    """Whatever the job does (a loop, a ThreadPoolExecutor of its own, a command that
    never ends), SIGTERM ends the node within its grace, and no command it ran outlives
    it."""
    c = one_slot
    pidfile = tmp_path / "child.pid"
    extra = ["--kwarg", f"pidfile={pidfile}"] if job == "shell_forever" else []
    add(c, "endless", f"poisonjobs.jobs:{job}", *extra)
    add(c, "queued", "jobs.examples:record_run")
    endless = run_now(c, "endless")
    wait_status(c, endless, "running")
    queued = run_now(c, "queued")
    wait_status(c, queued, "dispatched")  # claimed; no slot free
    node = c.nodes["n1"]
    node.terminate()
    sent = time.monotonic()
    assert node.wait(timeout=2.0 + 10) == 0, node.log_tail()
    print(f"exited {time.monotonic() - sent:.1f}s after SIGTERM")
    row = row_of(c, endless)
    assert row.status == "interrupted", (row.status, row.error)
    assert "the worker stopped before the run finished" in row.error
    assert row.finished_at is not None
    again = row_of(c, queued)  # never started: given back for another worker
    assert (again.status, again.worker, again.attempt) == ("scheduled", None, 1)
    assert attempts_of(c, "queued") == []
    if job == "shell_forever":
        child = int(pidfile.read_text())
        wait_for(lambda: _gone(child), timeout=5, what=f"the command's process {child} to end")


def test_a_run_no_worker_slot_takes_within_its_grace_is_missed_and_never_starts(
    one_slot: Cluster,
) -> None:
    c = one_slot
    add(c, "endless", "poisonjobs.jobs:forever")
    add(c, "starved", "jobs.examples:record_run")
    wait_status(c, run_now(c, "endless"), "running")
    starved = run_now(c, "starved")
    wait_status(c, starved, "dispatched")
    row = wait_status(c, starved, "missed", "succeeded", timeout=20)
    assert row.status == "missed", row.error
    assert "no free worker slot within the misfire grace time (4s)" in row.error
    time.sleep(1)
    assert attempts_of(c, "starved") == []


@pytest.mark.parametrize("one_slot", [60], indirect=True, ids=["grace60"])
def test_runs_cancel_stops_a_running_run_and_further_attempts_and_refuses_what_it_cannot(
    one_slot: Cluster,
) -> None:
    c = one_slot
    add(c, "endless", "poisonjobs.jobs:forever", "--recover")
    add(c, "busy", "poisonjobs.jobs:forever")
    add(c, "waiting", "jobs.examples:record_run")
    endless = run_now(c, "endless")
    wait_status(c, endless, "running")
    # A running run: marked, then stopped by its worker (it reads the mark from the
    # database at its heartbeats), and no further attempt although it recovers.
    out = run_json("runs", "cancel", str(endless), "--json", config=c.config)
    assert out["status"] == "running" and out["via"].startswith("leader")
    row = wait_status(c, endless, "cancelled", timeout=10)
    assert row.error.startswith("cancelled while running (") and row.attempt == 1
    assert row.cancel_requested is not None
    # A claimed run that waits for a slot: cancelled, and it never starts.
    wait_status(c, run_now(c, "busy"), "running")  # holds the one slot
    waiting = run_now(c, "waiting")
    wait_status(c, waiting, "dispatched")
    assert run_json("runs", "cancel", str(waiting), "--json",
                    config=c.config)["status"] == "cancelled"
    assert row_of(c, waiting).status == "cancelled"
    # Refused, one line, nothing written: unknown, finished, not a number.
    before = [tuple(r) for r in c.runs()]
    unknown, finished, zero, word = run_cli_many(
        [["runs", "cancel", arg] for arg in ("999999", str(waiting), "0", "abc")],
        config=c.config, check=False, workers=4)
    assert_cli_error(unknown, "no run 999999")
    assert_cli_error(finished, f"run {waiting} has already finished (cancelled)")
    assert_cli_error(zero, "run id")
    assert_cli_error(word)
    assert [tuple(r) for r in c.runs()] == before
    # With no leader alive, a cancel is written directly; `jobs remove` cancels the
    # removed job's open runs.
    c.nodes["n1"].kill()
    c.nodes["n1"].wait()
    time.sleep(3)  # its lease (2 s) lapses: no leader is alive
    direct = run_now(c, "waiting")
    assert run_json("runs", "cancel", str(direct), "--json",
                    config=c.config)["via"] == "database"
    removed = run_now(c, "waiting")
    run_cli("jobs", "remove", "waiting", config=c.config)
    assert row_of(c, removed).status == "cancelled"
    assert "its job was removed" in row_of(c, removed).error
    c.start("n1", "all")
    c.wait_leader()
    time.sleep(3)
    assert {row_of(c, i).status for i in (direct, removed)} == {"cancelled"}
    assert attempts_of(c, "waiting") == []
    assert attempts_of(c, "endless") == [1]


def test_a_second_process_with_a_workers_id_ends_the_first_before_its_run_is_made_again(
    tmp_path: Path, pg_url: str
) -> None:
    """Two processes given one node id (the attack: the default id collides for
    containers that share a hostname): the second one's start takes the node's member
    row, the first one's next heartbeat finds it taken and ends that process (exit status
    78). Its ``--recover`` run is made again only after that, never beside it."""
    config = poison_config(tmp_path, pg_url)
    with cluster(tmp_path, config, pg_url) as c:
        c.start("s1", "scheduler")
        c.start("w1", "worker")
        c.wait_leader()
        run_cli("jobs", "add", "long", "--func", "jobs.examples:record_run", "--every", "1h",
                "--kwarg", f"path={c.records}", "--kwarg", "sleep=20", "--recover",
                config=config)
        run_id = run_now(c, "long")
        wait_status(c, run_id, "running")
        first = c.nodes["w1"]
        with start_node(config, node_id="w1", role="worker",
                        log_path=tmp_path / "w1-twin.log") as twin:
            ended = wait_for(lambda: not first.running() and time.time(), timeout=20,
                             interval=0.05, what="the first w1 to end",
                             details=first.log_tail)
            status = first.wait()
            again = wait_for(lambda: [r for r in records_of(c)
                                      if r["job_id"] == "long" and r["attempt"] == 2],
                             timeout=40, what="attempt 2", details=c.leader_logs)
            assert twin.running()
        print(f"the first w1 ended with {status}; attempt 2 started "
              f"{again[0]['started'] - ended:+.1f}s after")
        assert status == 78, first.log_tail()
        assert "another process took it" in first.log()
        assert again[0]["started"] > ended, "attempt 2 started before the first w1 ended"


def test_a_paused_workers_job_is_paused_with_it_and_killed_once_counted_out(
    tmp_path: Path, pg_url: str
) -> None:
    """Issue 15's attack: SIGSTOP stopped the worker but not the slot process its job ran
    in, so the job ran on while the leader counted the run out and an overlap policy
    (or a ``--recover`` retry) started the next one beside it. The slot process now
    stops with its worker, and once the worker runs again a run that a leader recorded
    ``lost`` meanwhile is killed, not resumed."""
    config = poison_config(tmp_path, pg_url)
    out = tmp_path / "ticks.txt"
    with cluster(tmp_path, config, pg_url) as c:
        c.start("s1", "scheduler")
        c.wait_leader()
        c.start("w1", "worker")
        run_cli("jobs", "add", "ticker", "--func", "poisonjobs.jobs:tick_forever",
                "--every", "1h", "--overlap", "skip", "--kwarg", f"path={c.records}",
                "--kwarg", f"out={out}", config=c.config)
        wait_for(lambda: any(m["node_id"] == "w1" for m in run_json(
            "cluster", "status", "--json", config=c.config)["members"]),
            timeout=30, what="the worker to join")
        run_id = run_now(c, "ticker")
        wait_status(c, run_id, "running")
        wait_for(lambda: out.exists() and out.read_text().count("\n") > 3, timeout=10,
                 what="the job to tick")
        worker = c.nodes["w1"]
        os.kill(worker.pid, signal.SIGSTOP)
        paused = time.time()
        try:
            lost = wait_status(c, run_id, "lost", timeout=40)
            during = [float(t) for t in out.read_text().split()
                      if float(t) > paused + 0.5]
            assert during == [], f"{len(during)} ticks while its worker was stopped"
            assert "worker w1 stopped" in lost.error
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        resumed = time.time()
        row = wait_status(c, run_id, "interrupted", timeout=20)
        assert "paused past its claim lease and a leader counted the run out" in row.error
        time.sleep(1.0)
        after = [float(t) for t in out.read_text().split() if float(t) > resumed + 0.5]
        assert after == [], f"{len(after)} ticks after the run was counted out"
        assert attempts_of(c, "ticker") == [1]
