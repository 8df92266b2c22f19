"""``qcluster jobs backfill`` as real subprocesses, on SQLite and on PostgreSQL. No node
runs, so the runs are written "via database"; a running leader's backfill is in
``tests/cluster/test_backfill_process.py``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.cli.test_calendars import rows
from tests.cli.test_cli import config_with_tables
from tests.helpers import assert_cli_error, run_cli, run_cli_many, run_json, runs_json

HELLO = "jobs.examples:hello"


@pytest.fixture
def config(tmp_path: Path, db_url: str) -> Path:
    return config_with_tables(tmp_path, db_url)


def last_hour() -> datetime:
    return datetime.now(UTC).replace(minute=0, second=0, microsecond=0)


def test_a_second_backfill_of_the_same_range_writes_nothing_and_says_so(
    config: Path, db_url: str
) -> None:
    run_cli("jobs", "add", "hourly", "--func", HELLO, "--cron", "0 * * * *", "--tz", "UTC",
            "--timeout", "30s", "--retries", "1", config=config)
    end = last_hour()
    args = ("jobs", "backfill", "hourly", "--from", (end - timedelta(hours=23)).isoformat(),
            "--to", end.isoformat())
    first = run_cli(*args, config=config).stdout.strip()
    assert first.startswith("job hourly: 24 new runs, 0 already recorded, of 24 fire times")
    assert "(via database); no leader is running, they run when one is" in first
    before = rows(db_url)
    again = run_json(*args, "--json", config=config)
    assert (again["fire_times"], again["new"], again["already"], again["via"]) == (
        24, 0, 24, "database")
    assert "0 new runs, 24 already recorded" in run_cli(*args, config=config).stdout
    assert rows(db_url) == before
    runs = runs_json(config, job="hourly")
    assert len(runs) == 24 and {r["status"] for r in runs} == {"scheduled"}
    assert {(r["timeout"], r["retries_left"]) for r in runs} == {(30.0, 1)}


def test_backfill_records_excluded_dates_skipped(config: Path) -> None:
    end = last_hour()
    run_cli("calendars", "add", "today", "--dates", end.date().isoformat(), config=config)
    run_cli("jobs", "add", "hourly", "--func", HELLO, "--cron", "0 * * * *", "--tz", "UTC",
            "--exclude", "today", config=config)
    done = run_json("jobs", "backfill", "hourly", "--from",
                    (end - timedelta(hours=47)).isoformat(), "--to", end.isoformat(),
                    "--json", config=config)
    today = end.hour + 1  # the fire times of today, 00:00 to the last hour
    assert (done["fire_times"], done["new"], done["skipped"]) == (48, 48 - today, today)
    skipped = runs_json(config, job="hourly", status="skipped")
    assert {r["error"] for r in skipped} == {"excluded by calendar today"}


def test_bad_backfill_input_is_one_line_and_writes_nothing(config: Path, db_url: str) -> None:
    run_cli("jobs", "add", "hourly", "--func", HELLO, "--cron", "0 * * * *", config=config)
    run_cli("jobs", "add", "minutely", "--func", HELLO, "--cron", "* * * * *", config=config)
    run_cli("jobs", "add", "weekdays", "--func", HELLO, "--cron", "0 9 * * 1-5",
            config=config)
    run_cli("jobs", "add", "secondly", "--func", HELLO, "--cron", "* * * * * *",
            config=config)
    now = datetime.now(UTC)
    past = (now - timedelta(days=1)).isoformat()
    before = rows(db_url)
    cases = [
        (("hourly", "--from", past, "--to", (now + timedelta(hours=1)).isoformat()),
         ("is later than now", "live schedule")),
        (("hourly", "--from", now.isoformat(), "--to", past), ("is after --to",)),
        (("hourly", "--from", "yesterday", "--to", past), ("--from: invalid date 'yesterday'",)),
        (("hourly", "--from", past, "--to", "2026-02-30T00:00Z"), ("--to: invalid date",)),
        (("hourly", "--from", "", "--to", past), ("--from: invalid date",)),
        (("hourly", "--from", "x" * 200, "--to", past), ("--from must be an ISO 8601 time",)),
        (("secondly", "--from", (now - timedelta(days=2)).isoformat(), "--to", past),
         ("more than 10,000 fire times", "about 8")),
        # older than [runs] retention_days: pruned, the same backfill would run it again
        (("weekdays", "--from", "1960-01-01", "--to", past),
         ("--from 1960-01-01", "is older than the runs kept ([runs] retention_days = 7)",
          "run those fire times again")),
        (("minutely", "--from", (now - timedelta(days=8)).isoformat(), "--to", past),
         ("is older than the runs kept",)),
        (("nope", "--from", past, "--to", past), ("no job 'nope'",)),
        (("bad id!", "--from", past, "--to", past), ("invalid job id",)),
        (("hourly", "--from", past), ("--to",)),
    ]
    results = run_cli_many([("jobs", "backfill", *args) for args, _ in cases], config=config,
                           check=False)
    for (_args, fragments), result in zip(cases, results, strict=True):
        assert_cli_error(result, *fragments)
    assert rows(db_url) == before
