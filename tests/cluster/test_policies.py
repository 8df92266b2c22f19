"""Job policies with real ``qcluster start`` processes across a leader kill (issue 15,
"Done when"): a retry scheduled by the old leader runs once under the new one; an overlap
decision holds while the leader changes; every fire time is a run row (``skipped`` with
its reason is a row, never an absence)."""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from qcluster.store.runs import OPEN
from tests.cluster.harness import Cluster, upgrade_database
from tests.conftest import fresh_pg_database
from tests.helpers import TEST_ALLOW, TEST_SETTINGS, run_cli, run_json, wait_for, write_config

pytestmark = pytest.mark.cluster

#: Jobs of the test's own ([jobs] paths): each writes one JSON line per start and end.
POLICY_JOBS = '''
import itertools
import json
import os
import time
from datetime import UTC, datetime, timedelta

from qcluster import current_run


def _line(path, **fields):
    run = current_run()
    data = {"job_id": run.job_id, "run_id": run.run_id, "attempt": run.attempt,
            "scheduled_at": run.scheduled_at.timestamp(), "epoch": run.epoch, **fields}
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(data) + "\\n").encode())
    finally:
        os.close(fd)


def fail_first(path):
    """Fail on the first attempt of each run, succeed on the next."""
    _line(path, event="start", at=time.time())
    if current_run().attempt == 1:
        raise RuntimeError("first attempt fails")


def hang(path):
    """Record the start, then never return."""
    _line(path, event="start", at=time.time())
    while True:
        time.sleep(0.1)


def busy(path, seconds):
    """Take ``seconds``, recording when it started and ended."""
    _line(path, event="start", at=time.time())
    time.sleep(seconds)
    _line(path, event="end", at=time.time())
'''


#: The nodes of the module's cluster; each test finds them all running.
NODES = {"s1": "scheduler", "s2": "scheduler", "w1": "worker", "w2": "worker"}


class PolicyCluster:
    """One cluster (two schedulers, two workers, on a database of its own) that the tests
    of this module take in turn instead of starting one each: every test adds jobs of ids
    of its own, and its jobs write their lines to a file in its own ``tmp_path``.

    :meth:`cluster` starts again any node that the previous test killed and waits for a
    leader; after the test it removes every job and waits until no run is open, so that
    the next test finds idle nodes and only older rows of other jobs. A test that fails,
    or a cluster that does not settle, closes the cluster: the next test gets a new one.
    """

    def __init__(self, make_dir: Callable[[], Path], admin_url: str) -> None:
        self._make_dir = make_dir
        self._admin_url = admin_url
        self._current: Cluster | None = None
        self._database: contextlib.ExitStack | None = None

    @contextlib.contextmanager
    def cluster(self, tmp_path: Path) -> Iterator[Cluster]:
        c = self._current or self._new()
        for node_id, role in NODES.items():
            node = c.nodes.get(node_id)
            if node is None or not node.running():
                c.start(node_id, role)
        c.records = tmp_path / "records.jsonl"
        c.wait_leader()
        try:
            yield c
        except BaseException:
            self.close()
            raise
        try:
            self._settle(c)
        except Exception:
            self.close()
            raise

    def _new(self) -> Cluster:
        self._database = contextlib.ExitStack()
        url = self._database.enter_context(fresh_pg_database(self._admin_url))
        where = self._make_dir()
        package = where / "jobpaths" / "policyjobs"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "jobs.py").write_text(POLICY_JOBS)
        config = write_config(
            where, url, jobs={"allow": [*TEST_ALLOW, "policyjobs.*"],
                              "paths": [str(package.parent)]},
            scheduler={**TEST_SETTINGS["scheduler"], "misfire_grace_seconds": 10})
        upgrade_database(config)
        self._current = Cluster(where, config, url)
        return self._current

    @staticmethod
    def _settle(c: Cluster) -> None:
        """Remove every job of the test; wait until none of its runs is open."""
        from qcluster import Client

        client = Client(c.config)
        for job in client.list():
            client.remove(job["id"])
        wait_for(lambda: not [r for r in c.runs() if r.status in OPEN], timeout=30,
                 what="the runs of the removed jobs to end", details=c.leader_logs)

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None
        if self._database is not None:
            self._database.close()
            self._database = None


@pytest.fixture(scope="module")
def policy(pg_admin_url: str, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[PolicyCluster]:
    shared = PolicyCluster(lambda: tmp_path_factory.mktemp("policy-cluster"), pg_admin_url)
    try:
        yield shared
    finally:
        shared.close()


def lines(c: Cluster) -> list[dict[str, Any]]:
    if not c.records.exists():
        return []
    return [json.loads(line) for line in c.records.read_text().splitlines() if line]


def rows_of(c: Cluster, job_id: str) -> list[Any]:
    return [r for r in c.runs() if r.job_id == job_id]


def test_a_retry_scheduled_by_a_killed_leader_runs_once_under_the_next(
    tmp_path: Path, policy: PolicyCluster
) -> None:
    with policy.cluster(tmp_path) as c:
        old = c.wait_leader()
        run_cli("jobs", "add", "retry", "--func", "policyjobs.jobs:fail_first",
                "--every", "1h", "--kwarg", f"path={c.records}", "--retries", "2",
                "--retry-backoff", "8s", config=c.config)
        run_cli("jobs", "run", "retry", config=c.config)

        def retry_scheduled() -> Any:
            rows = rows_of(c, "retry")
            return rows and rows[0].status == "scheduled" and rows[0].attempt == 2 and rows[0]

        row = wait_for(retry_scheduled, timeout=30, what="attempt 2 to be scheduled",
                       details=c.leader_logs)
        assert row.due_at is not None and row.due_at > time.time()  # its backoff, not yet
        assert row.epoch == old.epoch and "first attempt fails" in row.error
        assert old.leader_id is not None
        c.nodes[old.leader_id].kill()
        new = c.wait_leader(other_than=old.leader_id, after_epoch=old.epoch)
        done = wait_for(lambda: (r := rows_of(c, "retry")[0]).status == "succeeded" and r,
                        timeout=40, what="attempt 2 to succeed", details=c.leader_logs)
        # succeeded: no retry is left to take (only a failed or timed-out run keeps them)
        assert done.attempt == 2 and done.retries_left == 0
        starts = [(x["attempt"]) for x in lines(c) if x["job_id"] == "retry"]
        assert starts == [1, 2]  # each attempt ran once
        second = next(x for x in lines(c) if x["attempt"] == 2)
        assert second["at"] >= row.due_at - 1.0  # after its backoff (a second's send-ahead)
        assert new.epoch > old.epoch


def test_overlap_skip_holds_across_a_leader_kill_and_every_fire_is_a_row(
    tmp_path: Path, policy: PolicyCluster
) -> None:
    with policy.cluster(tmp_path) as c:
        old = c.wait_leader()
        run_cli("jobs", "add", "slow", "--func", "policyjobs.jobs:busy", "--every", "1s",
                "--kwarg", f"path={c.records}", "--kwarg", "seconds=3.5",
                "--overlap", "skip", config=c.config)
        first = wait_for(lambda: min((r.scheduled_at for r in rows_of(c, "slow")),
                                     default=None), timeout=30, what="the first fire")
        assert isinstance(first, float)
        time.sleep(5)
        assert old.leader_id is not None
        c.nodes[old.leader_id].kill()
        c.wait_leader(other_than=old.leader_id, after_epoch=old.epoch)
        time.sleep(9)
        end = time.time() - 5
        def settled() -> list[Any] | None:
            rs = rows_of(c, "slow")
            done = all(r.status in ("succeeded", "skipped", "missed", "failed", "lost")
                       for r in rs if r.scheduled_at <= end)
            return rs if done else None

        rows = wait_for(settled, timeout=40, what="runs to settle")
        assert isinstance(rows, list)
        by_time = {r.scheduled_at: r for r in rows}
        t = first
        while t <= end:  # every fire time is a row: run, or skipped with the reason
            assert t in by_time, f"fire {t} has no run row"
            row = by_time[t]
            assert row.status in ("succeeded", "skipped", "missed"), (row.status, row.error)
            if row.status == "skipped":
                assert "overlap skip: run" in row.error
            t += 1.0
        events = sorted((x for x in lines(c) if x["job_id"] == "slow"), key=lambda x: x["at"])
        running = 0
        for x in events:  # never two runs of the job at once, whoever led
            running += 1 if x["event"] == "start" else -1
            assert running <= 1, "two runs of an overlap-skip job ran at once"
        ran = {x["run_id"] for x in events if x["event"] == "start"}
        succeeded = {r.id for r in rows if r.status == "succeeded"}
        assert succeeded <= ran and len(succeeded) >= 3
        assert sum(1 for r in rows if r.status == "skipped") >= 6


def test_misfire_policies_after_every_scheduler_was_down(
    tmp_path: Path, policy: PolicyCluster
) -> None:
    """Both schedulers are killed for 8 s; the next leader finds 8 s of fire times past
    their 2 s grace, within a 60 s catch-up window: run-all runs each, run-once one,
    skip none (recorded missed); every fire time is one row and ran at most once."""
    with policy.cluster(tmp_path) as c:
        c.wait_leader()
        for policy in ("run-all", "run-once", "skip"):
            run_cli("jobs", "add", policy, "--func", "policyjobs.jobs:busy", "--every", "1s",
                    "--kwarg", f"path={c.records}", "--kwarg", "seconds=0",
                    "--misfire", policy, "--misfire-grace", "2", "--catch-up", "60s",
                    config=c.config)
        policies = ("run-all", "run-once", "skip")
        wait_for(lambda: len({r.job_id for r in c.runs()
                              if r.status == "succeeded" and r.job_id in policies}) == 3,
                 timeout=30, what="a run of each job")
        down = time.time()
        for s in ("s1", "s2"):
            c.nodes[s].kill()
        time.sleep(8)
        up = time.time()
        c.start("s1", "scheduler")
        c.wait_leader()
        time.sleep(4)
        end = up - 3  # fire times well inside the gap: 2 s past their grace at restart
        rows = {job: {r.scheduled_at: r for r in rows_of(c, job)} for job in
                ("run-all", "run-once", "skip")}
        gap = {job: [r for t, r in by.items() if down + 1 < t < end]
               for job, by in rows.items()}
        assert all(len(g) >= 4 for g in gap.values()), {k: len(v) for k, v in gap.items()}
        wait_for(lambda: all(r.status in ("succeeded", "missed") for job in gap
                             for r in rows_of(c, job) if r.scheduled_at < end),
                 timeout=30, what="the gap's runs to settle")
        final = {job: [r for r in rows_of(c, job) if down + 1 < r.scheduled_at < end]
                 for job in gap}
        assert {r.status for r in final["run-all"]} == {"succeeded"}
        assert {r.status for r in final["skip"]} == {"missed"}
        assert all("misfire policy skip" in r.error for r in final["skip"])
        once = [r.status for r in final["run-once"]]
        assert set(once) == {"missed"}  # coalesced into the latest, which is after `end`
        assert all("coalesced" in r.error for r in final["run-once"])
        started = [(x["job_id"], x["scheduled_at"]) for x in lines(c) if x["event"] == "start"]
        assert len(started) == len(set(started))  # no fire time ran twice
        for job, by in rows.items():  # and every second of the whole window is a row
            times = sorted(by)
            assert all(b - a == 1.0 for a, b in itertools.pairwise(times)), job


def test_max_runs_holds_across_a_leader_kill(tmp_path: Path, policy: PolicyCluster) -> None:
    with policy.cluster(tmp_path) as c:
        old = c.wait_leader()
        run_cli("jobs", "add", "six", "--func", "policyjobs.jobs:busy", "--every", "1s",
                "--kwarg", f"path={c.records}", "--kwarg", "seconds=0", "--max-runs", "6",
                config=c.config)
        wait_for(lambda: len(rows_of(c, "six")) >= 3, timeout=30, what="three runs")
        assert old.leader_id is not None
        c.nodes[old.leader_id].kill()
        c.wait_leader(other_than=old.leader_id, after_epoch=old.epoch)
        time.sleep(8)
        rows = rows_of(c, "six")
        ran = [r for r in rows if r.status not in ("missed", "skipped")]
        assert len(ran) == 6, [(r.scheduled_at, r.status) for r in rows]
        job = next(j for j in run_json("jobs", "list", "--json", config=c.config)
                   if j["id"] == "six")
        assert (job["runs_made"], job["next_run_time"]) == (6, None)


def test_overlap_buffer_one_runs_the_waiting_fire_after_the_open_one_across_a_kill(
    tmp_path: Path, policy: PolicyCluster
) -> None:
    with policy.cluster(tmp_path) as c:
        old = c.wait_leader()
        run_cli("jobs", "add", "buf", "--func", "policyjobs.jobs:busy", "--every", "1s",
                "--kwarg", f"path={c.records}", "--kwarg", "seconds=2.5",
                "--overlap", "buffer-one", config=c.config)
        wait_for(lambda: any(r.status == "buffered" for r in rows_of(c, "buf")), timeout=30,
                 what="a buffered run")
        assert old.leader_id is not None
        c.nodes[old.leader_id].kill()
        c.wait_leader(other_than=old.leader_id, after_epoch=old.epoch)
        time.sleep(8)
        run_cli("jobs", "pause", "buf", config=c.config)

        def settled() -> list[Any] | None:
            rs = rows_of(c, "buf")
            ended = ("succeeded", "skipped", "missed")  # missed: coalesced during the hand-over
            return rs if all(r.status in ended for r in rs) else None

        rows = wait_for(settled, timeout=40, what="every run to end",
                        details=lambda: str([(r.id, r.status, r.error) for r in rows_of(c, "buf")]))
        assert isinstance(rows, list)
        times = sorted(r.scheduled_at for r in rows)
        assert all(b - a == 1.0 for a, b in itertools.pairwise(times))  # no fire absent
        events = sorted((x for x in lines(c) if x["job_id"] == "buf"), key=lambda x: x["at"])
        running = 0
        for x in events:
            running += 1 if x["event"] == "start" else -1
            assert running <= 1, "two runs of a buffer-one job ran at once"
        succeeded = [r for r in rows if r.status == "succeeded"]
        skipped = [r for r in rows if r.status == "skipped"]
        assert len(succeeded) >= 4 and skipped
        assert all("already waiting" in r.error for r in skipped)
        assert all("coalesced" in r.error for r in rows if r.status == "missed")
        # each run after the first was buffered: it started after the previous one ended
        ends = [x["at"] for x in events if x["event"] == "end"]
        starts = [x["at"] for x in events if x["event"] == "start"]
        assert all(s >= e for s, e in zip(starts[1:], ends, strict=False))


def test_a_timed_out_attempt_is_retried_under_the_next_leader_and_times_out_again(
    tmp_path: Path, policy: PolicyCluster
) -> None:
    with policy.cluster(tmp_path) as c:
        old = c.wait_leader()
        run_cli("jobs", "add", "hangs", "--func", "policyjobs.jobs:hang", "--every", "1h",
                "--kwarg", f"path={c.records}", "--timeout", "2s", "--retries", "1",
                "--retry-backoff", "6s", config=c.config)
        run_cli("jobs", "run", "hangs", config=c.config)
        first = wait_for(lambda: (r := rows_of(c, "hangs")[0]).attempt == 2 and r,
                         timeout=30, what="attempt 2 after the timeout", details=c.leader_logs)
        assert first.status == "scheduled" and "timed out after 2s" in first.error
        assert old.leader_id is not None
        c.nodes[old.leader_id].kill()
        c.wait_leader(other_than=old.leader_id, after_epoch=old.epoch)
        done = wait_for(lambda: (r := rows_of(c, "hangs")[0]).status == "timed_out"
                        and r.attempt == 2 and r, timeout=40, what="attempt 2 to time out",
                        details=c.leader_logs)
        assert done.retries_left == 0 and done.error == "timed out after 2s"
        assert 1.9 <= done.duration < 6
        assert [x["attempt"] for x in lines(c)] == [1, 2]


def test_overlap_cancel_other_stops_the_running_run_across_a_leader_kill(
    tmp_path: Path, policy: PolicyCluster
) -> None:
    with policy.cluster(tmp_path) as c:
        old = c.wait_leader()
        run_cli("jobs", "add", "replace", "--func", "policyjobs.jobs:hang", "--every", "3s",
                "--kwarg", f"path={c.records}", "--overlap", "cancel-other", config=c.config)
        wait_for(lambda: any(r.status == "running" for r in rows_of(c, "replace")),
                 timeout=30, what="a running run")
        assert old.leader_id is not None
        c.nodes[old.leader_id].kill()
        c.wait_leader(other_than=old.leader_id, after_epoch=old.epoch)
        most = 0
        deadline = time.time() + 14
        while time.time() < deadline:  # never two runs of the job at once
            most = max(most, sum(r.status == "running" for r in rows_of(c, "replace")))
            time.sleep(0.2)
        assert most == 1
        run_cli("jobs", "remove", "replace", config=c.config)
        rows = wait_for(lambda: (rs := rows_of(c, "replace")) and all(
            r.status not in ("running", "dispatched", "scheduled", "buffered") for r in rs)
            and rs, timeout=30, what="the runs to end", details=c.leader_logs)
        assert isinstance(rows, list)
        stopped = [r for r in rows if r.error and "cancelled while running" in r.error]
        assert len(stopped) >= 3, [(r.status, r.error) for r in rows]
        assert all(r.status == "cancelled" for r in stopped)
        starts = sorted(x["at"] for x in lines(c))
        ends = sorted(r.finished_at for r in stopped)
        assert all(s >= e - 0.5 for s, e in zip(starts[1:], ends, strict=False))


def test_a_backfill_run_again_after_a_leader_kill_writes_nothing_and_one_without_a_leader_runs(
    tmp_path: Path, policy: PolicyCluster
) -> None:
    with policy.cluster(tmp_path) as c:
        old = c.wait_leader()
        run_cli("jobs", "add", "daily", "--func", "policyjobs.jobs:busy", "--cron", "0 6 * * *",
                "--kwarg", f"path={c.records}", "--kwarg", "seconds=0", config=c.config)
        now = datetime.now(UTC)
        # 3 days 23 hours: at least three 06:00 fire times, whatever the time of day
        args = ("jobs", "backfill", "daily", "--from", (now - timedelta(days=6)).isoformat(),
                "--to", (now - timedelta(days=2, hours=1)).isoformat(), "--json")
        first = run_json(*args, config=c.config)
        assert first["new"] == first["fire_times"] >= 3 and first["via"].startswith("leader")
        wait_for(lambda: [r.status for r in rows_of(c, "daily")] == ["succeeded"] * first["new"],
                 timeout=30, what="the backfilled runs to succeed", details=c.leader_logs)
        assert old.leader_id is not None
        c.nodes[old.leader_id].kill()
        c.wait_leader(other_than=old.leader_id, after_epoch=old.epoch)
        second = run_json(*args, config=c.config)
        assert (second["new"], second["already"]) == (0, first["new"])
        for s in ("s1", "s2"):  # no leader at all: the CLI writes them, fenced
            c.nodes[s].kill()
        later = ("jobs", "backfill", "daily", "--from",
                 (now - timedelta(days=2)).isoformat(), "--to",
                 (now - timedelta(days=1)).isoformat(), "--json")
        def written() -> Any:  # refused ("try again") until the killed leader's lease ends
            result = run_cli(*later, config=c.config, check=False)
            return result.returncode == 0 and json.loads(result.stdout)

        third = wait_for(written, timeout=30, what="a backfill with no leader alive")
        assert third["via"] == "database" and third["new"] == 1
        c.start("s1", "scheduler")
        wait_for(lambda: [r.status for r in rows_of(c, "daily")]
                 == ["succeeded"] * (first["new"] + 1),
                 timeout=40, what="the run backfilled with no leader to run",
                 details=c.leader_logs)
        started = [x["scheduled_at"] for x in lines(c) if x["event"] == "start"]
        assert len(started) == len(set(started)) == first["new"] + 1
