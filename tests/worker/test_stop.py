"""A worker's start and stop (issue 14, points 3 and 4): a run's code starts only once its
row says ``running``, so a run the leader recorded missed or cancelled while it waited for
a slot never starts; ``stop(grace)`` returns within about the grace whatever the jobs do,
stops what still runs (its process group killed), records it ``interrupted`` and gives
back what never started."""

from __future__ import annotations

import threading
import time
from typing import Any

import sqlalchemy as sa

from qcluster.store import runs, schema
from qcluster.store.db import Database
from qcluster.store.runs import RunStatus
from qcluster.worker.pool import JobPool
from qcluster.worker.runner import Worker
from qcluster.worker.starts import StartGate
from tests.helpers import wait_for
from tests.worker.common import ALLOW, record

S = RunStatus


def status(db: Database, run_id: int) -> Any:
    with db.read() as conn:
        return conn.execute(sa.select(schema.runs).where(schema.runs.c.id == run_id)).one()


def one_slot(db: Database) -> Worker:
    w = Worker(db, node_id="w1", session="s-w1", concurrency=1, allow=ALLOW)
    w.start()
    return w


def test_stop_records_a_never_ending_run_interrupted_and_gives_back_the_queued_one(
    db: Database,
) -> None:
    w = one_slot(db)
    long, queued = record(db, 2, func="jobs.builtin:sleep", args="[3600]")
    assert w.accept(1, [long, queued]).accepted == (long["run_id"], queued["run_id"])
    wait_for(lambda: status(db, long["run_id"]).status == S.RUNNING, timeout=10,
             what="the long run to start")
    assert status(db, queued["run_id"]).status == S.DISPATCHED
    began = time.monotonic()
    w.stop(grace=0.5)
    assert time.monotonic() - began < 5
    row = status(db, long["run_id"])
    assert row.status == S.INTERRUPTED and row.finished_at is not None
    assert row.error.startswith("interrupted: the worker stopped before the run finished")
    again = status(db, queued["run_id"])
    assert (again.status, again.worker, again.worker_session) == (S.SCHEDULED, None, None)
    # The sleeping job was stopped: no slot process, no pool thread is left to hold us.
    assert w.slots.pids() == []
    assert not [t for t in threading.enumerate() if t.name.startswith("qc-job")]


def test_a_run_recorded_missed_while_it_waited_for_a_slot_never_starts(db: Database) -> None:
    w = one_slot(db)
    try:
        busy, starved = record(db, 2, func="jobs.builtin:sleep", args="[1.0]")
        w.accept(1, [busy, starved])
        wait_for(lambda: status(db, busy["run_id"]).status == S.RUNNING, timeout=10,
                 what="the first run to start")
        with db.fenced(1) as conn:  # what the leader's recovery does past the grace
            assert runs.mark_missed(conn, starved["run_id"], 1, S.DISPATCHED, now=5.0,
                                    error="no free worker slot")
        wait_for(lambda: status(db, busy["run_id"]).status == S.SUCCEEDED and not w.inflight(),
                 timeout=10, what="the slot to free and the starved run to be dropped")
        time.sleep(0.3)
        row = status(db, starved["run_id"])
        assert (row.status, row.started_at, row.error) == (S.MISSED, None, "no free worker slot")
    finally:
        w.stop(grace=1)


def test_concurrent_starts_are_written_together_and_only_claimed_runs_start(
    db: Database,
) -> None:
    recs = record(db, 40, func="jobs.builtin:noop")
    taken = runs.claim(db, recs[:30], worker="w1", session="s1")
    gate = StartGate(db, "s1", threading.Event())
    answers: dict[tuple[int, int], bool] = {}

    def begin(key: tuple[int, int]) -> None:
        answers[key] = gate.begin(key)

    threads = [threading.Thread(target=begin, args=((r["run_id"], 1),)) for r in recs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert {k for k, ok in answers.items() if ok} == set(taken)
    assert len(answers) == 40
    assert all(status(db, k[0]).status == S.RUNNING for k in taken)
    gate.close()
    assert gate.begin((recs[0]["run_id"], 1)) is False  # closed: nothing more starts


def test_the_job_pool_runs_on_daemon_threads_and_stop_returns_what_never_started() -> None:
    release = threading.Event()
    ran: list[int] = []

    def run(n: int) -> None:
        ran.append(n)
        release.wait(5)

    pool: JobPool[int] = JobPool(2, run)
    for n in range(5):
        pool.submit(n)
    wait_for(lambda: len(ran) == 2, timeout=5, what="two items running")
    assert pool.stop() == [2, 3, 4]
    release.set()
    time.sleep(0.2)
    assert sorted(ran) == [0, 1]
    try:
        pool.submit(9)
    except RuntimeError:
        pass
    else:
        raise AssertionError("a stopped pool took an item")


def test_a_busy_pool_hands_a_backlog_of_joinable_items_to_one_thread_in_order() -> None:
    """With ``run_many``: while the queue holds more items than idle threads, a thread
    takes the joinable ones at its head together (up to ``max_batch``, in order); an item
    that is not joinable is taken alone, and so is one an idle thread would take."""
    release = threading.Event()
    calls: list[list[int]] = []

    def run(n: int) -> None:
        calls.append([n])
        if n == 0:
            release.wait(5)

    pool: JobPool[int] = JobPool(1, run, run_many=calls.append, joinable=lambda n: n != 5,
                                 max_batch=3)
    pool.submit(0)  # holds the only thread while the backlog builds
    wait_for(lambda: calls == [[0]], timeout=5, what="the first item running")
    for n in range(1, 9):
        pool.submit(n)
    release.set()
    wait_for(lambda: sum(map(len, calls)) == 9, timeout=5, what="every item run")
    assert calls == [[0], [1, 2, 3], [4], [5], [6, 7, 8]], calls
    pool.stop()

    # Two items queued at once for two threads (the lock held: neither has taken one
    # yet): the first taken is taken alone, as the other thread is free for the second.
    taken: list[list[int]] = []
    pair: JobPool[int] = JobPool(2, lambda n: taken.append([n]), run_many=taken.append,
                                 joinable=lambda n: True, max_batch=8)
    with pair._cond:
        pair.submit(1)
        pair.submit(2)
    wait_for(lambda: len(taken) == 2, timeout=5, what="both items taken")
    assert sorted(taken) == [[1], [2]], taken
    pair.stop()
