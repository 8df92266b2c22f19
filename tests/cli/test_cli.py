"""The ``qcluster`` command line, run as real subprocesses, on SQLite and on PostgreSQL.

No node runs in these tests, so every job change goes "via database". What a running
leader changes is in ``test_process.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from tests.cluster.harness import upgrade_database
from tests.helpers import (
    TEST_SECRET,
    NodeProcess,
    assert_cli_error,
    jobs_json,
    parse_time,
    run_cli,
    run_cli_many,
    run_json,
    wait_for,
    write_config,
    write_job_file,
    write_private,
)

HELLO = "jobs.examples:hello"
CLOSED_PASSWORD = "pw-closed-5b1e"
COMMANDS = ("start", "jobs", "runs", "cluster", "config", "db", "backend")


@pytest.fixture
def config(tmp_path: Path, db_url: str) -> Path:
    """A test config on a fresh database that has qcluster's tables.

    The tables come from the function behind ``qcluster db upgrade``, called in this
    process: a subprocess would add a second to each test, and ``db upgrade`` itself is
    tested through the CLI below. Not left to the CLI's own creation on SQLite either:
    commands that start together on a file without tables race to create them, and one
    fails with "database is locked" (a product bug).
    """
    return config_with_tables(tmp_path, db_url)


def config_with_tables(tmp_path: Path, db_url: str) -> Path:
    path = write_config(tmp_path, db_url)
    upgrade_database(path)
    return path


def by_id(jobs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {j["id"]: j for j in jobs}


def next_time(config: Path, job_id: str) -> datetime:
    job = run_json("jobs", "show", job_id, "--json", config=config)
    assert job["next_run_time"] is not None, job
    return parse_time(job["next_run_time"])


def first_day_at(after: datetime, zone: ZoneInfo, hour: int,
                 matches: Callable[[date], bool]) -> datetime:
    """The first ``hour``:00 wall time in ``zone`` strictly after ``after`` on a matching
    day: an independent model of a daily crontab line."""
    day = after.astimezone(zone).date()
    while True:
        candidate = datetime(day.year, day.month, day.day, hour, tzinfo=zone)
        if candidate > after and matches(day):
            return candidate.astimezone(UTC)
        day += timedelta(days=1)


# -- help and schema -------------------------------------------------------------------------


def test_help_of_the_console_script_and_of_python_m_qcluster_lists_the_commands() -> None:
    script = Path(sys.executable).with_name("qcluster")
    assert script.exists(), f"the qcluster console script is not installed beside {sys.executable}"
    results = [
        subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60,
                       check=False),
        run_cli("--help", config=None),
    ]
    for result in results:
        assert result.returncode == 0, result
        assert "Usage: qcluster" in result.stdout
        for command in COMMANDS:
            assert command in result.stdout, f"{command!r} missing from --help:\n{result.stdout}"
        assert result.stderr == ""


def test_db_upgrade_twice_is_idempotent(tmp_path: Path, db_url: str) -> None:
    config = write_config(tmp_path, db_url)
    first = run_cli("db", "upgrade", config=config)
    second = run_cli("db", "upgrade", config=config)
    assert first.stdout.startswith("database schema at revision ")
    assert second.stdout == first.stdout
    assert jobs_json(config) == []


# -- jobs add and the job commands ---------------------------------------------------------


def test_jobs_add_takes_each_trigger_kind_and_reports_json(config: Path) -> None:
    before = datetime.now(UTC)
    added = run_cli_many([
        ["jobs", "add", "by-cron", "--func", HELLO, "--cron", "*/5 * * * *", "--json"],
        ["jobs", "add", "by-interval", "--func", HELLO, "--every", "30s", "--json",
         "--arg", "42", "--arg", "text", "--kwarg", "name=qc", "--kwarg", 'extra={"a": [1]}'],
        ["jobs", "add", "by-date", "--func", HELLO, "--at", "2031-01-02T09:30:00",
         "--tz", "Europe/Paris", "--json", "--recover", "--misfire-grace", "5",
         "--no-coalesce"],
    ], config=config)  # fmt: skip
    after = datetime.now(UTC)
    for result, job_id in zip(added, ("by-cron", "by-interval", "by-date"), strict=True):
        assert json.loads(result.stdout) == {"id": job_id, "status": "added", "via": "database"}

    jobs = by_id(jobs_json(config))
    assert sorted(jobs) == ["by-cron", "by-date", "by-interval"]
    for job in jobs.values():
        assert {"id", "func", "trigger", "next_run_time", "paused"} <= set(job), job
        assert job["func"] == HELLO
        assert job["paused"] is False

    cron = jobs["by-cron"]
    nxt = parse_time(cron["next_run_time"])
    assert nxt.minute % 5 == 0 and nxt.second == 0 and before < nxt <= after + timedelta(minutes=5)
    assert "*/5 * * * *" in cron["trigger"]

    interval = jobs["by-interval"]
    nxt = parse_time(interval["next_run_time"])
    assert nxt.microsecond == 0, "an interval starts on a whole second"
    assert before - timedelta(seconds=1) < nxt - timedelta(seconds=30) <= after
    assert interval["trigger"] == "every 30s"
    assert interval["args"] == [42, "text"]
    assert interval["kwargs"] == {"name": "qc", "extra": {"a": [1]}}

    at = jobs["by-date"]
    assert parse_time(at["next_run_time"]) == datetime(2031, 1, 2, 8, 30, tzinfo=UTC)
    assert (at["recover"], at["misfire_grace_seconds"], at["coalesce"]) == (True, 5, False)


def test_cron_day_of_week_follows_crontab_numbering(config: Path, tmp_path: Path) -> None:
    """dow 1 is Monday and 0 and 7 are Sunday (APScheduler alone says 0 is Monday); with
    both day of month and day of week given, either one matching is enough."""
    utc, new_york = ZoneInfo("UTC"), ZoneInfo("America/New_York")
    cases: dict[str, tuple[str, ZoneInfo, Callable[[date], bool]]] = {
        "monday": ("0 9 * * 1", utc, lambda d: d.weekday() == 0),
        "sunday-0": ("0 9 * * 0", utc, lambda d: d.weekday() == 6),
        "sunday-7": ("0 9 * * 7", utc, lambda d: d.weekday() == 6),
        "monday-new-york": ("0 9 * * mon", new_york, lambda d: d.weekday() == 0),
        "13th-or-friday": ("0 9 13 * 5", utc, lambda d: d.day == 13 or d.weekday() == 4),
    }
    job_file = write_job_file(tmp_path / "crons.toml", [
        {"id": job_id, "func": HELLO, "cron": expr, "tz": str(zone)}
        for job_id, (expr, zone, _) in cases.items() if job_id != "monday"
    ])  # fmt: skip
    before = datetime.now(UTC)
    run_cli("jobs", "add", "monday", "--func", HELLO, "--cron", "0 9 * * 1", config=config)
    run_cli("jobs", "apply", str(job_file), config=config)
    after = datetime.now(UTC)
    jobs = by_id(jobs_json(config))
    monday = parse_time(jobs["monday"]["next_run_time"])
    assert monday.strftime("%A %H:%M") == "Monday 09:00"
    for job_id, (_, zone, matches) in cases.items():
        got = parse_time(jobs[job_id]["next_run_time"])
        # A 09:00 passing during the commands may move the answer on by one matching day.
        expected = {first_day_at(t, zone, 9, matches) for t in (before, after)}
        assert got in expected, f"{job_id}: next run {got}, expected one of {expected}"


def test_pause_resume_show_and_remove_change_only_the_named_job(config: Path) -> None:
    run_cli_many([
        ["jobs", "add", "target", "--func", HELLO, "--every", "1h"],
        ["jobs", "add", "bystander", "--func", HELLO, "--cron", "0 0 * * *"],
    ], config=config)  # fmt: skip
    bystander = by_id(jobs_json(config))["bystander"]

    paused = run_cli("jobs", "pause", "target", config=config)
    assert paused.stdout.strip() == "paused job target (via database)"
    shown = run_json("jobs", "show", "target", "--json", config=config)
    assert (shown["paused"], shown["next_run_time"]) == (True, None)
    assert shown["recent_runs"] == []

    resumed = run_json("jobs", "resume", "target", "--json", config=config)
    assert resumed == {"id": "target", "status": "resumed", "via": "database"}
    jobs = by_id(jobs_json(config))
    assert jobs["target"]["paused"] is False
    assert parse_time(jobs["target"]["next_run_time"]) > datetime.now(UTC)
    assert jobs["bystander"] == bystander

    removed = run_cli("jobs", "remove", "target", config=config)
    assert removed.stdout.strip() == "removed job target (via database)"
    assert jobs_json(config) == [bystander]


# -- jobs apply ------------------------------------------------------------------------------


def apply(config: Path, path: Path, *flags: str) -> dict[str, Any]:
    summary: dict[str, Any] = run_json("jobs", "apply", str(path), "--json", *flags,
                                       config=config)
    return summary


def summary(created: int = 0, updated: int = 0, unchanged: int = 0,
            removed: int = 0) -> dict[str, Any]:
    return {"created": created, "updated": updated, "unchanged": unchanged, "removed": removed,
            "via": "database"}


def test_jobs_apply_creates_updates_keeps_and_prunes(config: Path, tmp_path: Path) -> None:
    # "* * * * * *" fires every second: once the stored next run time is in the past, a
    # recomputed one would differ, so an unchanged job shows that it kept its own.
    secondly = {"id": "secondly", "func": HELLO, "cron": "* * * * * *"}
    daily = {"id": "daily", "func": HELLO, "cron": "0 3 * * *", "tz": "Asia/Tokyo",
             "kwargs": {"name": "x"}}
    once = {"id": "once", "func": HELLO, "at": "2031-06-01T12:00:00+00:00", "recover": True}
    v1 = write_job_file(tmp_path / "v1.toml", [secondly, daily, once])
    assert apply(config, v1) == summary(created=3)
    jobs = by_id(jobs_json(config))
    assert jobs["daily"]["kwargs"] == {"name": "x"} and jobs["once"]["recover"] is True

    due = parse_time(jobs["secondly"]["next_run_time"])
    wait_for(lambda: datetime.now(UTC) > due, 5, what="the next run time to pass")
    assert apply(config, v1) == summary(unchanged=3)
    assert by_id(jobs_json(config)) == jobs, "re-applying an unchanged file changed its jobs"

    changed = {**daily, "cron": "0 4 * * *", "misfire_grace_seconds": 60, "coalesce": False}
    extra = {"id": "extra", "func": HELLO, "cron": "@hourly", "args": [1, 2]}
    v2 = write_job_file(tmp_path / "v2.toml", [secondly, changed, extra])
    assert apply(config, v2) == summary(created=1, updated=1, unchanged=1)
    assert apply(config, v2, "--prune") == summary(unchanged=3, removed=1)
    jobs2 = by_id(jobs_json(config))
    assert sorted(jobs2) == ["daily", "extra", "secondly"]
    assert jobs2["secondly"] == jobs["secondly"]
    assert "0 4 * * *" in jobs2["daily"]["trigger"]
    assert (jobs2["daily"]["misfire_grace_seconds"], jobs2["daily"]["coalesce"]) == (60, False)
    assert parse_time(jobs2["daily"]["next_run_time"]).astimezone(
        ZoneInfo("Asia/Tokyo")).strftime("%H:%M") == "04:00"
    assert jobs2["extra"]["args"] == [1, 2]


def test_reapplying_an_unchanged_every_job_keeps_its_next_run_time(
    tmp_path: Path, sqlite_url: str
) -> None:
    # The bug is in the trigger spec, the same on every database: SQLite shows it.
    config = config_with_tables(tmp_path, sqlite_url)
    job_file = write_job_file(tmp_path / "jobs.toml",
                              [{"id": "hourly", "func": HELLO, "every": "1h"}])
    applied_at = datetime.now(UTC)
    assert apply(config, job_file) == summary(created=1)
    first = next_time(config, "hourly")
    wait_for(lambda: datetime.now(UTC).second != applied_at.second, 5,
             what="the clock to reach another second")
    assert apply(config, job_file) == summary(unchanged=1)
    assert next_time(config, "hourly") == first


def test_jobs_apply_of_ten_thousand_jobs_finishes(
    config: Path, tmp_path: Path, db_url: str
) -> None:
    jobs = [
        {"id": f"bulk-{n:05d}", "func": HELLO, "cron": f"{n % 60} {n % 24} * * *",
         "kwargs": {"name": f"n{n}"}}
        for n in range(10_000)
    ]
    job_file = write_job_file(tmp_path / "bulk.toml", jobs)
    # The default lease (10 s), as users run it: the tests' 2 s lease gives sessions 1.6 s
    # of idle time in a transaction, which a busy test machine (3 test processes and
    # their nodes on 2 cores) exceeded between two statements of this long transaction.
    config = write_config(tmp_path, db_url, coordination={"dblock": {"lease_seconds": 10}})
    started = time.monotonic()
    result = apply(config, job_file)
    took = time.monotonic() - started
    print(f"\njobs apply of 10,000 jobs on {db_url.split(':')[0]} took {took:.1f}s")
    assert result == summary(created=10_000)
    listed = run_json("jobs", "list", "--limit", "3", "--json", config=config)
    assert [j["id"] for j in listed] == ["bulk-00000", "bulk-00001", "bulk-00002"]


# -- runs list ---------------------------------------------------------------------------------


def test_runs_list_filters_by_job_status_since_and_limit(config: Path, tmp_path: Path) -> None:
    job_file = write_job_file(tmp_path / "jobs.toml", [
        {"id": "alpha", "func": HELLO, "cron": "0 0 1 1 *"},
        {"id": "beta", "func": HELLO, "cron": "0 0 1 1 *"},
    ])  # fmt: skip
    apply(config, job_file)
    # No leader runs: `jobs run` records the run, for the next leader to send.
    first = run_cli("jobs", "run", "alpha", config=config)
    assert "(via database)" in first.stdout and "no leader is running" in first.stdout
    time.sleep(0.05)
    middle = datetime.now(UTC)
    run_cli_many([["jobs", "run", "alpha"], ["jobs", "run", "beta"]], config=config)

    queries: dict[str, list[str]] = {
        "all": ["--limit", "0"],
        "alpha": ["--job", "alpha", "--limit", "0"],
        "beta-scheduled": ["--job", "beta", "--status", "scheduled"],
        "succeeded": ["--status", "succeeded", "--limit", "0"],
        "since": ["--since", middle.isoformat().replace("+00:00", "Z"), "--limit", "0"],
        "one": ["--limit", "1"],
    }
    answers = dict(zip(queries, (
        json.loads(r.stdout) for r in run_cli_many(
            [["runs", "list", "--json", *args] for args in queries.values()], config=config)
    ), strict=True))  # fmt: skip

    everything = answers["all"]
    assert len(everything) == 3
    times = [parse_time(r["scheduled_at"]) for r in everything]
    assert times == sorted(times, reverse=True), "runs list is not newest first"
    for run in everything:
        assert {"run_id", "job_id", "scheduled_at", "status", "attempt", "epoch", "leader",
                "worker", "dispatched_at", "started_at", "finished_at", "error"} <= set(run)
        assert (run["status"], run["attempt"], run["worker"]) == ("scheduled", 1, None)
    assert [r["job_id"] for r in answers["alpha"]] == ["alpha", "alpha"]
    assert answers["beta-scheduled"] == [r for r in everything if r["job_id"] == "beta"]
    assert answers["succeeded"] == []
    assert sorted(r["job_id"] for r in answers["since"]) == ["alpha", "beta"]
    assert all(parse_time(r["scheduled_at"]) >= middle for r in answers["since"])
    assert answers["one"] == everything[:1]


# -- config and cluster ------------------------------------------------------------------------


def test_max_attempts_is_stored_on_the_job_and_runs_cancel_works_without_a_leader(
    config: Path, tmp_path: Path
) -> None:
    run_cli("jobs", "add", "bounded", "--func", HELLO, "--every", "1h", "--recover",
            "--max-attempts", "5", config=config)
    run_cli("jobs", "apply", str(write_job_file(tmp_path / "j.toml", [
        {"id": "filed", "func": HELLO, "every": "1h", "recover": True, "max_attempts": 2}])),
        config=config)
    shown = {j["id"]: j["max_attempts"] for j in jobs_json(config)}
    assert shown == {"bounded": 5, "filed": 2}
    run_id = run_json("jobs", "run", "bounded", "--json", config=config)["run_id"]
    done = run_json("runs", "cancel", str(run_id), "--json", config=config)
    assert done == {"run_id": run_id, "status": "cancelled", "attempt": 1, "via": "database"}
    (row,) = run_json("runs", "list", "--json", "--status", "cancelled", config=config)
    assert (row["run_id"], row["error"]) == (run_id, "cancelled: by runs cancel")
    again = run_cli("runs", "cancel", str(run_id), config=config, check=False)
    assert_cli_error(again, f"run {run_id} has already finished (cancelled)")
    other = run_json("jobs", "run", "filed", "--json", config=config)["run_id"]
    run_cli("jobs", "remove", "filed", config=config)
    (gone,) = run_json("runs", "list", "--json", "--job", "filed", config=config)
    assert (gone["run_id"], gone["status"]) == (other, "cancelled")
    assert "process group is killed" in run_cli("runs", "cancel", "--help", config=config).stdout


def test_config_check_and_show_never_print_the_secrets(tmp_path: Path, db_url: str) -> None:
    db_password = "db-pass-7c1e9"
    if db_url.startswith("postgresql"):  # the test server trusts loopback: any password works
        db_url = db_url.replace("postgres@", f"postgres:{db_password}@", 1)
        assert db_password in db_url
    secrets = [TEST_SECRET, db_password, "zk-pass-42d1", "redis-pass-90ab"]
    config = write_config(tmp_path, db_url, coordination={
        "zookeeper": {"auth": "qc:zk-pass-42d1"},
        "redis": {"urls": ["redis://:redis-pass-90ab@127.0.0.1:6390/0"]},
    })  # fmt: skip
    check, show, show_json = run_cli_many(
        [["config", "check"], ["config", "show"], ["config", "show", "--json"]], config=config)
    assert check.stdout.startswith(f"ok: {config} is valid; database ")
    assert "answers" in check.stdout
    data = json.loads(show_json.stdout)
    assert data["rpc"]["secret"] != TEST_SECRET
    assert data["scheduler"]["poll_seconds"] == 0.2
    assert data["database"]["url"].split("://")[0] == db_url.split("://")[0]
    assert "[scheduler]" in show.stdout and "poll_seconds = 0.2" in show.stdout
    for result in (check, show, show_json):
        for secret in secrets:
            assert secret not in result.stdout + result.stderr, (secret, result)


def test_cluster_status_json_has_the_cluster_leader_and_members(config: Path) -> None:
    status = run_json("cluster", "status", "--json", config=config)
    assert {"cluster", "backend", "epoch", "leader", "members"} <= set(status)
    assert (status["cluster"], status["backend"]) == ("qcluster", "dblock")
    assert status["epoch"] == 0 and status["leader"] is None and status["members"] == []


# -- refused input -------------------------------------------------------------------------


@dataclass
class Case:
    """A command that must fail, and what its one error line must contain."""

    name: str
    args: list[str]
    fragments: tuple[str, ...]
    absent: tuple[str, ...] = ()
    result: subprocess.CompletedProcess[str] | None = field(default=None, repr=False)


def refusal_cases(tmp_path: Path, db_url: str, closed_port: int) -> list[Case]:
    """Each case adds, if anything, a job named after itself: a wrong write shows by name."""

    def add(job_id: str, *args: str) -> list[str]:
        return ["jobs", "add", job_id, *args]

    def config_file(name: str, text: str) -> str:
        return str(write_private(tmp_path / name, text))

    bad_toml = config_file("bad-toml.toml", f'[database]\nurl = "{db_url}"\n[scheduler\n')
    bad_key = config_file("bad-key.toml",
                          f'[database]\nurl = "{db_url}"\n[scheduler]\npoll_secs = 1\n')
    closed_url = f"postgresql://qc:{CLOSED_PASSWORD}@127.0.0.1:{closed_port}/qc"
    closed = config_file("closed.toml", f'[database]\nurl = "{closed_url}"\n'
                         f'[rpc]\nsecret = "{TEST_SECRET}"\n')  # fmt: skip
    directory = tmp_path / "a-directory.toml"
    directory.mkdir()
    malformed = tmp_path / "malformed.toml"
    malformed.write_text(f'[[job]]\nid = "in-malformed"\nfunc = "{HELLO}"\nevery = "1s"\n[[job]\n')
    one_bad = write_job_file(tmp_path / "one-bad.toml", [
        {"id": "good-before-bad", "func": HELLO, "every": "1s"},
        {"id": "the-bad-one", "func": HELLO, "cron": "99 * * * *"},
        {"id": "good-after-bad", "func": HELLO, "every": "1s"},
    ])  # fmt: skip
    too_fast = write_job_file(tmp_path / "too-fast.toml", [
        {"id": "fine-before", "func": HELLO, "every": "1s"},
        {"id": "too-fast-in-file", "func": HELLO, "every": "250ms"},
    ])  # fmt: skip
    long_past = write_job_file(tmp_path / "long-past.toml", [
        {"id": "fine-beside-it", "func": HELLO, "every": "1s"},
        {"id": "long-past-in-file", "func": HELLO, "at": "2020-01-01T00:00:00"},
    ])  # fmt: skip
    every = ["--every", "1m"]
    return [
        Case("malformed cron", add("bad-cron", "--func", HELLO, "--cron", "61 * * * *"),
             ("cron", "61 * * * *")),
        Case("interval below the minimum interval",
             add("too-fast", "--func", HELLO, "--every", "1ms"), ("1ms", "min_interval_seconds")),
        Case("one-off older than the run retention",
             add("long-past", "--func", HELLO, "--at", "2020-01-01T00:00:00"),
             ("job 'long-past'", "2020-01-01T00:00:00+00:00", "retention_days = 7")),
        Case("one-off with a start bound",
             add("at-with-start", "--func", HELLO, "--at", "2099-01-01T00:00:00",
                 "--start", "2099-02-01T00:00:00Z"),
             ("start and end bound a repeating schedule",)),
        Case("job file with a one-off older than the run retention",
             ["jobs", "apply", str(long_past)],
             ("long-past.toml: job 'long-past-in-file'", "retention_days = 7")),
        Case("cron that never fires", add("never", "--func", HELLO, "--cron", "0 0 30 2 *"),
             ("never fires", "0 0 30 2 *")),
        Case("job file with a job below the minimum interval",
             ["jobs", "apply", str(too_fast)], ("too-fast-in-file", "min_interval_seconds")),
        Case("unknown time zone", add("bad-tz", "--func", HELLO, "--cron", "0 9 * * 1",
                                      "--tz", "Mars/Olympus_Mons"), ("Mars/Olympus_Mons",)),
        Case("two triggers", add("two-triggers", "--func", HELLO, *every, "--cron", "* * * * *"),
             ("exactly one",)),
        Case("module that does not import",
             add("no-module", "--func", "jobs.no_such_module:f", *every), ("cannot import",)),
        Case("function that does not exist",
             add("no-function", "--func", "jobs.examples:no_such_fn", *every), ("no_such_fn",)),
        Case("reference not allowed by [jobs] allow",
             add("not-allowed", "--func", "os:system", *every), ("not allowed",)),
        Case("duplicate id without --replace", add("seed", "--func", HELLO, *every),
             ("seed", "--replace")),
        Case("kwarg without '='", add("bad-kwarg", "--func", HELLO, *every, "--kwarg", "novalue"),
             ("--kwarg",)),
        *(Case(f"{verb} of an unknown job", ["jobs", verb, "ghost"], ("ghost",))
          for verb in ("show", "pause", "resume", "remove", "run")),
        Case("config that cannot be read", ["jobs", "list", "--config", str(directory)],
             ("cannot read",)),
        Case("config that is not TOML",
             add("bad-config-toml", "--func", HELLO, *every, "--config", bad_toml),
             ("bad-toml.toml",)),
        Case("unknown config key",
             add("bad-config-key", "--func", HELLO, *every, "--config", bad_key),
             ("scheduler.poll_secs",)),
        Case("postgres on a closed port", ["jobs", "list", "--config", closed],
             ("unavailable",), absent=(CLOSED_PASSWORD,)),
        Case("malformed job file", ["jobs", "apply", str(malformed)], ("invalid TOML",)),
        Case("job file with one bad job among good ones", ["jobs", "apply", str(one_bad)],
             ("the-bad-one", "cron")),
        Case("bad --since", ["runs", "list", "--since", "yesterday"], ("since", "yesterday")),
        Case("bad --status", ["runs", "list", "--status", "finished"], ("status", "finished")),
        Case("runs show of a run that does not exist", ["runs", "show", "99999"],
             ("no run 99999",)),
        Case("runs show of run 0", ["runs", "show", "0"], ("run id",)),
        Case("runs show of a run id that is not a number", ["runs", "show", "7x"],
             ("RUN", "integer")),
        Case("--config before and after the command, different",
             ["--config", str(bad_key), "jobs", "list", "--config", str(bad_toml)],
             ("--config", "twice")),
        Case("--max-attempts of 0", add("bad-attempts", "--func", HELLO, *every,
                                        "--max-attempts", "0"), ("max_attempts",)),
        Case("max_attempts in a job file that is not a number",
             ["jobs", "apply", str(write_job_file(tmp_path / "bad-attempts.toml", [
                 {"id": "in-bad-attempts", "func": HELLO, "every": "1s",
                  "max_attempts": "three"}]))], ("in-bad-attempts", "max_attempts")),
        *(Case(f"policy {flag} {value}", add(f"bad-policy-{i}", "--func", HELLO, *every,
                                              flag, value), fragments)
          for i, (flag, value, fragments) in enumerate([
              ("--retries", "-1", ("retries",)), ("--retries", "101", ("retries",)),
              ("--retry-backoff", "soon", ("retry_backoff", "soon")),
              ("--timeout", "0", ("timeout",)), ("--timeout", "5ms", ("timeout", "10ms")),
              ("--overlap", "forbid", ("overlap", "skip", "forbid")),
              ("--misfire", "fire-now", ("misfire", "run-once")),
              ("--catch-up", "-5s", ("catch_up",)), ("--start", "tomorrow", ("start",)),
              ("--end", "2026-01-01T00:00:00", ("end", "offset")),
              ("--max-runs", "0", ("max_runs",)), ("--jitter", "2d", ("jitter", "1d")),
              ("--exclude", "no good", ("calendar name",)),
              ("--tags", "no good", ("invalid tag", "no good")),
              ("--tags", ",".join(f"t{n}" for n in range(21)), ("more than 20 tags",)),
              ("--tags", "gpü", ("invalid tag",)),
              ("--group", "etl\n", ("invalid group name",)),
              ("--group", "x" * 101, ("invalid group name",)),
              ("--route", "nearest", ("route must be one of", "consistent-hash")),
          ])),
        Case("routing fields of the wrong type in a job file",
             ["jobs", "apply", str(write_job_file(tmp_path / "bad-routing.toml", [
                 {"id": "in-bad-routing", "func": HELLO, "every": "1s", "tags": [1]}]))],
             ("in-bad-routing", "tags must be a list")),
        Case("a group that is not text in a job file",
             ["jobs", "apply", str(write_job_file(tmp_path / "bad-group.toml", [
                 {"id": "in-bad-group", "func": HELLO, "every": "1s", "group": 5}]))],
             ("in-bad-group", "invalid group name")),
        Case("a job id with a newline at its end", add("bad-id\n", "--func", HELLO, *every),
             ("invalid job id",)),
        Case("end before start", add("bad-bounds", "--func", HELLO, *every, "--start",
                                     "2027-01-01T00:00:00Z", "--end", "2026-01-01T00:00:00Z"),
             ("end must be after start",)),
        Case("retry max backoff below the backoff",
             add("bad-backoff", "--func", HELLO, *every, "--retry-backoff", "1m",
                 "--retry-max-backoff", "10s"), ("retry_max_backoff",)),
        Case("coalesce contradicting the misfire policy",
             add("bad-misfire", "--func", HELLO, *every, "--no-coalesce", "--misfire",
                 "run-once"), ("contradicts",)),
        Case("a policy in a job file that is not a duration",
             ["jobs", "apply", str(write_job_file(tmp_path / "bad-policy.toml", [
                 {"id": "in-bad-policy", "func": HELLO, "every": "1s", "timeout": [1]}]))],
             ("in-bad-policy", "timeout")),
        Case("--after a job that does not exist",
             add("after-ghost", "--func", HELLO, "--after", "ghost"), ("'ghost'", "no job")),
        Case("--after beside --every", add("after-every", "--func", HELLO, *every, "--after",
                                           "seed"), ("exactly one",)),
        Case("--after itself", add("after-self", "--func", HELLO, "--after", "after-self"),
             ("itself",)),
        Case("a schedule's policy on a job that runs after another",
             add("after-jitter", "--func", HELLO, "--after", "seed", "--jitter", "2s"),
             ("jitter",)),
        Case("a condition in capitals",
             add("after-case", "--func", HELLO, "--after", "seed:Success"),
             ("'Success'", "lowercase")),
        Case("an empty after in a job file",
             ["jobs", "apply", str(write_job_file(tmp_path / "empty-after.toml", [
                 {"id": "in-empty-after", "func": HELLO, "after": []}]))],
             ("in-empty-after", "after is empty")),
        Case("after in a job file that is not a list",
             ["jobs", "apply", str(write_job_file(tmp_path / "bad-after.toml", [
                 {"id": "in-bad-after", "func": HELLO, "after": "seed"}]))],
             ("in-bad-after", "after must be a list")),
        Case("runs cancel of an unknown run", ["runs", "cancel", "987654"], ("no run 987654",)),
        Case("runs cancel of run 0", ["runs", "cancel", "0"], ("run id",)),
        Case("runs cancel of a run id too large", ["runs", "cancel", str(2**63)], ("run id",)),
        Case("runs cancel of what is not a number", ["runs", "cancel", "last"], ("RUN",)),
        Case("bad --role", ["start", "--role", "boss"], ("--role",)),
        Case("empty --node-id", ["start", "--node-id", ""], ("--node-id",)),
        Case("the same config spelt two ways is one config, a missing one is refused",
             ["-c", bad_key, "jobs", "list", "-c", str(tmp_path / "." / "bad-key.toml")],
             ("scheduler.poll_secs",)),
    ]


def table_rows(db_url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the job, run, cluster and job dependency tables: a write of any kind
    changes these."""
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return {
                table: [tuple(row) for row in conn.execute(
                    sa.text(f"SELECT * FROM {table} ORDER BY 1"))]
                for table in ("qc_jobs", "qc_runs", "qc_cluster", "qc_job_deps",
                              "qc_groups")
            }
    finally:
        engine.dispose()


@pytest.fixture
def refused(config: Path, db_url: str, tmp_path: Path,
            free_port: Callable[[], int]) -> tuple[list[Case], list[Any], list[Any]]:
    """Every refusal case run against one database, with `jobs list --json` before and
    after them all. The cases run a few at a time: their job ids differ, so a case that
    wrongly wrote would show by name in the difference."""
    run_cli("jobs", "add", "seed", "--func", HELLO, "--cron", "0 9 * * 1", config=config)
    cases = refusal_cases(tmp_path, db_url, free_port())
    before = jobs_json(config)
    rows_before = table_rows(db_url)
    results = run_cli_many([c.args for c in cases], config=config, check=False, workers=4)
    for case, result in zip(cases, results, strict=True):
        case.result = result
    return cases, [before, rows_before], [jobs_json(config), table_rows(db_url)]


def test_refused_input_prints_one_error_line_and_writes_nothing(
    refused: tuple[list[Case], list[Any], list[Any]], subtests: pytest.Subtests
) -> None:
    cases, (jobs_before, rows_before), (jobs_after, rows_after) = refused
    for case in cases:
        with subtests.test(msg=case.name):
            assert case.result is not None
            line = assert_cli_error(case.result, *case.fragments)
            for secret in case.absent:
                assert secret not in line
    with subtests.test(msg="jobs list --json is unchanged"):
        assert jobs_after == jobs_before
    with subtests.test(msg="no row of the jobs, runs or cluster tables changed"):
        assert rows_after == rows_before


@pytest.mark.parametrize("args", [
    pytest.param(["jobs", "add", "x", "--cron", "* * * * *"], id="missing-option"),
    pytest.param(["jobs", "list", "--limit", "-1"], id="bad-option-value"),
    pytest.param(["jobs", "no-such-command"], id="unknown-command"),
])  # fmt: skip
def test_usage_error_is_one_error_line_with_exit_status_2(
    args: Sequence[str], tmp_path: Path
) -> None:
    result = run_cli(*args, config=None, check=False, cwd=tmp_path)
    line = assert_cli_error(result)
    assert "internal error" not in line
    assert result.returncode == 2


# -- CLI conventions -------------------------------------------------------------------------


def test_config_before_the_command_works_as_after_it(config: Path, tmp_path: Path) -> None:
    tmp_path = tmp_path / "elsewhere"  # no qcluster.toml here
    tmp_path.mkdir()
    run_cli("--config", str(config), "jobs", "add", "early", "--func", HELLO, "--every", "1h",
            config=None, cwd=tmp_path)
    run_cli("-c", str(config), "jobs", "add", "short", "--func", HELLO, "--every", "1h",
            config=None, cwd=tmp_path)
    run_cli("--config", str(config), "jobs", "add", "both", "--func", HELLO, "--every", "1h",
            "--config", str(config), config=None, cwd=tmp_path)  # the same file twice: fine
    listed = run_json("jobs", "list", "--json", "--config", str(config), config=None)
    assert sorted(j["id"] for j in listed) == ["both", "early", "short"]
    # Without any --config the command in tmp_path sees the embedded default database,
    # which these jobs are not in: the global option really chose the file.
    default = run_cli("jobs", "list", "--json", config=None, cwd=tmp_path)
    assert json.loads(default.stdout) == []


def test_version_prints_the_installed_version() -> None:
    from importlib.metadata import version

    import qcluster

    result = run_cli("--version", config=None)
    assert result.stdout == f"qcluster {version('qcluster')}\n"
    assert version("qcluster") == qcluster.__version__
    assert result.stderr == ""


def test_shell_completion_is_offered_and_completes_commands(tmp_path: Path) -> None:
    help_text = run_cli("--help", config=None).stdout
    assert "--install-completion" in help_text and "--show-completion" in help_text
    script = run_cli("--show-completion", "bash", config=None, cwd=tmp_path,
                     env={"SHELL": "/bin/bash"})
    assert "_QCLUSTER_COMPLETE" in script.stdout, script.stdout
    # What bash asks when the user types `qcluster jo<TAB>` and `qcluster jobs pa<TAB>`.
    for words, cword, expected in (("qcluster jo", "1", "jobs"),
                                   ("qcluster jobs pa", "2", "pause")):
        done = run_cli(config=None, cwd=tmp_path, env={
            "_QCLUSTER_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": cword})
        assert done.stdout.split() == [expected], done.stdout


def test_start_takes_its_roles_from_config_unless_role_is_given(
    tmp_path: Path, db_url: str
) -> None:
    config_with_tables(tmp_path, db_url)
    worker_only = write_config(tmp_path, db_url, name="worker.toml", node={"roles": ["worker"]})

    def roles_of(node_id: str) -> list[str]:
        members = run_json("cluster", "status", "--json", config=worker_only)["members"]
        return next((m["roles"] for m in members if m["node_id"] == node_id), [])

    with NodeProcess(["start", "--node-id", "from-config"], config=worker_only,
                     log_path=tmp_path / "from-config.log") as node:
        wait_for(lambda: roles_of("from-config") != [], timeout=30, what="the member record")
        assert roles_of("from-config") == ["worker"], node.log_tail()
        node.terminate()
        assert node.wait() == 0, node.log_tail()
    with NodeProcess(["start", "--node-id", "from-flag", "--role", "all"], config=worker_only,
                     log_path=tmp_path / "from-flag.log") as node:
        wait_for(lambda: roles_of("from-flag") != [], timeout=30, what="the member record")
        assert sorted(roles_of("from-flag")) == ["scheduler", "worker"], node.log_tail()
        node.terminate()
        assert node.wait() == 0, node.log_tail()


def test_routing_from_flags_and_files_shows_in_json_and_reapplies_unchanged(
    config: Path, tmp_path: Path
) -> None:
    run_cli("jobs", "add", "routed", "--func", HELLO, "--every", "1m", "--tags", "gpu,eu",
            "--tags", "gpu", "--group", "etl", "--route", "consistent-hash", config=config)
    shown = run_json("jobs", "show", "routed", "--json", config=config)
    assert {k: shown[k] for k in ("tags", "group", "route", "group_worker")} == {
        "tags": ["eu", "gpu"], "group": "etl", "route": "consistent_hash",
        "group_worker": None}  # sorted, each once; placed when its first run is sent
    text = run_cli("jobs", "show", "routed", config=config).stdout
    assert "etl" in text and "consistent_hash" in text
    file = write_job_file(tmp_path / "routed.toml", [
        {"id": "filed-routed", "func": HELLO, "every": "1m", "tags": ["gpu"], "group": "etl",
         "route": "first"}])
    run_cli("jobs", "apply", str(file), config=config)
    again = run_json("jobs", "apply", str(file), "--json", config=config)
    assert (again["unchanged"], again["updated"]) == (1, 0)
    filed = run_json("jobs", "show", "filed-routed", "--json", config=config)
    assert (filed["tags"], filed["group"], filed["route"]) == (["gpu"], "etl", "first")
    status = run_json("cluster", "status", "--json", config=config)
    assert status["groups"] == []  # no run of the group has been sent


def test_job_policies_from_flags_and_files_show_in_json_and_reapply_unchanged(
    config: Path, tmp_path: Path
) -> None:
    run_cli("jobs", "add", "pol", "--func", HELLO, "--every", "1m", "--retries", "3",
            "--retry-backoff", "10s", "--retry-max-backoff", "5m", "--timeout", "30s",
            "--overlap", "buffer-one", "--misfire", "run-all", "--catch-up", "1h",
            "--start", "2026-01-01T00:00:00+01:00", "--end", "2030-01-01T00:00:00Z",
            "--max-runs", "100", "--jitter", "2s", config=config)
    shown = run_json("jobs", "show", "pol", "--json", config=config)
    assert {k: shown[k] for k in ("retries", "retry_backoff", "retry_max_backoff", "timeout",
                                  "overlap", "misfire", "catch_up", "start", "end",
                                  "max_runs", "jitter", "exclude", "runs_made")} == {
        "retries": 3, "retry_backoff": 10.0, "retry_max_backoff": 300.0, "timeout": 30.0,
        "overlap": "buffer-one", "misfire": "run-all", "catch_up": 3600.0,
        "start": "2025-12-31T23:00:00+00:00", "end": "2030-01-01T00:00:00+00:00",
        "max_runs": 100, "jitter": 2.0, "exclude": [], "runs_made": 0}
    text = run_cli("jobs", "show", "pol", config=config).stdout
    assert "buffer-one" in text and "30s" in text and "1h" in text
    file = write_job_file(tmp_path / "pol.toml", [
        {"id": "filed", "func": HELLO, "every": "1m", "retries": 2, "timeout": "1m30s",
         "overlap": "skip", "misfire": "skip"}])
    run_cli("jobs", "apply", str(file), config=config)
    again = run_json("jobs", "apply", str(file), "--json", config=config)
    assert (again["unchanged"], again["updated"]) == (1, 0)
    filed = run_json("jobs", "show", "filed", "--json", config=config)
    assert (filed["timeout"], filed["overlap"], filed["misfire"]) == (90.0, "skip", "skip")


def test_dependent_jobs_from_flags_and_files_show_their_parents_and_children(
    config: Path, tmp_path: Path
) -> None:
    run_cli("jobs", "add", "extract", "--func", HELLO, "--cron", "0 2 * * *", config=config)
    run_cli("jobs", "add", "load", "--func", HELLO, "--after", "extract", "--retries", "2",
            config=config)
    file = write_job_file(tmp_path / "chain.toml", [
        {"id": "report", "func": HELLO, "after": ["load", "extract:always"]},
        {"id": "alert", "func": HELLO, "after": ["load:failure"]}])
    run_cli("jobs", "apply", str(file), config=config)
    load = run_json("jobs", "show", "load", "--json", config=config)
    assert load["trigger_spec"]["parents"] == [{"job": "extract", "on": "success"}]
    assert (load["trigger"], load["next_run_time"], load["retries"]) == (
        "after extract", None, 2)
    assert load["children"] == ["alert", "report"]
    report = run_json("jobs", "show", "report", "--json", config=config)
    assert report["trigger"] == "after extract (always), load"
    assert "after extract (always), load" in run_cli("jobs", "list", config=config).stdout
    again = run_json("jobs", "apply", str(file), "--json", config=config)
    assert again["unchanged"] == 2
    result = run_cli("jobs", "remove", "load", config=config, check=False)
    assert_cli_error(result, "runs after 'load'")
    result = run_cli("jobs", "backfill", "load", "--from", "2026-01-01T00:00Z", "--to",
                     "2026-01-02T00:00Z", config=config, check=False)
    assert_cli_error(result, "runs after other jobs", "backfill its parents")
    run_cli("jobs", "run", "load", config=config)  # a child may be run by hand too
    (run,) = run_json("runs", "list", "--job", "load", "--json", config=config)
    assert run["parent_run"] is None
