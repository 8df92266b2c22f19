"""Stored jobs that the edges refuse today (issue 14, points 5 and 6), on SQLite and
PostgreSQL: a job already in the database that fires below ``min_interval_seconds``, or a
cron with no fire time within the bounded search, is set aside with the reason by the
leader's pass (never fired, never deleted), and the other jobs of the pass still fire."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import sqlalchemy as sa

from backends.dblock import DBLockBackend
from qcluster.definitions.crontrigger import SEARCH_YEARS
from qcluster.leader.scheduler import FireExecutor
from qcluster.store import schema
from qcluster.store.db import Database
from qcluster.store.jobstore import SqlJobStore
from qcluster.store.records import RunRecord
from tests.store.test_fencing import add_job, lead, run_rows


def _store(db: Database, job_id: str, trigger: dict[str, object]) -> None:
    """Write a trigger no edge accepts now, as a database from before these checks holds."""
    with db.write() as conn:
        conn.execute(schema.jobs.update().where(schema.jobs.c.id == job_id)
                     .values(trigger=json.dumps(trigger)))


def _pass(db: Database, epoch: int, **kw: float) -> list[RunRecord]:
    with db.write() as conn:  # every job is due
        conn.execute(schema.jobs.update().values(next_run_time=time.time() - 1))
    sent: list[RunRecord] = []
    store = SqlJobStore(db, lambda: epoch, **kw)
    executor = FireExecutor(store, epoch, "a", sent.extend, retention_seconds=86400)
    now = datetime.now(UTC)
    start = time.process_time()
    executor.fire(store.get_due_jobs(now), now)
    assert time.process_time() - start < 1.0  # no job stalls the pass
    return sent


def _broken(db: Database) -> dict[str, str | None]:
    with db.read() as conn:
        return {r.id: r.broken for r in conn.execute(sa.select(schema.jobs))}


def test_a_stored_job_below_the_minimum_interval_is_set_aside_not_fired(db: Database) -> None:
    _, epoch = lead(db, DBLockBackend(db, lease_seconds=30.0, member_timeout=3.0), "a")
    add_job(db, "good", "1s")
    add_job(db, "fast", "1s")
    _store(db, "fast", {"type": "interval", "seconds": 0.001,
                        "start": "2026-01-01T00:00:00+00:00", "tz": "UTC"})
    sent = _pass(db, epoch)
    assert {r["job_id"] for r in sent} == {"good"}
    assert {r.job_id for r in run_rows(db)} == {"good"}
    broken = _broken(db)
    assert broken["good"] is None
    reason = broken["fast"]
    assert reason is not None and "1ms" in reason and "min_interval_seconds" in reason


def test_a_stored_job_above_a_lower_minimum_fires(db: Database) -> None:
    _, epoch = lead(db, DBLockBackend(db, lease_seconds=30.0, member_timeout=3.0), "a")
    add_job(db, "quick", "1s")
    _store(db, "quick", {"type": "interval", "seconds": 0.5,
                         "start": "2026-01-01T00:00:00+00:00", "tz": "UTC"})
    assert [r["job_id"] for r in _pass(db, epoch, min_interval_seconds=0.5)] == ["quick"]
    assert _broken(db)["quick"] is None


def test_a_stored_cron_that_cannot_fire_is_set_aside_without_stalling_the_pass(
    db: Database,
) -> None:
    _, epoch = lead(db, DBLockBackend(db, lease_seconds=30.0, member_timeout=3.0), "a")
    add_job(db, "good", "1s")
    never = [f"never-{i}" for i in range(20)]
    for job_id in never:
        add_job(db, job_id, "1s")
        _store(db, job_id, {"type": "cron", "expr": "0 0 30 2 *", "tz": "UTC"})
    sent = _pass(db, epoch)
    assert {r["job_id"] for r in sent} == {"good"}
    broken = _broken(db)
    assert set(broken) == {"good", *never}  # set aside, never deleted
    for job_id in never:
        reason = broken[job_id]
        assert reason is not None and f"within {SEARCH_YEARS} years" in reason
