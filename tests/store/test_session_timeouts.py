"""Database session timeouts shorter than the lease (issue 14, point 9).

On real PostgreSQL: another session holds the cluster row's lock (an open transaction
with ``SELECT ... FOR UPDATE``, as a leader cut off with its transaction open leaves it);
``take_epoch`` gives up within ``lock_timeout`` with a clear error, and a leader then
steps down and campaigns again rather than hanging, and leads once the lock is gone.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from backends.memory import MemoryBackend, MemoryServer
from qcluster.errors import DatabaseUnavailable, QClusterError
from qcluster.leader import role
from qcluster.leader.election import Leadership
from qcluster.settings import (
    SessionTimeouts,
    Settings,
    load_settings_from_mapping,
    session_timeouts,
)
from qcluster.store.cluster import read_cluster, take_epoch
from qcluster.store.db import Database
from tests.conftest import DatabaseFactory
from tests.helpers import TEST_SECRET, wait_for

LEASE = 2.0
TIMEOUTS = SessionTimeouts(lease=LEASE, lock=1.0, statement=1.6, idle_in_transaction=1.6)


def _settings(url: str, lease: float = LEASE) -> Settings:
    return load_settings_from_mapping(
        {"database": {"url": url}, "coordination": {"dblock": {"lease_seconds": lease}}},
        "test")


def test_the_timeouts_are_derived_from_the_shortest_lease_and_shorter_than_it() -> None:
    s = load_settings_from_mapping({"coordination": {
        "dblock": {"lease_seconds": 10.0},
        "redis": {"urls": ["redis://127.0.0.1:1"], "lease_seconds": 4.0}}}, "test")
    t = session_timeouts(s)
    assert t.lease == 4.0
    assert 0 < t.lock < t.lease and 0 < t.statement < t.lease
    assert 0 < t.idle_in_transaction < t.lease
    assert t.lock <= t.statement  # a lock wait ends first, with its own message


def test_every_postgresql_session_has_the_three_timeouts(pg_url: str,
                                                         make_db: DatabaseFactory) -> None:
    make_db(pg_url)
    db = Database.from_settings(_settings(pg_url))
    try:
        with db.read() as conn:
            shown = {name: conn.execute(sa.text(f"SHOW {name}")).scalar_one() for name in
                     ("lock_timeout", "statement_timeout", "idle_in_transaction_session_timeout")}
    finally:
        db.dispose()
    assert shown == {"lock_timeout": "1s", "statement_timeout": "1600ms",
                     "idle_in_transaction_session_timeout": "1600ms"}


def test_the_server_drops_a_silent_clients_session_within_seconds(
    pg_url: str, make_db: DatabaseFactory
) -> None:
    """Server-side keepalives and TCP user timeout on every session (with or without
    timeouts): a node cut off without a RST leaves no ghost session for hours."""
    make_db(pg_url)
    for db in (Database.from_settings(_settings(pg_url)), Database(pg_url)):
        try:
            with db.read() as conn:
                shown = {name: conn.execute(sa.text(f"SHOW {name}")).scalar_one() for name in
                         ("tcp_keepalives_idle", "tcp_keepalives_interval",
                          "tcp_keepalives_count")}
                user_timeout = conn.execute(sa.text("SHOW tcp_user_timeout")).scalar_one()
        finally:
            db.dispose()
        assert shown == {"tcp_keepalives_idle": "2", "tcp_keepalives_interval": "1",
                         "tcp_keepalives_count": "3"}
        assert user_timeout not in ("0", "0ms"), user_timeout


def test_sqlite_waits_for_its_write_lock_less_than_the_lease(sqlite_url: str) -> None:
    db = Database.from_settings(_settings(sqlite_url))
    try:
        db.upgrade()
        with db.read() as conn:
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one() == 1000
    finally:
        db.dispose()


@pytest.fixture
def locked_row(pg_url: str, make_db: DatabaseFactory) -> Iterator[threading.Event]:
    """The cluster row locked FOR UPDATE by another session, until the event is set."""
    make_db(pg_url, backend="memory")
    engine = sa.create_engine(pg_url)
    release = threading.Event()
    holding = threading.Event()

    def hold() -> None:
        with engine.connect() as conn, conn.begin():
            conn.execute(sa.text("SELECT epoch FROM qc_cluster WHERE id = 1 FOR UPDATE"))
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold, name="test-lock-holder", daemon=True)
    holder.start()
    assert holding.wait(10)
    try:
        yield release
    finally:
        release.set()
        holder.join(10)
        engine.dispose()


def test_take_epoch_gives_up_on_a_held_cluster_row_within_the_lock_timeout(
    pg_url: str, locked_row: threading.Event,
) -> None:
    backend = MemoryBackend(MemoryServer(), lease_seconds=LEASE)
    backend.start()
    db = Database(pg_url, timeouts=TIMEOUTS)
    try:
        lease = backend.try_acquire("n1", lambda reason: None)
        assert lease is not None
        start = time.monotonic()
        with pytest.raises(DatabaseUnavailable) as e:
            take_epoch(db, node_id="n1", uri="PYRO:x@127.0.0.1:1", lease=lease)
        waited = time.monotonic() - start
        assert waited < LEASE, f"waited {waited:.1f}s on the lock, the lease is {LEASE}s"
        assert "lock_timeout" in str(e.value) and "another session holds it" in str(e.value)
        locked_row.set()
        time.sleep(0.2)
        assert take_epoch(db, node_id="n1", uri="PYRO:x@127.0.0.1:1", lease=lease) == 1
    finally:
        db.dispose()
        backend.stop()


def test_a_leader_that_cannot_lock_the_cluster_row_steps_down_and_leads_once_it_can(
    pg_url: str, locked_row: threading.Event, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(role, "RECOVERY_INTERVAL", 0.05)
    backend = MemoryBackend(MemoryServer(), lease_seconds=LEASE)
    backend.start()
    db = Database(pg_url, timeouts=TIMEOUTS)
    leader = role.LeaderRole(
        load_settings_from_mapping({}, "test"), db, members=list, node_id="n1",
        control_uri="PYRO:qcluster.leader.control@127.0.0.1:1", secret=TEST_SECRET,
        revoke=lambda reason: leadership.revoke(reason),
    )
    leadership = Leadership(
        "n1", plan=lambda: backend, min_token=lambda: 0, halt=leader.halt,
        on_elected=lambda lease: leader.start(lease, backend, leadership.deadline),
        on_revoked=lambda reason: leader.stop(), campaign_interval=0.05,
    )
    statuses: list[str] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.02):
            statuses.append(leadership.status)

    sampler = threading.Thread(target=sample, name="test-sampler", daemon=True)
    try:
        sampler.start()
        leadership.start()
        wait_for(lambda: any("could not start leading" in s for s in statuses), 3 * LEASE,
                 0.02, "a step-down on the held lock")
        gave_up = next(s for s in statuses if "could not start leading" in s)
        assert "lock_timeout" in gave_up
        assert not leader.active and read_cluster(db).epoch == 0  # type: ignore[union-attr]
        locked_row.set()
        wait_for(lambda: leader.active and leadership.status == "leader", 5 * LEASE, 0.02,
                 "leading once the lock is gone")
        assert read_cluster(db).epoch == 1  # type: ignore[union-attr]
    finally:
        sampling.set()
        leadership.stop()
        leader.stop()
        backend.stop()
        db.dispose()


def test_a_lease_that_ran_out_while_waiting_for_the_row_takes_no_epoch(
    sqlite_url: str, make_db: DatabaseFactory,
) -> None:
    """Any backend's lease, not only dblock's: the local deadline is checked under the
    row's lock (issue 14: three nodes took epochs 2, 3 and 4 on expired leases)."""
    db = make_db(sqlite_url, backend="memory")
    backend = MemoryBackend(MemoryServer(), lease_seconds=LEASE)
    backend.start()
    try:
        lease = backend.try_acquire("n1", lambda reason: None)
        assert lease is not None
        with pytest.raises(QClusterError, match="ran out"):
            take_epoch(db, node_id="n1", uri="PYRO:x@127.0.0.1:1", lease=lease,
                       valid_until=time.monotonic() - 0.5)
        assert read_cluster(db).epoch == 0  # type: ignore[union-attr]
        assert take_epoch(db, node_id="n1", uri="PYRO:x@127.0.0.1:1", lease=lease,
                          valid_until=time.monotonic() + LEASE) == 1
    finally:
        backend.stop()


def test_a_driver_that_is_not_installed_is_one_line_that_names_the_extra(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg: ModuleNotFoundError
    with pytest.raises(DatabaseUnavailable) as info:
        Database("postgresql+psycopg://qc@127.0.0.1/qc")
    assert str(info.value) == ("cannot use database postgresql+psycopg://qc@127.0.0.1/qc: the "
                               "driver psycopg is not installed (pip install "
                               "'qcluster[postgres]')")
