"""A worker's claim lease, its self-fence and its ``report`` (qcluster/worker/lease.py,
runner.py; docs/DESIGN.md invariant 7): what lets a leader know that a worker it cannot see
has stopped running a run, or finished it. Real database and a real worker; the lease's
clock is a fake one."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from qcluster.rpc.pyro import proxy
from qcluster.store.db import Database
from qcluster.store.runs import RunStatus
from qcluster.worker.lease import EXIT_SELF_FENCED, FENCE_FLUSH_SECONDS, ClaimLease, SelfFence
from tests.helpers import wait_for
from tests.worker.common import SECRET, RunningWorker, lead, record, wait_runs

S = RunStatus


class Clock:
    def __init__(self) -> None:
        self.t = 50.0

    def __call__(self) -> float:
        return self.t


def test_the_lease_runs_out_ttl_after_its_newest_renewal() -> None:
    clock = Clock()
    lease = ClaimLease(10.0, clock)
    clock.t += 9.9
    assert not lease.expired()
    clock.t += 0.2
    assert lease.expired()
    lease.renew(clock.t - 1)  # sent a second ago, committed now
    assert lease.left() == pytest.approx(9.0)
    lease.renew(clock.t - 5)  # an older heartbeat answering late changes nothing
    assert lease.left() == pytest.approx(9.0)


def test_the_self_fence_ends_the_process_only_with_recover_code_running_past_the_lease(
) -> None:
    clock = Clock()
    lease = ClaimLease(10.0, clock)
    recovering = [0]
    exits: list[int] = []
    fence = SelfFence(lease, lambda: recovering[0], exit=exits.append)
    recovering[0] = 2
    assert not fence.check()  # the lease holds
    clock.t += 11
    recovering[0] = 0
    assert not fence.check()  # no --recover code runs: nothing will be run twice
    recovering[0] = 1
    assert fence.check() and exits == [EXIT_SELF_FENCED]


def test_the_self_fence_does_its_last_act_before_the_exit_even_when_that_fails() -> None:
    clock = Clock()
    lease = ClaimLease(10.0, clock)
    calls: list[object] = []

    def last_act(seconds: float) -> None:
        calls.append(seconds)
        raise RuntimeError("the database is gone")

    fence = SelfFence(lease, lambda: 1, exit=calls.append, before_exit=last_act)
    clock.t += 11
    assert fence.check()
    assert calls == [FENCE_FLUSH_SECONDS, EXIT_SELF_FENCED]


def test_the_fences_last_act_writes_finished_outcomes_and_kills_the_recover_code(
    db: Database, tmp_path: Path
) -> None:
    """The soak's ``lost, ran 1`` ticks: a worker paused past its lease self-fenced with
    the outcomes of finished runs still unwritten, and they were recorded ``lost``. Now the
    fence kills the slots first, then writes what had finished, never the failures of the
    runs it killed."""
    from qcluster.store import schema

    lead(db, 1)
    w = RunningWorker(db, "w1")
    try:
        w.worker.writer.stop()  # from here on outcomes wait, as they did under SIGSTOP
        quick = _slow_run(db, tmp_path, recover=False, sleep=0)
        with proxy(w.uri, SECRET, 5.0) as p:
            assert p.submit(1, quick)["accepted"] == [quick[0]["run_id"]]
            wait_for(lambda: w.worker.writer.pending() == 1, timeout=10,
                     what="the quick run to finish")
            slow = record(db, 1, kwargs=json.dumps({"path": str(tmp_path / "s.jsonl"),
                                                    "sleep": 60}), prefix="slow")
            with db.write() as conn:
                conn.execute(schema.runs.update().where(schema.runs.c.id == slow[0]["run_id"])
                             .values(recover=True))
            slow = [{**r, "recover": True} for r in slow]
            assert p.submit(1, slow)["accepted"] == [slow[0]["run_id"]]
            wait_for(lambda: w.worker.recovering() == 1, timeout=10,
                     what="the --recover run's code to run")
        w.worker.fence_exit(5.0)
        # the pool thread sees its slot's process die (killed: the run is not finished)
        wait_for(lambda: w.worker.recovering() == 0, timeout=10, what="the slot to die")
        w.worker.writer.flush()  # sealed: the killed run's failure is never written
        with db.read() as conn:
            rows = {r.id: r for r in conn.execute(sa.select(schema.runs))}
        assert rows[quick[0]["run_id"]].status == S.SUCCEEDED
        assert rows[slow[0]["run_id"]].status == S.RUNNING  # the leader's to judge: lost
    finally:
        w.stop()


def _slow_run(db: Database, tmp_path: Path, *, recover: bool, sleep: float) -> list[Any]:
    runs = record(db, 1, kwargs=json.dumps({"path": str(tmp_path / "r.jsonl"), "sleep": sleep}))
    if recover:
        from qcluster.store import schema
        with db.write() as conn:
            conn.execute(schema.runs.update().values(recover=True))
        runs = [{**r, "recover": True} for r in runs]
    return runs


def test_report_says_held_while_running_then_finished_with_the_unwritten_outcome(
    db: Database, tmp_path: Path
) -> None:
    w = RunningWorker(db, "w1")
    try:
        runs = _slow_run(db, tmp_path, recover=True, sleep=1.5)
        key = [runs[0]["run_id"], 1]
        with proxy(w.uri, SECRET, 5.0) as p:
            assert p.submit(1, runs)["accepted"] == [runs[0]["run_id"]]
            wait_for(lambda: w.worker.recovering() == 1, timeout=10,
                     what="the --recover run's code to run")
            w.worker.writer.stop()  # from here on its outcome cannot be written
            before = w.worker.lease.left()
            held = p.report(1, [key, [key[0] + 1, 1]])
            assert w.worker.lease.left() >= before  # a leader's call renews the lease
            assert held == {"session": w.worker.session, "running": [key], "finished": []}
            wait_for(lambda: w.worker.recovering() == 0, timeout=10, what="the run to end")
            done = p.report(1, [key])
        assert done["running"] == []
        ((run_id, attempt, status, started, finished, error),) = done["finished"]
        assert (run_id, attempt, status, error) == (key[0], 1, "succeeded", None)
        assert finished - started >= 1.4
    finally:
        w.stop()


@pytest.mark.parametrize("call", [
    ("x", []), (1, "not a list"), (1, [[1]]), (1, [[0, 1]]), (1, [[1, True]]),
    (1, [[1, 1]] * 10_001), (0, []),
], ids=["epoch-str", "keys-str", "short-key", "id-0", "bool-attempt", "too-many", "epoch-0"])
def test_a_malformed_report_call_is_refused_and_renews_nothing(
    db: Database, call: tuple[Any, Any]
) -> None:
    lead(db, 1)
    w = RunningWorker(db, "w1")
    try:
        renewed = threading.Event()
        w.worker.lease.renew = lambda at: renewed.set()  # type: ignore[method-assign]
        with proxy(w.uri, SECRET, 5.0) as p, pytest.raises(Exception, match="refused"):
            p.report(*call)
        assert not renewed.is_set()
    finally:
        w.stop()


def test_while_the_database_heartbeats_fail_every_run_is_refused_at_once(
    db: Database, tmp_path: Path
) -> None:
    w = RunningWorker(db, "w1")
    try:
        runs = _slow_run(db, tmp_path, recover=False, sleep=0)
        w.worker.database_heard(False, 0.0)
        with proxy(w.uri, SECRET, 5.0) as p:
            reply = p.submit(1, runs)
            assert reply["refused"] == [[runs[0]["run_id"], "database unavailable"]]
            w.worker.database_heard(True, 0.0)
            assert p.submit(1, runs)["accepted"] == [runs[0]["run_id"]]
        (row,) = wait_runs(db, 1)
        assert row.status == S.SUCCEEDED
    finally:
        w.stop()
