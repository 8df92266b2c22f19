"""Backfill through the leader's control object (in-process, SQLite and PostgreSQL): the
runs are written fenced on the leader's epoch and sent only after the commit; a refusal
writes and sends nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from qcluster.leader.control import ControlService
from qcluster.store.db import Database
from qcluster.store.records import RunRecord
from tests.leader.test_control_calendars import job, leading, snapshot


@pytest.fixture
def sent() -> list[RunRecord]:
    return []


@pytest.fixture
def control(db: Database, sent: list[RunRecord]) -> ControlService:
    role = leading(db)

    def send(runs: list[RunRecord], *, bulk: bool = False) -> None:
        assert bulk, "a backfill's runs go to the bulk lane, after the live ones"
        sent.extend(runs)

    role.send = send  # type: ignore[method-assign]
    return ControlService(db, role, ["jobs.*"], "s1")


def hours(n: int) -> tuple[str, str]:
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    return (end - timedelta(hours=n - 1)).isoformat(), end.isoformat()


def test_the_leader_sends_the_new_runs_once_committed_and_nothing_the_second_time(
    control: ControlService, db: Database, sent: list[RunRecord]
) -> None:
    hourly = {**job("hourly"), "trigger": {"type": "cron", "expr": "0 * * * *", "tz": "UTC"}}
    assert control.add_jobs([hourly], False)["ok"]
    start, end = hours(5)
    reply = control.backfill_job("hourly", start, end)
    assert reply["ok"], reply
    assert (reply["result"]["new"], reply["result"]["already"]) == (5, 0)
    assert len(sent) == 5 and {r["epoch"] for r in sent} == {leading(db).epoch}
    _jobs_before, runs_before = snapshot(db)[1:]
    again = control.backfill_job("hourly", start, end)
    assert (again["result"]["new"], again["result"]["already"]) == (0, 5)
    assert len(sent) == 5 and snapshot(db)[2] == runs_before


@pytest.mark.parametrize("args", [
    ("nope", "2026-01-01T00:00Z", "2026-01-02T00:00Z"),
    (10**5000, "2026-01-01T00:00Z", "2026-01-02T00:00Z"),
    ("hourly", 5, "2026-01-02T00:00Z"),
    ("hourly", "2026-01-01T00:00Z", None),
    ("hourly", "2026-01-01T00:00Z", "2999-01-01T00:00Z"),
    ("hourly", "2026-01-02T00:00Z", "2026-01-01T00:00Z"),
    ("hourly", "2020-01-01T00:00Z", "2026-01-01T00:00Z"),
], ids=["no-job", "huge-id", "int-start", "none-end", "future", "reversed", "too-many"])
def test_a_refused_backfill_answers_input_and_writes_and_sends_nothing(
    control: ControlService, db: Database, sent: list[RunRecord], args: tuple[Any, ...]
) -> None:
    hourly = {**job("hourly"), "trigger": {"type": "cron", "expr": "0 * * * *", "tz": "UTC"}}
    assert control.add_jobs([hourly], False)["ok"]
    before = snapshot(db)
    reply = control.backfill_job(*args)
    assert reply["ok"] is False and reply["kind"] in ("input", "not_found"), reply
    assert snapshot(db) == before and sent == []


def test_a_backfill_older_than_the_run_retention_is_refused_by_the_leader(
    control: ControlService, db: Database, sent: list[RunRecord]
) -> None:
    """Issue 15's attack: pruning deleted a backfill's runs, and the same backfill then
    ran every fire time again. The leader refuses a ``--from`` older than the runs kept;
    one inside them is taken."""
    hourly = {**job("hourly"), "trigger": {"type": "cron", "expr": "0 * * * *", "tz": "UTC"}}
    assert control.add_jobs([hourly], False)["ok"]
    start, end = hours(8 * 24)  # the default retention is 7 days
    before = snapshot(db)
    reply = control.backfill_job("hourly", start, end)
    assert reply["ok"] is False and reply["kind"] == "input"
    assert "is older than the runs kept ([runs] retention_days = 7)" in reply["error"]
    assert snapshot(db) == before and sent == []
    assert control.backfill_job("hourly", *hours(6 * 24))["ok"]
