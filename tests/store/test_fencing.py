"""Invariants 1-3 and 6 on a real database (SQLite and PostgreSQL): fenced writes,
growing epochs, one run per fire time, every fire accounted for."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from backends.base import Lease
from backends.dblock import DBLockBackend
from qcluster.definitions.jobdefs import JobDef
from qcluster.definitions.triggers import make_spec
from qcluster.errors import Fenced
from qcluster.leader.scheduler import FireExecutor, LeaderScheduler
from qcluster.store import catalog, schema
from qcluster.store.cluster import take_epoch
from qcluster.store.db import Database
from qcluster.store.jobstore import Advance, SqlJobStore
from qcluster.store.records import RunRecord
from qcluster.store.runs import FireRow, RunStatus


def lead(db: Database, backend: DBLockBackend, node: str) -> tuple[Lease, int]:
    lease = backend.try_acquire(node, lambda reason: None)
    assert lease is not None
    return lease, take_epoch(db, node_id=node, uri=f"PYRO:{node}@x:1", lease=lease)


def add_job(db: Database, job_id: str, every: str = "1s", **kw: Any) -> None:
    jd = JobDef(job_id, "jobs.builtin:noop", make_spec(every=every), **kw)
    with db.write() as conn:
        catalog.upsert_jobs(conn, [jd], replace=False)


def run_rows(db: Database) -> list[Any]:
    with db.read() as conn:
        return list(conn.execute(sa.select(schema.runs).order_by(schema.runs.c.scheduled_at)))


def fire(job_id: str, at: float, status: RunStatus = RunStatus.SCHEDULED) -> FireRow:
    return FireRow(job_id, "jobs.builtin:noop", "[]", "{}", at, status, False)


def test_stale_leader_cannot_commit_after_takeover(db: Database) -> None:
    backend = DBLockBackend(db, lease_seconds=1.0, member_timeout=3.0)
    _, old_epoch = lead(db, backend, "a")
    time.sleep(1.1)  # the lease lapses on the database clock; b takes over
    _, new_epoch = lead(db, backend, "b")
    assert new_epoch > old_epoch
    store = SqlJobStore(db, lambda: old_epoch)
    with pytest.raises(Fenced):
        store.commit_fires(old_epoch, "a", [fire("j", 1000.0)], [])
    with pytest.raises(Fenced), db.fenced(old_epoch) as conn:
        conn.execute(schema.jobs.delete())
    assert run_rows(db) == []
    assert store.commit_fires(new_epoch, "b", [fire("j", 1000.0)], [])


def test_paused_ex_leader_cannot_take_an_epoch_with_its_old_lease(db: Database) -> None:
    backend = DBLockBackend(db, lease_seconds=1.0, member_timeout=3.0)
    old_lease, _ = lead(db, backend, "a")
    time.sleep(1.1)
    _, epoch_b = lead(db, backend, "b")
    # a wakes up and tries to take an epoch with the lease it held before the pause
    with pytest.raises(Fenced):
        take_epoch(db, node_id="a", uri="x", lease=old_lease)
    # and even a lease object forged with a larger token fails: the lease row says b
    forged = Lease("dblock", "a", old_lease.token + 10, 1.0)
    with pytest.raises(Fenced):
        take_epoch(db, node_id="a", uri="x", lease=forged)
    with db.fenced(epoch_b):
        pass  # b still holds the cluster


def test_epochs_only_grow_across_leaders(db: Database) -> None:
    backend = DBLockBackend(db, lease_seconds=30.0, member_timeout=3.0)
    seen = []
    for node in ("a", "b", "c", "a"):
        lease, epoch = lead(db, backend, node)
        seen.append((lease.token, epoch))
        backend.release(lease)
    assert [e for _, e in seen] == sorted({e for _, e in seen})
    assert [t for t, _ in seen] == sorted({t for t, _ in seen})


def test_fenced_write_and_takeover_serialize(db: Database) -> None:
    """A takeover that happens while a fenced transaction is open cannot slip in between
    the epoch check and the commit: the fenced write commits first, or is refused."""
    backend = DBLockBackend(db, lease_seconds=1.0, member_timeout=3.0)
    _, epoch = lead(db, backend, "a")
    time.sleep(1.1)
    lease_b = backend.try_acquire("b", lambda r: None)
    assert lease_b is not None
    took: list[int] = []
    with db.fenced(epoch) as conn:
        t = threading.Thread(
            target=lambda: took.append(take_epoch(db, node_id="b", uri="x", lease=lease_b))
        )
        t.start()
        time.sleep(0.3)
        assert not took, "the takeover must wait for the open fenced transaction"
        conn.execute(schema.runs.insert().values(
            job_id="j", scheduled_at=1.0, func="m:f", args="[]", kwargs="{}",
            status="scheduled", attempt=1, recover=False, epoch=epoch, leader="a",
            created_at=1.0))
    t.join(10)
    assert took == [epoch + 1]
    assert len(run_rows(db)) == 1


def test_a_fire_time_is_recorded_once_whoever_fires_it(db: Database) -> None:
    backend = DBLockBackend(db, lease_seconds=30.0, member_timeout=3.0)
    lease, e1 = lead(db, backend, "a")
    store = SqlJobStore(db, lambda: e1)
    first = store.commit_fires(e1, "a", [fire("j", 50.0), fire("j", 51.0)], [])
    assert [r["scheduled_at"] for r in first] == [50.0, 51.0]
    backend.release(lease)
    _, e2 = lead(db, backend, "b")
    again = store.commit_fires(e2, "b", [fire("j", 51.0), fire("j", 52.0)], [])
    assert [r["scheduled_at"] for r in again] == [52.0]
    rows = run_rows(db)
    assert [(r.scheduled_at, r.leader) for r in rows] == [(50.0, "a"), (51.0, "a"), (52.0, "b")]


def test_run_rows_and_job_advances_commit_together(db: Database) -> None:
    backend = DBLockBackend(db, lease_seconds=30.0, member_timeout=3.0)
    _, epoch = lead(db, backend, "a")
    add_job(db, "j")
    with db.read() as conn:
        nrt = conn.execute(sa.select(schema.jobs.c.next_run_time)).scalar_one()
    store = SqlJobStore(db, lambda: epoch)
    broken = FireRow("j", None, "[]", "{}", nrt + 1, RunStatus.SCHEDULED, False)  # type: ignore[arg-type]
    with pytest.raises(sa.exc.IntegrityError):
        store.commit_fires(epoch, "a", [fire("j", nrt), broken], [Advance("j", 1, nrt + 2)])
    assert run_rows(db) == []
    with db.read() as conn:
        assert conn.execute(sa.select(schema.jobs.c.next_run_time)).scalar_one() == nrt


def test_advances_apply_only_at_the_version_read(db: Database) -> None:
    """A pass's advances (one statement of arrays on PostgreSQL): a job still at the
    version the pass read moves on and counts its runs, one changed since keeps its own
    schedule, one with no fire time left is deleted unless kept."""
    for job_id in ("a", "b", "c", "d", "e"):
        add_job(db, job_id)
    with db.write() as conn:
        conn.execute(schema.jobs.update().where(schema.jobs.c.id == "b")
                     .values(version=2, next_run_time=7.0))
        catalog.apply_advances(conn, [
            Advance("e", 1, 500.0, runs=1), Advance("a", 1, 100.0, runs=3),
            Advance("b", 1, 200.0, runs=1), Advance("c", 1, None),
            Advance("d", 1, None, runs=1, keep=True)])
    with db.read() as conn:
        rows = {r.id: (r.next_run_time, r.runs_made) for r in conn.execute(
            sa.select(schema.jobs.c.id, schema.jobs.c.next_run_time, schema.jobs.c.runs_made))}
    assert rows == {"a": (100.0, 3), "b": (7.0, 0), "d": (None, 1), "e": (500.0, 1)}


def test_job_rows_hold_readable_data_not_pickle(db: Database) -> None:
    add_job(db, "j", "30s")
    with db.read() as conn:
        row = conn.execute(sa.select(schema.jobs)).one()
    assert row.func == "jobs.builtin:noop"
    assert json.loads(row.trigger)["type"] == "interval"
    assert json.loads(row.args) == [] and json.loads(row.kwargs) == {}


def test_unloadable_job_is_set_aside_not_deleted(db: Database) -> None:
    backend = DBLockBackend(db, lease_seconds=30.0, member_timeout=3.0)
    _, epoch = lead(db, backend, "a")
    add_job(db, "good")
    add_job(db, "bad")
    with db.write() as conn:
        conn.execute(schema.jobs.update().where(schema.jobs.c.id == "bad")
                     .values(trigger='{"type": "cron", "expr": "99 * * * *", "tz": "UTC"}',
                             next_run_time=0.0))
        conn.execute(schema.jobs.update().where(schema.jobs.c.id == "good")
                     .values(next_run_time=0.0))
    store = SqlJobStore(db, lambda: epoch)
    due = store.get_due_jobs(datetime.now(UTC))
    assert [j.id for j in due] == ["good"]
    with db.read() as conn:
        rows = {r.id: r for r in conn.execute(sa.select(schema.jobs))}
    assert set(rows) == {"good", "bad"}
    assert rows["bad"].broken and "99" in rows["bad"].broken


def _leader_pass(db: Database, epoch: int, now: datetime, **kw: Any) -> list[RunRecord]:
    sent: list[RunRecord] = []
    store = SqlJobStore(db, lambda: epoch, **kw)
    executor = FireExecutor(store, epoch, "a", sent.extend, retention_seconds=86400)
    executor.fire(store.get_due_jobs(now), now)
    return sent


@pytest.mark.parametrize("coalesce", [True, False])
def test_every_missed_fire_time_becomes_a_run_row(db: Database, coalesce: bool) -> None:
    backend = DBLockBackend(db, lease_seconds=30.0, member_timeout=3.0)
    _, epoch = lead(db, backend, "a")
    add_job(db, "j", "1s")
    with db.read() as conn:
        nrt = conn.execute(sa.select(schema.jobs.c.next_run_time)).scalar_one()
    now = datetime.fromtimestamp(nrt, UTC) + timedelta(seconds=99)  # 100 fire times due
    sent = _leader_pass(db, epoch, now, misfire_grace_seconds=30, coalesce=coalesce)
    rows = run_rows(db)
    assert len(rows) == 100
    assert [r.scheduled_at for r in rows] == [nrt + i for i in range(100)]
    statuses = [r.status for r in rows]
    assert statuses[:69] == ["missed"] * 69  # older than the 30 s grace time
    if coalesce:
        assert statuses[69:] == ["missed"] * 30 + ["scheduled"]
        assert [r["scheduled_at"] for r in sent] == [nrt + 99]
    else:
        assert statuses[69:] == ["scheduled"] * 31
        assert len(sent) == 31
    with db.read() as conn:
        assert conn.execute(sa.select(schema.jobs.c.next_run_time)).scalar_one() == nrt + 100


def test_stopped_scheduler_does_not_advance_due_jobs(db: Database) -> None:
    """APScheduler's shutdown() runs one more pass that advances due jobs without running
    them (upstream #285, #985); ours must leave them due."""
    backend = DBLockBackend(db, lease_seconds=30.0, member_timeout=3.0)
    _, epoch = lead(db, backend, "a")
    add_job(db, "j", "1h")
    with db.write() as conn:
        conn.execute(schema.jobs.update().values(next_run_time=time.time() - 5))
    store = SqlJobStore(db, lambda: epoch)
    executor = FireExecutor(store, epoch, "a", lambda runs: None, retention_seconds=86400)
    sched = LeaderScheduler(store, executor, poll_seconds=0.2, on_fenced=lambda r: None)
    sched.start(paused=True)
    sched.shutdown(wait=True)
    assert run_rows(db) == []
    with db.read() as conn:
        assert conn.execute(sa.select(schema.jobs.c.next_run_time)).scalar_one() < time.time()


@pytest.mark.parametrize("every", ["1s", "200ms"])
def test_fire_ahead_records_coming_fires_and_coalesces_only_passed_ones(
    db: Database, every: str
) -> None:
    """With a fire-ahead window, fire times up to ``until`` are recorded as ``scheduled``
    (each its own run, never coalesced or missed); passed ones keep the misfire rules."""
    backend = DBLockBackend(db, lease_seconds=30.0, member_timeout=3.0)
    _, epoch = lead(db, backend, "a")
    add_job(db, "j", every)
    step = 1.0 if every == "1s" else 0.2
    with db.read() as conn:
        nrt = conn.execute(sa.select(schema.jobs.c.next_run_time)).scalar_one()
    now = datetime.fromtimestamp(nrt, UTC) + timedelta(seconds=3 * step)  # 4 passed times
    until = now + timedelta(seconds=0.5)
    sent: list[RunRecord] = []
    store = SqlJobStore(db, lambda: epoch, misfire_grace_seconds=30, coalesce=True,
                        min_interval_seconds=0.2)  # a 200ms job: allowed by this setting
    executor = FireExecutor(store, epoch, "a", sent.extend, retention_seconds=86400)
    executor.fire(store.get_due_jobs(until), now, until)
    ahead = int(0.5 // step + 1e-9)  # fire times in (now, until]
    rows = run_rows(db)
    assert [r.scheduled_at for r in rows] == pytest.approx(
        [nrt + i * step for i in range(4 + ahead)])
    assert [r.status for r in rows] == ["missed"] * 3 + ["scheduled"] * (1 + ahead)
    assert [r["scheduled_at"] for r in sent] == pytest.approx(
        [nrt + i * step for i in range(3, 4 + ahead)])
    with db.read() as conn:
        nxt = conn.execute(sa.select(schema.jobs.c.next_run_time)).scalar_one()
    assert nxt == pytest.approx(nrt + (4 + ahead) * step)
    assert nxt > until.timestamp()
