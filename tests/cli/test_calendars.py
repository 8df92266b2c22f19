"""``qcluster calendars`` and a job's ``--exclude``, as real subprocesses, on SQLite and
on PostgreSQL. No node runs, so every change goes "via database"; what goes through a
leader's control API is in ``tests/leader/test_control_calendars.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.cli.test_cli import config_with_tables
from tests.helpers import (
    assert_cli_error,
    jobs_json,
    run_cli,
    run_cli_many,
    run_json,
    write_job_file,
)

HELLO = "jobs.examples:hello"


@pytest.fixture
def config(tmp_path: Path, db_url: str) -> Path:
    return config_with_tables(tmp_path, db_url)


def rows(db_url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the tables a calendar or job change could write."""
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return {t: [tuple(r) for r in conn.execute(sa.text(f"SELECT * FROM {t} ORDER BY 1"))]
                    for t in ("qc_calendars", "qc_jobs", "qc_runs", "qc_cluster")}
    finally:
        engine.dispose()


def test_calendars_add_list_show_replace_and_remove(config: Path, tmp_path: Path) -> None:
    file = tmp_path / "holidays.txt"
    file.write_text("# public holidays\n2027-05-01\n\n2027-05-08 # VE day\n"
                    "2027-07-13..2027-07-14\n")
    added, from_file = run_cli_many([
        ("calendars", "add", "xmas", "--dates", "2026-12-25,2027-01-01",
         "--dates", "2026-12-24..2026-12-26", "--json"),
        ("calendars", "add", "fr", "--file", str(file)),
    ], config=config)
    assert added.stdout.count('"created"') == 1 and '"via": "database"' in added.stdout
    assert from_file.stdout.strip() == "created calendar fr (via database)"

    listed = run_json("calendars", "list", "--json", config=config)
    assert [(c["name"], c["ranges"], c["days"], c["jobs"]) for c in listed] == [
        ("fr", 3, 4, 0), ("xmas", 2, 4, 0)]
    xmas = run_json("calendars", "show", "xmas", "--json", config=config)
    assert xmas["dates"] == ["2026-12-24..2026-12-26", "2027-01-01"]  # merged, sorted
    assert xmas["jobs"] == []

    run_cli("jobs", "add", "report", "--func", HELLO, "--cron", "0 9 * * *",
            "--exclude", "xmas,fr", config=config)
    shown = run_cli("calendars", "show", "xmas", config=config).stdout
    assert "2026-12-24..2026-12-26" in shown and "excluded by 1 job: report" in shown
    assert run_json("jobs", "show", "report", "--json", config=config)["exclude"] == [
        "xmas", "fr"]

    refused = run_cli("calendars", "remove", "xmas", config=config, check=False)
    assert_cli_error(refused, "calendar 'xmas'", "'report'")
    assert_cli_error(run_cli("calendars", "add", "xmas", "--dates", "2026-01-01",
                             config=config, check=False), "exists", "--replace")
    replaced = run_json("calendars", "add", "xmas", "--dates", "2026-12-25", "--replace",
                        "--json", config=config)
    assert replaced["status"] == "replaced"
    again = run_json("calendars", "add", "xmas", "--dates", "2026-12-25", "--replace",
                     "--json", config=config)
    assert again["status"] == "unchanged"
    assert run_json("calendars", "show", "xmas", "--json", config=config)["version"] == 2

    run_cli("jobs", "remove", "report", config=config)
    removed = run_cli("calendars", "remove", "xmas", config=config)
    assert removed.stdout.strip() == "removed calendar xmas (via database)"
    assert [c["name"] for c in run_json("calendars", "list", "--json", config=config)] == ["fr"]


def test_a_job_naming_a_calendar_that_does_not_exist_is_refused_and_nothing_written(
    config: Path, tmp_path: Path, db_url: str
) -> None:
    run_cli("calendars", "add", "xmas", "--dates", "2026-12-25", config=config)
    before = rows(db_url)
    jobs = write_job_file(tmp_path / "jobs.toml", [
        {"id": "fine", "func": HELLO, "every": "1m", "exclude": ["xmas"]},
        {"id": "wrong", "func": HELLO, "every": "1m", "exclude": ["xmas", "nope"]},
    ])
    add, apply = run_cli_many([
        ("jobs", "add", "a", "--func", HELLO, "--every", "1m", "--exclude", "nope"),
        ("jobs", "apply", str(jobs)),
    ], config=config, check=False)
    assert_cli_error(add, "job 'a' excludes calendar 'nope', which does not exist")
    assert_cli_error(apply, "job 'wrong' excludes calendar 'nope'")
    assert rows(db_url) == before  # not even the job of the file that was right
    assert jobs_json(config) == []


_HUGE = "2026-01-01\n" * 200_000  # 2.2 MB: past the 1 MiB bound


@pytest.mark.parametrize(("args", "file_text", "fragments"), [
    (("--dates", "2026-13-01"), None, ("cannot read calendar date '2026-13-01'",)),
    (("--dates", "2026-02-30"), None, ("'2026-02-30'",)),
    (("--dates", "tomorrow"), None, ("'tomorrow'", "YYYY-MM-DD")),
    (("--dates", "2026-12-26..2026-12-24"), None, ("ends before it begins",)),
    (("--dates", "2026-12-24...2026-12-26"), None, ("cannot read calendar date",)),
    (("--dates", "2026-12-24..2026-12-26..2026-12-28"), None, ("cannot read",)),
    (("--dates", "1900-01-01"), None, ("out of range",)),
    (("--dates", ","), None, ("calendar dates ','", "empty item")),
    (("--dates", "2026-12-25,,2027-01-01"), None, ("'2026-12-25,,2027-01-01'", "empty item")),
    (("--dates", "2026-12-25, ,2027-01-01"), None, ("empty item",)),
    (("--dates", "2026-12-25,"), None, ("'2026-12-25,'", "empty item")),
    (("--dates", "2026-12-25", "--dates", "  "), None, ("calendar dates '  '", "empty item")),
    ((), None, ("at least one date",)),
    (("--file", "{file}"), "2026-01-01\n2026-01-0x # typo\n", ("line 2", "2026-01-0x")),
    (("--file", "{file}"), "# only a comment\n\n", ("no dates",)),
    (("--file", "{file}"), _HUGE, ("larger than 1048576 bytes",)),
    (("--file", "{file}"), b"\xff\xfe2026-01-01\n", ("not UTF-8",)),
    (("--file", "{missing}"), None, ("No such file",)),
    (("--file", "{dir}"), None, ("cannot read calendar file",)),
], ids=["month-13", "feb-30", "word", "reversed", "three-dots", "two-ranges", "too-early",
        "only-a-comma", "empty-item", "blank-item", "trailing-comma", "blank-flag",
        "no-dates", "file-bad-line", "file-empty", "file-huge",
        "file-not-utf8", "file-missing", "file-is-a-dir"])
def test_bad_calendar_input_is_one_line_and_writes_nothing(
    config: Path, tmp_path: Path, db_url: str, args: tuple[str, ...],
    file_text: str | bytes | None, fragments: tuple[str, ...],
) -> None:
    file = tmp_path / "dates.txt"
    if isinstance(file_text, bytes):
        file.write_bytes(file_text)
    elif file_text is not None:
        file.write_text(file_text)
    where = {"file": str(file), "missing": str(tmp_path / "nope.txt"), "dir": str(tmp_path)}
    before = rows(db_url)
    result = run_cli("calendars", "add", "cal", *(a.format(**where) for a in args),
                     config=config, check=False)
    assert_cli_error(result, *fragments)
    assert rows(db_url) == before


def test_bad_names_and_missing_calendars_are_one_line_errors(config: Path, db_url: str) -> None:
    before = rows(db_url)
    results = run_cli_many([
        ("calendars", "add", "bad name", "--dates", "2026-01-01"),
        ("calendars", "add", "-x", "--dates", "2026-01-01"),
        ("calendars", "add", "x" * 101, "--dates", "2026-01-01"),
        ("calendars", "show", "nope"),
        ("calendars", "remove", "nope"),
        ("calendars", "show", "bad/name"),
        ("jobs", "add", "j", "--func", HELLO, "--every", "1m", "--exclude", "bad name"),
    ], config=config, check=False)
    assert_cli_error(results[0], "invalid calendar name 'bad name'")
    assert results[1].returncode != 0 and "Traceback" not in results[1].stderr
    assert_cli_error(results[2], "invalid calendar name")
    assert_cli_error(results[3], "no calendar 'nope'")
    assert_cli_error(results[4], "no calendar 'nope'")
    assert_cli_error(results[5], "invalid calendar name")
    assert_cli_error(results[6], "invalid calendar name 'bad name'")
    assert rows(db_url) == before
