"""``Client.backfill`` on SQLite and on PostgreSQL (no node runs: "via database")."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from qcluster import Client
from qcluster.errors import InputError, JobNotFound
from tests.cli.test_cli import config_with_tables

HELLO = "jobs.examples:hello"


def test_backfill_from_python_takes_datetimes_and_is_idempotent(tmp_path: Path,
                                                               db_url: str) -> None:
    client = Client(config_with_tables(tmp_path, db_url))
    client.add("daily", HELLO, cron="0 9 * * *", tz="Europe/Paris", recover=True)
    today = datetime.now(UTC).date()
    # naive (Paris), and inside the 7 days of runs kept
    start = datetime(today.year, today.month, today.day) - timedelta(days=5)
    end = datetime.now(UTC) - timedelta(days=1)
    done = client.backfill("daily", start, end)
    assert (done.new, done.skipped, done.already, done.via) == (done.fire_times, 0, 0,
                                                                "database")
    assert 4 <= done.fire_times <= 5
    again = client.backfill("daily", start.isoformat(), end)
    assert (again.new, again.already) == (0, done.fire_times)
    assert len(client.runs(job="daily", limit=0)) == done.fire_times
    with pytest.raises(InputError, match="--from must be an ISO 8601 time"):
        client.backfill("daily", 5, end)  # type: ignore[arg-type]
    with pytest.raises(JobNotFound):
        client.backfill("nope", start, end)
