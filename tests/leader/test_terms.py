"""Term generation checks (issue 14, point 8) on the memory backend, with a real
``LeaderRole`` on SQLite: each in a second or two.

A term's callbacks act only on their own term: the fenced pass of an earlier term, or the
loss of an earlier term's lease, never steps the next term down. No exception in a
callback leaves a node that holds the lease without firing: ``halt()`` reaching a
scheduler that has not started yet raises nothing, a ``halt`` that raises still wakes the
loop, and the health check gives the lease up when the scheduler loop stopped.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from backends.base import Lease, LossCallback
from backends.memory import MemoryBackend, MemoryServer
from qcluster.leader import role
from qcluster.leader.election import Leadership
from qcluster.leader.scheduler import FireExecutor, LeaderScheduler
from qcluster.settings import load_settings_from_mapping
from qcluster.store.db import Database
from qcluster.store.jobstore import SqlJobStore
from tests.conftest import DatabaseFactory
from tests.helpers import TEST_SECRET, wait_for

LEASE = 1.0
WAIT = 5.0


@dataclass
class _Led:
    leader: role.LeaderRole
    leadership: Leadership
    backend: MemoryBackend
    revoked: list[str]


@contextmanager
def _leading(db: Database, backend: MemoryBackend | None = None,
             config: dict[str, Any] | None = None) -> Iterator[_Led]:
    """A LeaderRole driven by a Leadership on a memory backend, leading."""
    if backend is None:
        backend = MemoryBackend(MemoryServer(), lease_seconds=LEASE)
        backend.start()
    leader = role.LeaderRole(
        load_settings_from_mapping(config or {}, "test"), db, members=list, node_id="n1",
        control_uri="PYRO:qcluster.leader.control@127.0.0.1:1", secret=TEST_SECRET,
        revoke=lambda reason: leadership.revoke(reason),
    )
    revoked: list[str] = []

    def on_revoked(reason: str) -> None:
        revoked.append(reason)
        leader.stop()

    leadership = Leadership(
        "n1", plan=lambda: backend, min_token=lambda: 0, halt=leader.halt,
        on_elected=lambda lease: leader.start(lease, backend), on_revoked=on_revoked,
        campaign_interval=0.02,
    )
    leadership.start()
    try:
        wait_for(lambda: leader.active and leadership.status == "leader", WAIT, 0.01, "a term")
        yield _Led(leader, leadership, backend, revoked)
    finally:
        leadership.stop()
        backend.stop()


def _next_term(led: _Led, epoch: int) -> int:
    wait_for(lambda: led.leader.active and (led.leader.epoch or 0) > epoch
             and led.leadership.status == "leader", WAIT, 0.01, "the next term")
    new = led.leader.epoch
    assert new is not None
    return new


@pytest.fixture
def db(sqlite_url: str, make_db: DatabaseFactory, monkeypatch: pytest.MonkeyPatch) -> Database:
    monkeypatch.setattr(role, "RECOVERY_INTERVAL", 0.02)
    return make_db(sqlite_url, backend="memory")


def test_a_leader_whose_recovery_pass_hangs_on_the_database_steps_down_on_time(
    db: Database, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 14's flaky partition test: the leader cut from the database stepped down
    only when its recovery pass came back from a connect timeout, after the cut had
    healed. The watchdog steps it down ``database_timeout_seconds`` after the last answer,
    while the pass is still blocked."""
    with _leading(db, config={"scheduler": {"database_timeout_seconds": 1}}) as led:
        hang, entered = threading.Event(), threading.Event()
        recover = role.recover_runs

        def blocked(*args: Any, **kwargs: Any) -> Any:
            entered.set()
            hang.wait(30)  # a connect timeout far longer than the database timeout
            return recover(*args, **kwargs)

        monkeypatch.setattr(role, "recover_runs", blocked)
        try:
            assert entered.wait(WAIT)
            wait_for(lambda: led.revoked, WAIT, 0.01, "the step-down")
            assert "the shared database has not answered" in led.revoked[0]
            assert not hang.is_set()  # the pass was still blocked when it stepped down
        finally:
            hang.set()


def test_an_earlier_terms_fenced_pass_does_not_revoke_the_next_term(db: Database) -> None:
    """The zombie of issue 14: term 1's fenced pass reports after term 2 started."""
    with _leading(db) as led:
        first = led.leader.epoch or 0
        old = led.leader.scheduler
        assert old is not None
        assert led.backend.lose_lease("taken away by the test")
        second = _next_term(led, first)
        settled = len(led.revoked)

        old.on_fenced("epoch 1 is stale")  # what its fenced pass calls
        old.stop_firing()  # and what a halt of it does
        threading.Event().wait(0.2)
        assert len(led.revoked) == settled
        assert led.leader.active and led.leader.epoch == second
        assert led.leadership.status == "leader"
        assert led.leader.healthy() is None


def test_the_loss_of_an_earlier_terms_lease_does_not_step_the_next_term_down(
    db: Database,
) -> None:
    callbacks: list[LossCallback] = []
    backend = MemoryBackend(MemoryServer(), lease_seconds=LEASE)
    backend.start()
    acquire = backend.try_acquire

    def recording(holder: str, on_lost: LossCallback, min_token: int = 0) -> Lease | None:
        callbacks.append(on_lost)
        return acquire(holder, on_lost, min_token)

    backend.try_acquire = recording  # type: ignore[method-assign]
    with _leading(db, backend) as led:
        first = led.leader.epoch or 0
        early = callbacks[-1]
        assert backend.lose_lease("taken away by the test")
        second = _next_term(led, first)
        settled = len(led.revoked)
        early("a late report about the first term's lease")
        threading.Event().wait(0.2)
        assert len(led.revoked) == settled and led.leader.epoch == second
        assert led.leadership.status == "leader"


def test_stop_firing_before_the_scheduler_started_raises_nothing(db: Database) -> None:
    store = SqlJobStore(db, lambda: 1, misfire_grace_seconds=30, coalesce=True, batch_size=10)
    executor = FireExecutor(store, 1, "n1", lambda runs: None, retention_seconds=3600)
    scheduler = LeaderScheduler(store, executor, poll_seconds=1.0, on_fenced=lambda r: None)
    scheduler.stop_firing()  # APScheduler's wakeup() would raise AttributeError here
    assert not scheduler.enabled.is_set() and not scheduler.turning


def test_a_halt_that_raises_still_steps_the_leader_down() -> None:
    backend = MemoryBackend(MemoryServer(), lease_seconds=LEASE)
    backend.start()
    revoked: list[str] = []
    elected: list[Lease] = []
    halts = 0

    def halt() -> None:
        nonlocal halts
        halts += 1
        if halts == 1:
            raise AttributeError("'NoneType' object has no attribute 'set'")

    leadership = Leadership("n1", plan=lambda: backend, min_token=lambda: 0, halt=halt,
                            on_elected=elected.append, on_revoked=revoked.append,
                            campaign_interval=0.02)
    leadership.start()
    try:
        wait_for(lambda: leadership.status == "leader", WAIT, 0.01, "a win")
        with pytest.raises(AttributeError):  # a fenced pass's revoke, on its own thread
            leadership.revoke("a write was fenced")
        wait_for(lambda: revoked, WAIT, 0.01, "the step-down")
        wait_for(lambda: len(elected) == 2 and leadership.status == "leader", WAIT, 0.01,
                 "a new term")
    finally:
        leadership.stop()
        backend.stop()


def test_a_scheduler_loop_that_stopped_makes_the_leader_give_the_lease_up(
    db: Database,
) -> None:
    with _leading(db) as led:
        first = led.leader.epoch or 0
        scheduler = led.leader.scheduler
        assert scheduler is not None
        scheduler.shutdown(wait=False)  # the loop thread ends; the lease is still held
        wait_for(lambda: led.revoked, WAIT, 0.01, "the step-down")
        assert "the scheduler loop has stopped" in led.revoked[0]
        _next_term(led, first)  # and it leads again, firing


def test_a_scheduler_that_stopped_firing_unhalted_makes_the_leader_give_the_lease_up(
    db: Database,
) -> None:
    with _leading(db) as led:
        scheduler = led.leader.scheduler
        assert scheduler is not None
        scheduler.enabled.clear()  # as a callback that failed half way would leave it
        wait_for(lambda: led.revoked, WAIT, 0.01, "the step-down")
        assert "stopped firing" in led.revoked[0]


def test_an_error_in_the_maintenance_pass_gives_the_lease_up(
    db: Database, monkeypatch: pytest.MonkeyPatch,
) -> None:
    with _leading(db) as led:
        def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("a bug in the pass")

        monkeypatch.setattr(role, "recover_runs", broken)
        # Any step-down for that reason (on a loaded machine a 1 s lease may also miss a
        # renewal first; the node then leads again, and its pass fails again).
        wait_for(lambda: [r for r in led.revoked if "RuntimeError: a bug in the pass" in r],
                 WAIT * 2, 0.01, "the step-down for the error")


def test_a_wakeup_before_the_scheduler_started_is_harmless() -> None:
    """A job change through the control API while a term is starting wakes a scheduler
    that has not started yet (APScheduler's own wakeup raised AttributeError then)."""
    from qcluster.leader.scheduler import LeaderScheduler

    scheduler = LeaderScheduler.__new__(LeaderScheduler)  # no store needed to wake it
    scheduler.wakeup()  # no _event yet: nothing to do, nothing raised
