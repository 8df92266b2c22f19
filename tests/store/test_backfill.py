"""Backfill in the store (``store/backfill.py``), on SQLite and on PostgreSQL: each fire
time of the range recorded once, whoever recorded it first; excluded dates ``skipped``;
every refusal writes nothing."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from qcluster.definitions.jobdefs import JobDef
from qcluster.definitions.policy import Defaults, Policy
from qcluster.definitions.triggers import make_spec
from qcluster.errors import Fenced, InputError, JobNotFound
from qcluster.store import backfill, calendars, catalog, schema
from qcluster.store.cluster import read_cluster
from qcluster.store.db import Database
from qcluster.store.runs import FireRow, RunStatus, insert_runs

NOON = datetime(2026, 11, 2, 12, tzinfo=UTC).timestamp()  # "now" in these tests


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def epoch_of(db: Database) -> int:
    state = read_cluster(db)
    assert state is not None
    return state.epoch


def add(db: Database, job_id: str, *, cron: str = "0 * * * *", tz: str = "UTC",
        **kw: Any) -> None:
    jd = JobDef(job_id, "jobs.builtin:noop", make_spec(cron=cron, tz=tz), **kw)
    with db.fenced(epoch_of(db)) as conn:
        catalog.upsert_jobs(conn, [jd], replace=False)


def run(db: Database, job_id: str, start: str, end: str, **kw: Any
        ) -> tuple[list[Any], backfill.Counts]:
    with db.fenced(epoch_of(db)) as conn:
        return backfill.backfill(conn, job_id, start, end, epoch_of(db), "s1", now=NOON, **kw)


def rows(db: Database, job_id: str | None = None) -> list[Any]:
    r = schema.runs
    query = sa.select(r).order_by(r.c.scheduled_at)
    if job_id is not None:
        query = query.where(r.c.job_id == job_id)
    with db.read() as conn:
        return list(conn.execute(query))


def test_a_backfill_runs_each_fire_time_once_and_a_second_one_writes_nothing(
    db: Database,
) -> None:
    add(db, "hourly", recover=True, max_attempts=3,
        policy=Policy(retries=2, timeout=30.0, overlap="skip", max_runs=1))
    runs, counts = run(db, "hourly", "2026-11-01T00:00Z", "2026-11-01T23:00Z",
                       defaults=Defaults(retries=0, retry_backoff=5.0, retry_max_backoff=60.0))
    assert (counts.fire_times, counts.new, counts.skipped, counts.already) == (24, 24, 0, 0)
    assert (counts.start, counts.end) == ("2026-11-01T00:00:00Z", "2026-11-01T23:00:00Z")
    stored = rows(db, "hourly")
    assert [r.scheduled_at for r in stored] == [ts("2026-11-01T00:00Z") + 3600 * h
                                                for h in range(24)]
    assert sorted(r["run_id"] for r in runs) == sorted(r.id for r in stored)
    for r in stored:  # the job's policy and bounds, started now, not at the fire time
        assert (r.status, r.due_at, r.timeout, r.retries_left, r.retry_backoff) == (
            "scheduled", NOON, 30.0, 2, 5.0)
        assert (r.recover, r.max_attempts, r.epoch, r.leader) == (True, 3, epoch_of(db), "s1")

    again, counts = run(db, "hourly", "2026-11-01T00:00Z", "2026-11-01T23:00Z")
    assert again == [] and (counts.new, counts.already) == (0, 24)
    assert rows(db, "hourly") == stored

    # A wider range adds only the fire times that have no run yet.
    more, counts = run(db, "hourly", "2026-10-31T22:00Z", "2026-11-01T01:30Z")
    assert (counts.fire_times, counts.new, counts.already) == (4, 2, 2)
    assert len(more) == 2 and len(rows(db, "hourly")) == 26


def test_a_fire_time_the_live_schedule_recorded_gets_no_second_run(db: Database) -> None:
    add(db, "hourly")
    at = ts("2026-11-01T05:00Z")
    with db.fenced(epoch_of(db)) as conn:
        insert_runs(conn, [FireRow("hourly", "jobs.builtin:noop", "[]", "{}", at,
                                   RunStatus.MISSED, False, "missed")], epoch_of(db), "s1")
    _runs, counts = run(db, "hourly", "2026-11-01T04:00Z", "2026-11-01T06:00Z")
    assert (counts.new, counts.already) == (2, 1)
    assert [r.status for r in rows(db, "hourly")] == ["scheduled", "missed", "scheduled"]


def test_fire_times_on_an_excluded_local_date_are_recorded_skipped_naming_it(
    db: Database,
) -> None:
    with db.fenced(epoch_of(db)) as conn:
        calendars.put_calendar(conn, "hol", calendars.parse_dates(["2026-11-02"]),
                               replace=False)
    # 00:30 in Paris on 2 November is 23:30 UTC on 1 November: the job's date counts.
    add(db, "paris", cron="30 0 * * *", tz="Europe/Paris", policy=Policy(exclude=("hol",)))
    runs, counts = run(db, "paris", "2026-10-31T00:00", "2026-11-02T11:00")
    assert (counts.fire_times, counts.new, counts.skipped, counts.already) == (3, 2, 1, 0)
    stored = rows(db, "paris")
    assert [(r.scheduled_at, r.status, r.error) for r in stored] == [
        (ts("2026-10-30T23:30Z"), "scheduled", None),
        (ts("2026-10-31T23:30Z"), "scheduled", None),
        (ts("2026-11-01T23:30Z"), "skipped", "excluded by calendar hol"),
    ]
    assert stored[2].finished_at is not None and len(runs) == 2
    _again, counts = run(db, "paris", "2026-10-31T00:00", "2026-11-02T11:00")
    assert (counts.new, counts.skipped, counts.already) == (0, 0, 3)


def test_the_jobs_own_start_and_end_bound_the_range(db: Database) -> None:
    add(db, "bounded", policy=Policy(start="2026-11-01T10:00:00+00:00",
                                     end="2026-11-01T12:00:00+00:00"))
    _runs, counts = run(db, "bounded", "2026-11-01T00:00Z", "2026-11-02T00:00Z")
    assert counts.fire_times == 3


@pytest.mark.parametrize(("start", "end", "message"), [
    ("2026-11-02T11:00Z", "2026-11-02T13:00Z", "--to 2026-11-02T13:00:00Z is later than now"),
    ("2026-11-02T11:00Z", "2026-11-02T10:00Z", "--from 2026-11-02T11:00:00Z is after --to"),
    ("yesterday", "2026-11-02T10:00Z", "--from: invalid date 'yesterday'"),
    ("2026-11-01T00:00Z", "2026-13-01", "--to: invalid date"),
    ("2026-03-29T02:30", "2026-11-01T00:00Z", "does not exist in Europe/Paris"),
    ("2025-01-01T00:00Z", "2026-11-01T00:00Z",
     "more than 10,000 fire times from 2025-01-01T00:00:00Z to 2026-11-01T00:00:00Z (about"),
    ("x" * 101, "2026-11-01T00:00Z", "--from must be an ISO 8601 time"),
], ids=["future", "reversed", "word", "bad-month", "dst-gap", "too-many", "too-long"])
def test_a_bad_range_is_refused_with_one_line_and_writes_nothing(
    db: Database, start: str, end: str, message: str
) -> None:
    add(db, "paris", tz="Europe/Paris")
    with pytest.raises(InputError) as e:
        run(db, "paris", start, end)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert rows(db) == []


def test_a_time_without_an_offset_is_read_in_the_jobs_zone(db: Database) -> None:
    add(db, "paris", tz="Europe/Paris")
    _runs, counts = run(db, "paris", "2026-11-01T00:00", "2026-11-01T00:59")
    assert counts.start == "2026-10-31T23:00:00Z" and counts.fire_times == 1
    assert [r.scheduled_at for r in rows(db)] == [ts("2026-10-31T23:00Z")]


def test_the_count_of_a_range_too_large_is_about_right(db: Database) -> None:
    add(db, "minutely", cron="* * * * *")
    with pytest.raises(InputError, match=r"about 14,400\)"):
        run(db, "minutely", "2026-10-20T00:00Z", "2026-10-29T23:59Z")


def test_a_range_from_before_the_first_fire_time_is_counted_not_cut_at_five_years(
    db: Database,
) -> None:
    """Finding 1: ``--from 1960-01-01`` said "no fire time within 5 years" (the bound of
    the next-fire search) instead of counting the range's fire times (none before 1970)."""
    add(db, "weekdays", cron="0 9 * * 1-5")
    with pytest.raises(InputError, match=r"more than 10,000 fire times .*\(about 14,6\d\d\)"):
        run(db, "weekdays", "1960-01-01T00:00Z", "2026-01-01T00:00Z")
    assert rows(db) == []
    _runs, counts = run(db, "weekdays", "1960-01-01T00:00Z", "1971-01-01T00:00Z")
    assert (counts.fire_times, counts.new) == (261, 261)
    assert rows(db)[0].scheduled_at == ts("1970-01-01T09:00Z")


def test_a_stale_writer_or_a_changed_job_writes_nothing(db: Database) -> None:
    add(db, "hourly")
    with db.read() as conn:
        planned = backfill.plan(conn, "hourly", "2026-11-01T00:00Z", "2026-11-01T03:00Z",
                                now=NOON)
    with pytest.raises(Fenced), db.fenced(epoch_of(db) + 1) as conn:
        backfill.record(conn, planned, epoch_of(db) + 1, "old")
    jd = JobDef("hourly", "jobs.builtin:noop", make_spec(cron="0 */2 * * *"))
    with db.fenced(epoch_of(db)) as conn:
        catalog.upsert_jobs(conn, [jd], replace=True)
    with pytest.raises(InputError, match="changed its trigger"), \
            db.fenced(epoch_of(db)) as conn:
        backfill.record(conn, planned, epoch_of(db), "s1")
    with pytest.raises(JobNotFound):
        run(db, "nope", "2026-11-01T00:00Z", "2026-11-01T03:00Z")
    assert rows(db) == []
