"""Calendars from Python (``qcluster.Client``), on SQLite and on PostgreSQL; no node runs,
so every change goes "via database"."""

from __future__ import annotations

from datetime import date, datetime
from pathlib import Path

import pytest

from qcluster import Client
from qcluster.errors import InputError
from tests.cli.test_cli import config_with_tables

HELLO = "jobs.examples:hello"


@pytest.fixture
def client(tmp_path: Path, db_url: str) -> Client:
    return Client(config_with_tables(tmp_path, db_url))


def test_every_calendar_operation_from_python(client: Client, tmp_path: Path) -> None:
    file = tmp_path / "more.txt"
    file.write_text("2027-01-02\n")
    done = client.add_calendar("xmas", [date(2026, 12, 25), (date(2026, 12, 24),
                                                             date(2026, 12, 26)), "2026-12-31"],
                               file=file)
    assert (done.name, done.status, done.via) == ("xmas", "created", "database")
    assert client.calendar("xmas")["dates"] == ["2026-12-24..2026-12-26", "2026-12-31",
                                                "2027-01-02"]
    assert client.add("j", HELLO, every="1m", exclude=["xmas"]).status == "added"
    assert client.calendar("xmas")["jobs"] == ["j"]
    assert [(c["name"], c["jobs"]) for c in client.calendars()] == [("xmas", 1)]
    with pytest.raises(InputError, match="excluded by 1 jobs"):
        client.remove_calendar("xmas")
    assert client.add_calendar("xmas", ["2026-12-25"], replace=True).status == "replaced"
    client.remove("j")
    assert client.remove_calendar("xmas").status == "removed"
    assert client.calendars() == []


def test_python_callers_get_the_same_refusals(client: Client) -> None:
    with pytest.raises(InputError, match="job 'j' excludes calendar 'nope'"):
        client.add("j", HELLO, every="1m", exclude=["nope"])
    with pytest.raises(InputError, match="excludes calendar 'nope'"):
        client.apply([client.job("j", HELLO, every="1m", exclude="nope")])
    with pytest.raises(InputError, match="dates must be a list"):
        client.add_calendar("x", "2026-01-01")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="not datetime"):
        client.add_calendar("x", [datetime(2026, 1, 1)])
    with pytest.raises(InputError, match="not int"):
        client.add_calendar("x", [20260101])
    for dates in (["2026-12-25,,2027-01-01"], ["2026-12-25", " "], ["2026-12-25,"]):
        with pytest.raises(InputError, match="empty item"):
            client.add_calendar("x", dates)
    with pytest.raises(InputError, match="invalid calendar name"):
        client.add_calendar(None, ["2026-01-01"])  # type: ignore[arg-type]
    with pytest.raises(InputError, match="no calendar 'x'"):
        client.calendar("x")
    assert client.list() == [] and client.calendars() == []
