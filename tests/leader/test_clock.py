"""The leader's clock (issue 14, point 11; docs/DESIGN.md invariant 8): the database's
time, sampled with the shortest round trip and carried on the monotonic clock, and the
scheduler's passes judged on the clock they are given, not on this host's wall clock.

Fast: a fake database and fake clocks, or SQLite; no cluster."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from backends.memory import MemoryBackend, MemoryServer
from qcluster.definitions.jobdefs import JobDef
from qcluster.definitions.triggers import make_spec
from qcluster.errors import DatabaseUnavailable
from qcluster.leader import role
from qcluster.leader.clock import MAX_DRIFT, LeaderClock, Sample
from qcluster.leader.scheduler import FireExecutor, LeaderScheduler
from qcluster.settings import load_settings_from_mapping
from qcluster.store import catalog, schema
from qcluster.store.cluster import read_cluster
from qcluster.store.db import Database
from qcluster.store.jobstore import SqlJobStore
from qcluster.store.records import RunRecord
from tests.conftest import DatabaseFactory
from tests.helpers import TEST_SECRET

#: The fake database's clock runs this far ahead of the true time; the host's wall clock
#: runs 5 s behind it.
DB_OFFSET = 1_000_000.0
WALL_OFFSET = -5.0


class FakeTime:
    """A true time that only the test moves; monotonic, wall and database clocks on it."""

    def __init__(self) -> None:
        self.t = 100.0

    def monotonic(self) -> float:
        return self.t

    def wall(self) -> float:
        return self.t + DB_OFFSET + WALL_OFFSET


class FakeDb:
    """A :class:`~qcluster.leader.clock.TimeSource`: each ``now`` takes the next round
    trip of ``trips`` (seconds out, seconds back) and reads the database's clock between,
    plus ``server_error`` (a server clock read late or early inside the trip)."""

    def __init__(self, clock: FakeTime, trips: list[tuple[float, float]]) -> None:
        self.clock = clock
        self.trips = list(trips)
        self.fail = False
        self.reads = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        if self.fail:
            raise DatabaseUnavailable("database unavailable: connection refused")
        yield None

    def now(self, conn: Any) -> float:
        self.reads += 1
        out, back = self.trips.pop(0) if self.trips else (0.001, 0.001)
        self.clock.t += out
        seen = self.clock.t + DB_OFFSET
        self.clock.t += back
        return seen


def clock_on(fake: FakeTime, db: FakeDb, **kw: Any) -> LeaderClock:
    return LeaderClock(db, monotonic=fake.monotonic, wall=fake.wall, **kw)


def test_the_clock_gives_the_databases_time_and_runs_on_the_monotonic_clock() -> None:
    fake = FakeTime()
    clock = clock_on(fake, FakeDb(fake, [(0.002, 0.002)] * 3))
    assert clock.sync()
    true = fake.t + DB_OFFSET
    assert clock.now() == pytest.approx(true, abs=0.002)
    fake.t += 3600.0  # an hour later, with no new sample: interpolated
    assert clock.now() == pytest.approx(true + 3600.0, abs=0.002)
    assert clock.now_datetime() == datetime.fromtimestamp(clock.now(), UTC)
    skew = clock.skew
    assert skew is not None and skew == pytest.approx(WALL_OFFSET, abs=0.002)


def test_the_sample_with_the_shortest_round_trip_is_kept() -> None:
    """Three samples; the asymmetric slow ones are off by tens of ms, the short one by at
    most half its round trip, and it is the one used."""
    fake = FakeTime()
    db = FakeDb(fake, [(0.080, 0.001), (0.0005, 0.0005), (0.001, 0.060)])
    clock = clock_on(fake, db)
    assert clock.sync() and db.reads == 3
    sample = clock.sample
    assert sample is not None
    assert sample.rtt == pytest.approx(0.001)
    assert sample.error == pytest.approx(0.0005)
    assert clock.now() == pytest.approx(fake.t + DB_OFFSET, abs=sample.error + 1e-9)


def test_a_failed_sample_keeps_the_old_offset_and_none_at_all_is_no_time() -> None:
    fake = FakeTime()
    db = FakeDb(fake, [])
    clock = clock_on(fake, db)
    db.fail = True
    assert not clock.sync()
    with pytest.raises(DatabaseUnavailable):
        clock.now()  # never judge a fire on a clock that was never read
    db.fail = False
    assert clock.sync()
    kept = clock.sample
    db.fail = True
    fake.t += 30.0
    assert clock.sync()  # it still has a sample: the old one
    assert clock.sample is kept
    assert clock.now() == pytest.approx(fake.t + DB_OFFSET, abs=0.002)


def test_a_slow_resample_does_not_replace_a_fresh_precise_one_but_does_an_aged_one() -> None:
    fake = FakeTime()
    db = FakeDb(fake, [(0.0005, 0.0005)] * 3)
    clock = clock_on(fake, db)
    assert clock.sync()
    precise = clock.sample
    assert precise is not None
    fake.t += 5.0
    db.trips = [(0.04, 0.04)] * 3  # a loaded host: 80 ms round trips
    assert clock.sync()
    assert clock.sample is precise  # its error after 5 s is far below 40 ms
    fake.t += 0.05 / MAX_DRIFT  # old enough that 40 ms is the better bound
    db.trips = [(0.04, 0.04)] * 3
    assert clock.sync()
    newer = clock.sample
    assert newer is not precise and newer is not None and newer.rtt == pytest.approx(0.08)


def test_sync_if_due_samples_every_resample_interval() -> None:
    fake = FakeTime()
    db = FakeDb(fake, [])
    clock = clock_on(fake, db, resample_seconds=5.0, samples=2)
    assert clock.sync_if_due() and db.reads == 2
    fake.t += 4.0
    assert clock.sync_if_due() and db.reads == 2
    fake.t += 1.5
    assert clock.sync_if_due() and db.reads == 4


def test_a_wall_clock_off_the_database_is_warned_about_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeTime()
    clock = clock_on(fake, FakeDb(fake, []))
    with caplog.at_level(logging.INFO, logger="qcluster.leader.clock"):
        for _ in range(3):
            assert clock.sync()
            fake.t += 10.0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "5.00" in warnings[0].getMessage() and "behind" in warnings[0].getMessage()


def test_a_wall_clock_within_a_second_of_the_database_is_no_warning(
    db: Database, caplog: pytest.LogCaptureFixture,
) -> None:
    """On a real database on this host (SQLite, PostgreSQL), the clock is this host's
    wall clock to within a few milliseconds."""
    clock = LeaderClock(db)
    with caplog.at_level(logging.WARNING, logger="qcluster.leader.clock"):
        assert clock.sync()
    assert clock.now() == pytest.approx(time.time(), abs=0.05)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_sample_times_and_errors() -> None:
    s = Sample(db_time=50.0, at=10.0, rtt=0.004)
    assert s.time_at(12.5) == 52.5
    assert s.error == pytest.approx(0.002)
    assert s.error_at(110.0) == pytest.approx(0.002 + 100 * MAX_DRIFT)


# -- the scheduler judges on the clock it is given --------------------------------------------


def _store(db: Database, epoch: int) -> SqlJobStore:
    return SqlJobStore(db, lambda: epoch, misfire_grace_seconds=30, coalesce=True)


def _add_every_second(db: Database, job_id: str, next_run_time: float) -> None:
    with db.write() as conn:
        spec = make_spec(every="1s", now=datetime.fromtimestamp(next_run_time - 10, UTC))
        catalog.upsert_jobs(conn, [JobDef(job_id, "jobs.builtin:noop", spec)], replace=False)
        conn.execute(schema.jobs.update().where(schema.jobs.c.id == job_id)
                     .values(next_run_time=next_run_time))


def _rows(db: Database) -> list[Any]:
    with db.read() as conn:
        return list(conn.execute(sa.select(schema.runs).order_by(schema.runs.c.scheduled_at)))


def _epoch(db: Database) -> int:
    state = read_cluster(db)
    assert state is not None
    return state.epoch


def test_fire_plans_on_the_now_it_is_given_not_on_the_wall_clock(db: Database) -> None:
    """A fire time 5 s after this host's wall clock, with a ``now`` (the database's) half
    a second past it: one run, scheduled, nothing coalesced; a wall-clock judge would see
    it as not due. Then a ``now`` 5.5 s past the next one: its 5 earlier fires coalesce."""
    epoch = _epoch(db)
    first = float(int(time.time())) + 5.0
    _add_every_second(db, "j", first)
    sent: list[RunRecord] = []
    store = _store(db, epoch)
    executor = FireExecutor(store, epoch, "a", sent.extend, retention_seconds=86400)
    now = datetime.fromtimestamp(first + 0.5, UTC)
    executor.fire(store.get_due_jobs(now), now)
    rows = _rows(db)
    assert [(r.scheduled_at, r.status) for r in rows] == [(first, "scheduled")]
    assert rows[0].created_at == first + 0.5  # created_at is the clock's now too
    assert [r["scheduled_at"] for r in sent] == [first]

    later = datetime.fromtimestamp(first + 6.5, UTC)
    executor.fire(store.get_due_jobs(later), later)
    assert [(r.scheduled_at, r.status) for r in _rows(db)] == [
        (first, "scheduled"), *((first + i, "missed") for i in range(1, 6)),
        (first + 6, "scheduled")]


@pytest.mark.parametrize("offset", [5.0, -5.0], ids=["wall-ahead", "wall-behind"])
def test_a_pass_is_judged_on_the_scheduler_clock_not_the_wall_clock(
    db: Database, offset: float
) -> None:
    """A leader whose wall clock is ``offset`` off the database's: its pass records the
    fires due by the database's time (``now``), none more, none fewer, and sleeps until
    the next one on that clock."""
    epoch = _epoch(db)
    db_now = float(int(time.time() - offset)) + 0.5
    first = float(int(db_now)) - 2.0  # 3 fire times due by the database's clock
    _add_every_second(db, "j", first)
    store = _store(db, epoch)
    sent: list[RunRecord] = []
    executor = FireExecutor(store, epoch, "a", sent.extend, retention_seconds=86400)
    base = time.monotonic()
    scheduler = LeaderScheduler(store, executor, poll_seconds=30.0, on_fenced=lambda r: None,
                                now=lambda: db_now + (time.monotonic() - base))
    wait = scheduler._pass()
    rows = _rows(db)
    assert [r.scheduled_at for r in rows] == [first, first + 1, first + 2]
    assert [r.status for r in rows] == ["missed", "missed", "scheduled"]
    assert all(r.error == "coalesced into a later run" for r in rows[:2])
    assert [r["scheduled_at"] for r in sent] == [first + 2]
    assert 0.0 < wait <= 0.5  # until the next fire (first + 3), on that clock


# -- the role: a term samples first, and does not start without a sample ---------------------


class _Unreachable:
    @contextmanager
    def read(self) -> Iterator[None]:
        raise DatabaseUnavailable("database unavailable: connection refused")
        yield None  # pragma: no cover

    def now(self, conn: Any) -> float:  # pragma: no cover
        raise AssertionError("not reached")


def _role(db: Database, clock: LeaderClock | None = None) -> role.LeaderRole:
    return role.LeaderRole(
        load_settings_from_mapping({}, "test"), db, members=list, node_id="n1",
        control_uri="PYRO:qcluster.leader.control@127.0.0.1:1", secret=TEST_SECRET,
        revoke=lambda reason: None, clock=clock)


@pytest.fixture
def memory_db(sqlite_url: str, make_db: DatabaseFactory) -> Database:
    return make_db(sqlite_url, backend="memory")


def _lead(db: Database, leader: role.LeaderRole, then: Callable[[], None]) -> None:
    backend = MemoryBackend(MemoryServer(), lease_seconds=30.0)
    backend.start()
    try:
        lease = backend.try_acquire("n1", lambda reason: None)
        assert lease is not None
        try:
            leader.start(lease, backend)
            then()
        finally:
            leader.stop()
    finally:
        backend.stop()


def test_a_term_whose_clock_cannot_be_read_takes_no_epoch(memory_db: Database) -> None:
    before = _epoch(memory_db)
    leader = _role(memory_db, LeaderClock(_Unreachable()))
    with pytest.raises(DatabaseUnavailable, match="database's time"):
        _lead(memory_db, leader, lambda: None)
    assert _epoch(memory_db) == before


def test_a_term_samples_the_clock_before_it_leads_and_publishes_its_time(
    memory_db: Database,
) -> None:
    leader = _role(memory_db)
    assert leader.clock.sample is None

    def check() -> None:
        assert leader.clock.sample is not None
        assert leader.scheduler is not None and leader.scheduler.now == leader.clock.now
        state = read_cluster(memory_db)
        assert state is not None and state.leader_since is not None
        assert abs(state.leader_since - leader.clock.now()) < 5

    _lead(memory_db, leader, check)


def test_job_changes_and_run_now_stamp_the_databases_time(db: Database) -> None:
    """catalog's ``now`` is the database's time on the connection by default (here on
    this host: within a few ms of the wall clock), and a given one is used as given."""
    epoch = _epoch(db)
    with db.write() as conn:
        catalog.upsert_jobs(conn, [JobDef("j", "jobs.builtin:noop", make_spec(every="1h"))],
                            replace=False)
        run = catalog.run_now(conn, "j", epoch, "cli")
        catalog.pause_job(conn, "j")
        given = catalog.run_now(conn, "j", epoch, "cli", now=1234.5)
    rows = {r.id: r for r in _rows(db)}
    assert rows[run["run_id"]].scheduled_at == pytest.approx(time.time(), abs=5)
    assert rows[run["run_id"]].created_at == rows[run["run_id"]].scheduled_at
    assert rows[given["run_id"]].scheduled_at == 1234.5
    with db.read() as conn:
        job = conn.execute(sa.select(schema.jobs)).one()
    assert job.updated_at == pytest.approx(time.time(), abs=5)
    assert job.next_run_time is None
    assert job.created_at == pytest.approx(time.time(), abs=5)
