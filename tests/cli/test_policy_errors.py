"""The errors of a bad job: each names the job once (``jobs apply`` said "job 'x': job
'x': ..."). SQLite only: the messages do not depend on the database, and every case
writes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.cli.test_calendars import rows
from tests.cli.test_cli import config_with_tables
from tests.helpers import assert_cli_error, run_cli_many, write_job_file

HELLO = "jobs.examples:hello"


@pytest.fixture
def config(tmp_path: Path, sqlite_url: str) -> Path:
    return config_with_tables(tmp_path, sqlite_url)


#: One ``[[job]]`` table of job "x" per error path of ``jobs apply``, and a fragment of
#: its error.
APPLY_CASES: list[tuple[dict[str, Any], str]] = [
    ({"every": "1h", "retries": 500}, "retries must be a whole number from 0 to 100"),
    ({"every": "1h", "timeout": "0"}, "timeout"),
    ({"every": "1h", "overlap": "forbid"}, "overlap must be one of"),
    ({"every": "1h", "start": "soon"}, "start: cannot read 'soon'"),
    ({"cron": "nope"}, "invalid cron expression 'nope'"),
    ({"cron": "0 0 30 2 *"}, "it never fires"),
    ({"every": "1ms"}, "below the minimum interval"),
    ({"at": "2026-13-01"}, "invalid date"),
    ({"every": "1h", "exclude": ["nocal"]}, "excludes calendar 'nocal', which does not exist"),
    ({"every": "1h", "exclude": ["bad name"]}, "invalid calendar name"),
    ({"every": "1h", "func": "os:system"}, "is not allowed by [jobs] allow"),
    ({"every": "1h", "func": "jobs.nope:run"}, "cannot import 'jobs.nope'"),
    ({"every": "1h", "args": 3}, "job args must be a list"),
    ({"every": "1h", "misfire_grace_seconds": 0}, "misfire_grace_seconds must be a whole"),
    ({"every": "1h", "max_attempts": "three"}, "max_attempts must be a whole number"),
    ({"every": "1h", "coalesce": True, "misfire": "skip"}, "contradicts"),
    ({"every": "1h", "wrong": 1}, "unknown field 'wrong'"),
]


def test_every_jobs_apply_error_names_the_job_once(
    config: Path, tmp_path: Path, sqlite_url: str
) -> None:
    files = [write_job_file(tmp_path / f"x{n}.toml", [{"id": "x", "func": HELLO, **fields}])
             for n, (fields, _) in enumerate(APPLY_CASES)]
    before = rows(sqlite_url)
    results = run_cli_many([("jobs", "apply", str(f)) for f in files], config=config,
                           check=False)
    for (fields, fragment), result in zip(APPLY_CASES, results, strict=True):
        line = assert_cli_error(result, fragment)
        assert line.count("job 'x'") == 1, (fields, line)
    assert rows(sqlite_url) == before
