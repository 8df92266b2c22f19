"""The errors of a bad job, whichever way it comes: each names the job once (``jobs
apply`` said "job 'x': job 'x': ..."), and each policy's bad values get one message, the
same from ``jobs add`` flags, a ``jobs apply`` file and ``Client.add`` (``timeout`` said
"between 1ms and 3650d" for 0 and "at least 10ms" for 5ms). SQLite only: the messages
do not depend on the database, and every case writes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from qcluster import Client
from qcluster.errors import InputError
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
    ({"every": "1h", "timeout": "0"}, "timeout must be a duration from 10ms"),
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
    ({"at": "2020-01-01T00:00:00"}, "is older than the runs kept ([runs] retention_days = 7)"),
    ({"at": "2099-01-01T00:00:00", "start": "2099-02-01T00:00:00Z"},
     "start and end bound a repeating schedule"),
    ({"at": "2099-01-01T00:00:00", "end": "2098-01-01T00:00:00Z"},
     "a job with a date (--at) fires once"),
]


def test_every_jobs_apply_error_names_the_job_once_and_the_file(
    config: Path, tmp_path: Path, sqlite_url: str
) -> None:
    files = [write_job_file(tmp_path / f"x{n}.toml", [{"id": "x", "func": HELLO, **fields}])
             for n, (fields, _) in enumerate(APPLY_CASES)]
    before = rows(sqlite_url)
    results = run_cli_many([("jobs", "apply", str(f)) for f in files], config=config,
                           check=False)
    for (fields, fragment), result, f in zip(APPLY_CASES, results, files, strict=True):
        line = assert_cli_error(result, fragment)
        assert line.count("job 'x'") == 1, (fields, line)
        assert f"{f}: " in line, (fields, line)  # and the file, whoever refused it
    assert rows(sqlite_url) == before


#: (flag, field, value as a flag gives it, value as a file or Python gives it)
POLICY_CASES: list[tuple[str, str, str, object]] = [
    ("--timeout", "timeout", "0", 0),
    ("--timeout", "timeout", "-1", "-1"),
    ("--timeout", "timeout", "5ms", "5ms"),
    ("--timeout", "timeout", "99999d", "99999d"),
    ("--timeout", "timeout", "soon", "soon"),
    ("--retries", "retries", "101", 101),
    ("--retries", "retries", "-1", -1),
    ("--retries", "retries", "abc", "abc"),
    ("--max-runs", "max_runs", "0", 0),
    ("--retry-backoff", "retry_backoff", "0", "0"),
    ("--catch-up", "catch_up", "-5s", "-5s"),
    ("--jitter", "jitter", "2d", "2d"),
]


def test_each_policy_error_is_worded_the_same_from_flags_files_and_python(
    config: Path, tmp_path: Path, sqlite_url: str
) -> None:
    files = [write_job_file(tmp_path / f"p{n}.toml",
                            [{"id": "a", "func": HELLO, "every": "1h", field: value}])
             for n, (_, field, _, value) in enumerate(POLICY_CASES)]
    before = rows(sqlite_url)
    commands: list[tuple[str, ...]] = []
    for (flag, _, text, _), file in zip(POLICY_CASES, files, strict=True):
        commands += [("jobs", "add", "a", "--func", HELLO, "--every", "1h", flag, text),
                     ("jobs", "apply", str(file))]
    results = run_cli_many(commands, config=config, check=False)
    client = Client(config)
    for n, (_, field, _, value) in enumerate(POLICY_CASES):
        added = assert_cli_error(results[2 * n], field)
        applied = assert_cli_error(results[2 * n + 1], field)
        with pytest.raises(InputError) as python:
            client.add("a", HELLO, every="1h", **{field: value})
        assert added.removeprefix("error: job 'a': ") \
            == applied.removeprefix(f"error: {files[n]}: job 'a': ") \
            == str(python.value).removeprefix("job 'a': "), (added, applied, python.value)
        assert str(python.value).startswith(f"job 'a': {field} must be a ")
    assert rows(sqlite_url) == before
