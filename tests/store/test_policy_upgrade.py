"""A live 0003 database (issue 14's schema) upgrades to 0004 (job policies) with its jobs
and runs kept: the old rows read as "no policy" and the leader fires them as before."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import sqlalchemy as sa

from qcluster.leader.scheduler import FireExecutor
from qcluster.store import catalog, schema
from qcluster.store.cluster import ensure_cluster, read_cluster
from qcluster.store.db import Database
from qcluster.store.jobstore import SqlJobStore
from qcluster.store.records import RunRecord
from tests.leader.test_migration import columns, upgrade_to


def test_a_0003_database_upgrades_and_its_jobs_fire_with_no_policy(db_url: str) -> None:
    db = Database(db_url)
    try:
        upgrade_to(db, "0003")
        assert "policy" not in columns(db, "qc_jobs")
        now = float(int(time.time()))
        with db.write() as conn:
            conn.execute(sa.text(
                "INSERT INTO qc_jobs (id, func, trigger, args, kwargs, next_run_time, paused, "
                "misfire_grace_seconds, coalesce, recover, max_attempts, broken, version, "
                "created_at, updated_at) VALUES ('old', 'jobs.builtin:noop', "
                "'{\"seconds\": 1.0, \"start\": \"2026-01-01T00:00:00+00:00\", \"type\": "
                "\"interval\", \"tz\": \"UTC\"}', '[]', '{}', :next, false, NULL, NULL, false, "
                "NULL, NULL, 1, :now, :now)"), {"next": now, "now": now})
            conn.execute(sa.text(
                "INSERT INTO qc_runs (job_id, scheduled_at, func, args, kwargs, status, attempt, "
                "recover, epoch, leader, created_at, deaths) VALUES ('old', :t, "
                "'jobs.builtin:noop', '[]', '{}', 'failed', 1, false, 1, 'n1', :t, 0)"),
                {"t": now - 5})
        db.upgrade()
        assert db.is_current()
        assert {"policy", "runs_made"} <= columns(db, "qc_jobs")
        assert {"due_at", "timeout", "retries_left"} <= columns(db, "qc_runs")
        assert sa.inspect(db.engine).has_table("qc_calendars")
        with db.read() as conn:
            view = catalog.get_job(conn, "old")
            (old_run,) = conn.execute(sa.select(schema.runs)).all()
        assert (view["retries"], view["overlap"], view["runs_made"]) == (None, None, 0)
        assert (old_run.retries_left, old_run.due_at) == (0, None)  # no retry of the past

        ensure_cluster(db, "t", "dblock")
        state = read_cluster(db)
        assert state is not None
        store = SqlJobStore(db, lambda: state.epoch)
        sent: list[RunRecord] = []
        executor = FireExecutor(store, state.epoch, "n1", sent.extend, retention_seconds=3600)
        at = datetime.fromtimestamp(now + 0.2, UTC)
        assert executor.fire(store.get_due_jobs(at), at) == 1
        assert [r["scheduled_at"] for r in sent] == [now]
    finally:
        db.dispose()
