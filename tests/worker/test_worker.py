"""Workers and dispatch over real Pyro5 daemons, on SQLite and PostgreSQL: invariant 4
(workers fence too), the claim that lets a run start once, outcomes, routing, fail-over,
authentication."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
import sqlalchemy as sa

from backends.base import MemberInfo
from qcluster.errors import DatabaseUnavailable
from qcluster.leader.dispatch import Dispatcher
from qcluster.rpc.pyro import proxy
from qcluster.store import schema
from qcluster.store.db import Database
from qcluster.store.records import MAX_AHEAD, Refusal, RunRecord
from qcluster.store.runs import FireRow, RunStatus, insert_runs
from qcluster.worker import runner
from tests.helpers import wait_for
from tests.worker.common import SECRET, RunningWorker, all_runs, lead, record, wait_runs


def test_worker_runs_a_run_and_records_its_outcome(db: Database, workers: list[Any],
                                                   tmp_path: Any) -> None:
    path = tmp_path / "runs.jsonl"
    runs = record(db, 1, kwargs=f'{{"path": "{path}"}}', epoch=7)
    with proxy(workers[0].uri, SECRET, 5.0) as p:
        reply = p.submit(7, runs)
    assert reply["accepted"] == [runs[0]["run_id"]]
    (row,) = wait_runs(db, 1)
    assert row.status == "succeeded" and row.worker == "w1" and row.error is None
    assert row.started_at <= row.finished_at and row.duration >= 0
    import json

    (line,) = [json.loads(x) for x in path.read_text().splitlines()]
    assert line == {**line, "job_id": "job0", "run_id": row.id, "attempt": 1,
                    "scheduled_at": 1000.0, "epoch": 7, "worker": "w1"}


def test_failed_job_is_recorded_with_its_error(db: Database, workers: list[Any]) -> None:
    runs = record(db, 1, func="jobs.builtin:shell", args='["false"]')
    with proxy(workers[0].uri, SECRET, 5.0) as p:
        p.submit(1, runs)
    (row,) = wait_runs(db, 1)
    assert row.status == "failed" and "exit status 1" in row.error


def test_worker_refuses_a_stale_epoch(db: Database, workers: list[Any]) -> None:
    with proxy(workers[0].uri, SECRET, 5.0) as p:
        p.submit(5, record(db, 1, func="jobs.builtin:noop", epoch=5))
        old = record(db, 1, func="jobs.builtin:noop", epoch=4, prefix="old")
        reply = p.submit(4, old)
    assert reply["accepted"] == [] and reply["refused"][0][1] == "stale epoch"


def test_worker_refuses_a_second_copy_of_a_run(db: Database, workers: list[Any]) -> None:
    runs = record(db, 1, func="jobs.builtin:noop")
    with proxy(workers[0].uri, SECRET, 5.0) as p:
        assert p.submit(1, runs)["accepted"]
        assert p.submit(1, runs)["refused"] == [[runs[0]["run_id"], "duplicate"]]


def test_only_one_worker_claims_a_run_sent_to_two(db: Database, workers: list[Any],
                                                  tmp_path: Any) -> None:
    path = tmp_path / "runs.jsonl"
    runs = record(db, 20, kwargs=f'{{"path": "{path}"}}')
    with proxy(workers[0].uri, SECRET, 5.0) as p1, proxy(workers[1].uri, SECRET, 5.0) as p2:
        a = p1.submit(1, runs)
        b = p2.submit(1, runs)
    assert sorted(a["accepted"] + b["accepted"]) == [r["run_id"] for r in runs]
    wait_runs(db, 20)
    assert len(path.read_text().splitlines()) == 20


def test_reference_outside_the_allow_list_fails_with_the_reason(db: Database) -> None:
    w = RunningWorker(db, "strict", allow=["jobs.builtin"])
    try:
        runs = record(db, 1, func="jobs.examples:flaky")
        with proxy(w.uri, SECRET, 5.0) as p:
            p.submit(1, runs)
        (row,) = wait_runs(db, 1)
        assert row.status == "failed" and "not allowed" in row.error
    finally:
        w.stop()


@pytest.mark.parametrize("payload", [
    "x", None, [1], [{"run_id": 1}], [{"run_id": "1", "job_id": "j"}],
    [{k: 1 for k in ("run_id", "job_id", "func", "args", "kwargs", "scheduled_at",
                     "attempt", "epoch", "recover")}],
])
def test_malformed_dispatch_is_refused(db: Database, workers: list[Any], payload: Any) -> None:
    with proxy(workers[0].uri, SECRET, 5.0) as p, pytest.raises(ValueError, match="refused"):
        p.submit(1, payload)
    with proxy(workers[0].uri, SECRET, 5.0) as p:  # the daemon still serves
        assert p.ping()["capacity"] == 4


#: (field, value, what the refusal names): each past its qc_runs column, or not an int.
OUT_OF_RANGE = [
    ("run_id", 2**63, "run_id must be an integer from 1 to 2**63 - 1"),  # was OverflowError
    ("run_id", 2**64, "run_id must be an integer from 1 to 2**63 - 1"),
    ("run_id", 2**200, "run_id must be an integer from 1 to 2**63 - 1"),
    ("run_id", -1, "run_id must be an integer from 1 to 2**63 - 1"),
    ("run_id", 0, "run_id must be an integer from 1 to 2**63 - 1"),
    ("run_id", True, "run_id must be an integer from 1 to 2**63 - 1"),
    ("attempt", 2**31, "attempt must be an integer from 1 to 2**31 - 1"),  # int4 column
    ("attempt", 2**63, "attempt must be an integer from 1 to 2**31 - 1"),
    ("attempt", 0, "attempt must be an integer from 1 to 2**31 - 1"),
    ("attempt", -1, "attempt must be an integer from 1 to 2**31 - 1"),
    ("attempt", True, "attempt must be an integer from 1 to 2**31 - 1"),
    ("epoch", 2**63, "epoch must be an integer from 1 to 2**63 - 1"),
    ("epoch", 0, "epoch must be an integer from 1 to 2**63 - 1"),  # no leader has epoch 0
    ("epoch", -1, "epoch must be an integer from 1 to 2**63 - 1"),
    ("scheduled_at", 10**400, "scheduled_at must be a number of seconds"),  # float() fails
    ("scheduled_at", float("nan"), "scheduled_at must be a number of seconds"),
    ("scheduled_at", float("inf"), "scheduled_at must be a number of seconds"),
    ("scheduled_at", 1e300, "scheduled_at must be a number of seconds"),
    ("scheduled_at", "two days ahead", "scheduled_at is more than a day ahead"),  # of now
]


def _label(value: Any) -> str:
    """``2**63``, ``-1``, ``10**400``, ``nan``: a test id people can read."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**16:
        for base in (2, 10):
            power = round(math.log(abs(value), base))
            if base**power == abs(value):
                return f"{'-' if value < 0 else ''}{base}**{power}"
    return repr(value)


@pytest.mark.parametrize(("field", "value", "reason"), OUT_OF_RANGE,
                         ids=[f"{f}={_label(v)}" for f, v, _ in OUT_OF_RANGE])
def test_a_number_out_of_its_column_range_refuses_the_call_and_changes_nothing(
    db: Database, workers: list[Any], field: str, value: Any, reason: str
) -> None:
    good = record(db, 1, func="jobs.builtin:noop")
    if value == "two days ahead":  # resolved here: test ids must not depend on the clock
        value = time.time() + 2 * 86400
    bad = {**good[0], "job_id": "bad", field: value}
    before = all_runs(db)
    with proxy(workers[0].uri, SECRET, 5.0) as p:
        with pytest.raises(ValueError, match=r"^refused: malformed run record: ") as info:
            p.submit(1, [*good, bad])
        assert reason in str(info.value) and "\n" not in str(info.value), info.value
        assert p.ping()["inflight"] == 0  # the daemon serves, and holds no place for them
    assert all_runs(db) == before  # nothing claimed, the good run of the batch included
    with proxy(workers[0].uri, SECRET, 5.0) as p:  # nor did it remember the good one
        assert p.submit(1, good)["accepted"] == [good[0]["run_id"]]
    assert wait_runs(db, 1)[0].status == "succeeded"


@pytest.mark.parametrize("epoch", [2**63, 2**64, 0, -1, True], ids=_label)
def test_a_batch_epoch_out_of_range_is_refused(db: Database, workers: list[Any],
                                               epoch: Any) -> None:
    runs = record(db, 1, func="jobs.builtin:noop")
    with proxy(workers[0].uri, SECRET, 5.0) as p:
        with pytest.raises(ValueError, match=r"^refused: epoch must be an integer from 1 to "
                                             r"2\*\*63 - 1"):
            p.submit(epoch, runs)
        assert p.ping()["epoch"] == 0  # not fenced by it either
        assert p.submit(1, runs)["accepted"] == [runs[0]["run_id"]]


def test_the_largest_numbers_the_columns_hold_are_answered(db: Database,
                                                           workers: list[Any]) -> None:
    """The edges themselves pass the check and the database takes them in the claim: the
    run (which does not exist) is answered "already claimed", not refused or raised. The
    latest fire time is a day ahead of the worker's clock (records.MAX_AHEAD)."""
    lead(db, 2**63 - 1)  # the cluster row confirms the largest epoch
    top = {"run_id": 2**63 - 1, "job_id": "top", "func": "jobs.builtin:noop", "args": "[]",
           "kwargs": "{}", "scheduled_at": time.time() + MAX_AHEAD - 5, "attempt": 2**31 - 1,
           "epoch": 2**63 - 1, "recover": False}
    with proxy(workers[0].uri, SECRET, 5.0) as p:
        reply = p.submit(2**63 - 1, [top])
        assert reply["refused"] == [[2**63 - 1, "already claimed"]], reply
        assert p.ping() == {**p.ping(), "inflight": 0, "epoch": 2**63 - 1}


def test_a_claim_that_raises_gives_back_the_places_it_took(db: Database,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """Whatever goes wrong in the claim, the worker does not keep a queue place for, or
    remember, a run it did not take (before, each such call leaked one place for ever)."""
    w = RunningWorker(db, "claim")
    try:
        runs = record(db, 1, func="jobs.builtin:noop")

        def broken(batch: list[RunRecord]) -> dict[tuple[int, int], RunRecord]:
            raise RuntimeError("claim failed")

        monkeypatch.setattr(w.worker, "_claim", broken)
        with pytest.raises(RuntimeError):
            w.worker.accept(1, runs)
        assert w.worker.inflight() == 0
        monkeypatch.undo()
        assert w.worker.accept(1, runs).accepted == (runs[0]["run_id"],)
    finally:
        w.stop()


def test_an_epoch_read_that_fails_takes_nothing_and_leaves_the_fence(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new failure point before any place is taken: the read of the cluster row. A
    database error refuses the runs ("database unavailable", to be sent again); anything
    else propagates. Either way nothing is taken and the fence does not move."""
    w = RunningWorker(db, "fence")
    try:
        runs = record(db, 1, func="jobs.builtin:noop", epoch=2)
        errors: list[BaseException] = [DatabaseUnavailable("down"), RuntimeError("bug")]

        def broken() -> int:
            raise errors.pop(0)

        monkeypatch.setattr(w.worker._fence, "_read_epoch", broken)
        assert w.worker.accept(2, runs).refused == ((runs[0]["run_id"], Refusal.UNAVAILABLE),)
        with pytest.raises(RuntimeError, match="bug"):
            w.worker.accept(2, runs)
        assert (w.worker.inflight(), w.worker.load()["epoch"]) == (0, 0)
        monkeypatch.undo()
        assert w.worker.accept(2, runs).accepted == (runs[0]["run_id"],)
        assert w.worker.load()["epoch"] == 2
    finally:
        w.stop()


def test_a_database_that_fails_the_claim_takes_nothing(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = RunningWorker(db, "claimdb")
    try:
        runs = record(db, 2, func="jobs.builtin:noop")

        def down(*args: Any, **kwargs: Any) -> dict[tuple[int, int], RunRecord]:
            raise DatabaseUnavailable("down")

        monkeypatch.setattr(runner, "claim", down)
        reply = w.worker.accept(1, runs)
        assert reply.accepted == () and {why for _, why in reply.refused} == {
            Refusal.UNAVAILABLE}
        assert w.worker.inflight() == 0
        monkeypatch.undo()  # forgotten, so they may come again
        assert sorted(w.worker.accept(1, runs).accepted) == [r["run_id"] for r in runs]
    finally:
        w.stop()


def test_a_hand_off_that_raises_gives_back_the_places_of_the_runs_not_started(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new failure point after the claim: handing a claimed run to the pool (which
    raises once it is shut down). The run started keeps its place until it ends; the
    others give theirs back and are forgotten."""
    w = RunningWorker(db, "handoff")
    try:
        runs = record(db, 3, func="jobs.builtin:noop")
        real_start = w.worker._start
        calls = iter(range(3))

        def second_fails(run: RunRecord) -> None:
            if next(calls) == 1:
                raise RuntimeError("cannot schedule new futures after shutdown")
            real_start(run)

        monkeypatch.setattr(w.worker, "_start", second_fails)
        with pytest.raises(RuntimeError, match="after shutdown"):
            w.worker.accept(1, runs)
        assert w.worker.inflight() <= 1  # the first run's place, until it ends
        (row,) = wait_runs(db, 1)
        assert row.id == runs[0]["run_id"] and row.status == "succeeded"
        wait_for(lambda: w.worker.inflight() == 0, 5, what="no place held")
        monkeypatch.undo()
        # Forgotten (not "duplicate"); the database has their claim, so nothing runs twice.
        reply = w.worker.accept(1, runs[1:])
        assert {why for _, why in reply.refused} == {Refusal.ALREADY_CLAIMED}, reply
        assert w.worker.inflight() == 0
    finally:
        w.stop()


def _dispatcher(strategy: str, members: list[MemberInfo], stale: list[str]) -> Dispatcher:
    return Dispatcher(epoch=1, secret=SECRET, timeout=2.0, strategy=strategy, batch_size=100,
                      members=lambda: members, on_stale=stale.append)


@pytest.mark.parametrize("strategy", ["round_robin", "least_loaded"])
def test_dispatcher_spreads_runs_over_workers(db: Database, workers: list[Any],
                                              strategy: str) -> None:
    stale: list[str] = []
    d = _dispatcher(strategy, [w.member for w in workers], stale)
    d.start()
    try:
        d.submit(record(db, 40, func="jobs.examples:slow", kwargs='{"seconds": 0.05}'))
        rows = wait_runs(db, 40)
    finally:
        d.stop()
    assert len(rows) == 40 and {r.status for r in rows} == {"succeeded"}
    per_worker = {w: sum(r.worker == w for r in rows) for w in ("w1", "w2")}
    assert min(per_worker.values()) >= 10, per_worker
    assert stale == []


def test_dispatcher_fails_over_to_the_next_worker(db: Database, workers: list[Any]) -> None:
    dead = MemberInfo("dead", "s", ("worker",), "PYRO:qcluster.worker.runner@127.0.0.1:1", 4)
    d = _dispatcher("round_robin", [dead, workers[1].member], [])
    d.start()
    try:
        d.submit(record(db, 10, func="jobs.builtin:noop"))
        rows = wait_runs(db, 10)
    finally:
        d.stop()
    assert [r.worker for r in rows] == ["w2"] * 10


def test_dispatcher_stops_when_a_worker_has_seen_a_newer_epoch(
    db: Database, workers: list[Any]
) -> None:
    with proxy(workers[0].uri, SECRET, 5.0) as p:
        p.submit(9, record(db, 1, func="jobs.builtin:noop", epoch=9))
    stale: list[str] = []
    d = _dispatcher("round_robin", [workers[0].member], stale)
    d.start()
    with db.write() as conn:
        runs = insert_runs(conn, [FireRow("late", "jobs.builtin:noop", "[]", "{}", 5.0,
                                          RunStatus.SCHEDULED, False)], 1, "old-leader")
    d.submit(runs)
    deadline = time.monotonic() + 10
    while not stale and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stale and "newer epoch" in stale[0]
    with db.read() as conn:
        status = conn.execute(sa.select(schema.runs.c.status)
                              .where(schema.runs.c.job_id == "late")).scalar_one()
    assert status == "scheduled"


def test_a_run_sent_ahead_is_claimed_at_once_and_started_on_time(
    db: Database, workers: list[Any]
) -> None:
    """The leader's fire-ahead window: a run that arrives before its fire time is taken
    (claimed) at once, and started at its time, not before. Two seconds ahead: a slot's
    process that is not up yet starts while the run waits (about 0.5 s on an idle machine)."""
    due = time.time() + 2.0
    fires = [FireRow("ahead", "jobs.builtin:noop", "[]", "{}", due, RunStatus.SCHEDULED, False)]
    lead(db, 3)
    with db.write() as conn:
        runs = insert_runs(conn, fires, 3, "leader")
    with proxy(workers[0].uri, SECRET, 5.0) as p:
        reply = p.submit(3, runs)
    assert reply["accepted"] == [runs[0]["run_id"]]
    with db.read() as conn:
        row = conn.execute(sa.select(schema.runs)).one()
    assert row.status == "dispatched" and row.worker == "w1"  # claimed, not started
    (row,) = wait_runs(db, 1)
    assert row.status == "succeeded"
    assert due <= row.started_at < due + 0.5, (row.started_at, due)


def test_short_runs_queued_behind_busy_slots_start_together_each_recording_its_own_start(
    db: Database, workers: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backlog of due runs of a job known to be short: pool threads start several in
    one write (fewer writes than there are runs per thread), run each once, one after
    another, and each row records when its own code began, not the write's time."""
    monkeypatch.setattr(runner, "SHORT_RUN", 60.0)  # every job that ran once is short
    worker = workers[0].worker
    writes: list[int] = []
    write = worker._gate._write

    def counted(batch: set[tuple[int, int]]) -> dict[tuple[int, int], bool | None]:
        writes.append(len(batch))
        return write(batch)

    monkeypatch.setattr(worker._gate, "_write", counted)
    lead(db, 3)

    def fires(times: range) -> list[RunRecord]:
        rows = [FireRow("short", "jobs.builtin:noop", "[]", "{}", 1000.0 + t,
                        RunStatus.SCHEDULED, False) for t in times]
        with db.write() as conn:
            return insert_runs(conn, rows, 3, "leader")

    with proxy(workers[0].uri, SECRET, 5.0) as p:
        p.submit(3, fires(range(1)))  # its first run: how long the job takes
        wait_runs(db, 1)
        writes.clear()
        n = 60
        reply = p.submit(3, fires(range(1, n + 1)))
    assert len(reply["accepted"]) == n
    rows = wait_runs(db, n + 1)
    assert [r.status for r in rows] == ["succeeded"] * (n + 1)
    assert sum(writes) == n  # each run started once
    # Without starting together, each write holds at most one run per pool thread (4).
    assert len(writes) < n / 4, writes
    later = sorted(rows[1:], key=lambda r: r.started_at)
    assert len({r.started_at for r in later}) == n  # each its own start
    at_once = [sum(1 for a in later if a.started_at <= b.started_at < a.finished_at)
               for b in later]
    assert max(at_once) <= 4, at_once  # one run at a time per slot, 4 slots
