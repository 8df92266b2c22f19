"""A backfill through a running leader's control API: real ``qcluster start`` processes
(one node, scheduler and worker), SQLite and PostgreSQL. The runs it records are sent at
once and succeed; a second backfill of the range writes nothing; and a backfill larger
than the worker's slots does not hold back the live schedule."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.cli.test_cli import config_with_tables
from tests.helpers import (
    TEST_SETTINGS,
    read_records,
    run_cli,
    run_json,
    runs_json,
    start_node,
    wait_for,
    wait_leading,
    write_config,
)

pytestmark = pytest.mark.cluster

RECORD = "jobs.examples:record_run"
WAIT = 60.0


def test_a_backfill_through_the_leader_runs_once_and_a_second_one_writes_nothing(
    tmp_path: Path, db_url: str
) -> None:
    config = config_with_tables(tmp_path, db_url)
    records = tmp_path / "hourly.jsonl"
    with start_node(config, node_id="n1", role="all", log_path=tmp_path / "n1.log") as node:
        wait_leading(config, node)
        run_json("jobs", "add", "hourly", "--func", RECORD, "--cron", "0 * * * *", "--tz",
                 "UTC", "--kwarg", f"path={records}", "--json", config=config)
        end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        args = ("jobs", "backfill", "hourly", "--from", (end - timedelta(hours=2)).isoformat(),
                "--to", end.isoformat(), "--json")
        first = run_json(*args, config=config)
        assert (first["via"], first["fire_times"], first["new"]) == ("leader n1", 3, 3)

        last = end.isoformat().replace("+00:00", "Z")

        def backfilled() -> list[dict[str, object]]:
            # Not the live fire of the next hour, if the clock passes it during the test.
            return [r for r in runs_json(config, job="hourly")
                    if str(r["scheduled_at"]) <= last]

        def succeeded() -> list[dict[str, object]] | None:
            runs = backfilled()
            return runs if len(runs) == 3 and all(
                r["status"] == "succeeded" for r in runs) else None

        runs = wait_for(succeeded, WAIT, interval=0.5, what="3 backfilled runs to succeed",
                        details=node.log_tail)
        assert runs is not None
        assert sorted(r["scheduled_at"] for r in runs) == [
            (end - timedelta(hours=h)).isoformat().replace("+00:00", "Z") for h in (2, 1, 0)]
        second = run_json(*args, config=config)
        assert (second["via"], second["new"], second["already"]) == ("leader n1", 0, 3)
        assert len(backfilled()) == 3
        assert sorted(r["run_id"] for r in read_records(records)
                      if float(r["scheduled_at"]) <= end.timestamp()) == sorted(
            r["run_id"] for r in runs)


def test_a_backfill_larger_than_the_slots_does_not_hold_back_the_live_schedule(
    tmp_path: Path, pg_url: str
) -> None:
    """80 backfilled runs of 0.4 s on a worker of 2 slots (16 s of work) while a job fires
    every second with a misfire grace of 3 s: the backfill goes into free slots only,
    after the live runs, so no live fire waits behind it (sent in arrival order, they
    waited up to 16 s and were recorded missed); and every backfilled run succeeds."""
    config = write_config(tmp_path, pg_url,
                          worker={**TEST_SETTINGS["worker"], "concurrency": 2})
    run_cli("db", "upgrade", config=config)
    with start_node(config, node_id="n1", role="all", log_path=tmp_path / "n1.log") as node:
        wait_leading(config, node)
        run_cli("jobs", "add", "tick", "--func", "jobs.builtin:noop", "--every", "1s",
                "--misfire-grace", "3", config=config)
        run_cli("jobs", "add", "old", "--func", "jobs.builtin:sleep", "--kwarg",
                "seconds=0.4", "--cron", "* * * * *", "--tz", "UTC", config=config)
        end = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=1)
        made = run_json("jobs", "backfill", "old", "--from",
                        (end - timedelta(minutes=79)).isoformat(), "--to", end.isoformat(),
                        "--json", config=config)
        assert made["new"] == 80

        def backfilled() -> list[dict[str, object]] | None:
            runs = runs_json(config, job="old")
            done = len(runs) >= 80 and all(r["status"] == "succeeded" for r in runs)
            return runs if done else None

        wait_for(backfilled, 120, interval=1.0, what="80 backfilled runs to succeed",
                 details=node.log_tail)
        ticks = runs_json(config, job="tick")
        assert len(ticks) >= 10
        assert [t for t in ticks if t["status"] not in ("succeeded", "scheduled",
                                                          "dispatched", "running")] == []
