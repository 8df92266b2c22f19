"""Issue 13, point 5: the worker no longer trusts its caller. Each attack is made as a peer
that holds the RPC secret would make it, over a real authenticated Pyro5 daemon (on SQLite
and on PostgreSQL), then against a real ``qcluster start --role worker`` process:

* a lying ``submit`` (a real run id, another function or other arguments) runs what the
  run's row holds, and the row records the outcome of what really ran;
* an epoch that the cluster row does not hold is refused and leaves the fence where it was,
  so the real leader's next batch is taken (before, ``2**63 - 1`` fenced out every leader);
* a run id past int64 (``2**63``, ``2**64 - 1``) is refused and holds no queue place;
* a fire time that cannot be waited for (``inf``, ``nan``, ``1e300``, two days ahead) is
  refused, and the start timer still starts the next run on time.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from qcluster.leader.dispatch import Dispatcher
from qcluster.rpc.pyro import proxy
from qcluster.store import schema
from qcluster.store.db import Database
from qcluster.store.records import RunRecord
from qcluster.store.runs import FireRow, RunStatus, insert_runs
from tests.helpers import TEST_SECRET, NodeProcess, start_node, wait_for, write_config
from tests.worker.common import SECRET, RunningWorker, all_runs, lead, record, wait_runs

NOOP, RECORD = "jobs.builtin:noop", "jobs.examples:record_run"
ALLOW = [NOOP, RECORD]  # by name: whatever the default allow list becomes
DAY = 86400.0


@pytest.fixture
def worker(db: Database) -> Iterator[RunningWorker]:
    w = RunningWorker(db, "target", allow=ALLOW)
    yield w
    w.stop()


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def row_of(db: Database, run_id: int) -> Any:
    with db.read() as conn:
        return conn.execute(sa.select(schema.runs).where(schema.runs.c.id == run_id)).one()


def cluster_epoch(db: Database) -> int:
    with db.read() as conn:
        return int(conn.execute(sa.select(schema.cluster.c.epoch)).scalar_one())


def ahead(db: Database, seconds: float, epoch: int, job_id: str) -> RunRecord:
    """A run recorded ``seconds`` before its fire time (the leader's fire-ahead window)."""
    fire = FireRow(job_id, NOOP, "[]", "{}", time.time() + seconds, RunStatus.SCHEDULED, False)
    with db.write() as conn:
        (run,) = insert_runs(conn, [fire], epoch, "leader")
    return run


def lie_about(run: RunRecord, path: Path) -> dict[str, Any]:
    """``run``'s id and attempt, with everything else the caller's: another job, another
    function or other arguments (``record_run`` into ``path``), now, a huge epoch."""
    return {**run, "job_id": "liar", "func": RECORD, "kwargs": json.dumps({"path": str(path)}),
            "scheduled_at": time.time(), "epoch": 2**62, "recover": True}


# -- over a real daemon, in this process -----------------------------------------------------


def test_a_lying_submit_runs_what_the_row_holds(db: Database, worker: RunningWorker,
                                                tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    real, fake = tmp_path / "real.jsonl", tmp_path / "fake.jsonl"
    (other_func,) = record(db, 1, func=NOOP, epoch=3, prefix="noop")
    (other_args,) = record(db, 1, kwargs=json.dumps({"path": str(real)}), epoch=3,
                           prefix="rec")
    lies = [lie_about(other_func, fake), lie_about(other_args, fake)]
    wrong_attempt = {**lie_about(other_func, fake), "attempt": 2}
    with proxy(worker.uri, SECRET, 5.0) as p:
        reply = p.submit(3, [*lies, wrong_attempt])
    assert reply["accepted"] == [other_func["run_id"], other_args["run_id"]], reply
    assert reply["refused"] == [[other_func["run_id"], "already claimed"]], reply
    rows = wait_runs(db, 2)
    assert [(r.id, r.job_id, r.func, r.status) for r in rows] == [
        (other_func["run_id"], "noop0", NOOP, "succeeded"),
        (other_args["run_id"], "rec0", RECORD, "succeeded")]
    assert lines(fake) == []  # the caller's function and arguments never ran
    (ran,) = lines(real)  # the row's did, with the row's identity
    assert ran == {**ran, "job_id": "rec0", "run_id": other_args["run_id"],
                   "scheduled_at": 1000.0, "epoch": 3, "attempt": 1}
    warned = [r.getMessage() for r in caplog.records if "differs from its row" in r.getMessage()]
    assert sorted(warned) == sorted(
        f"run {run['run_id']}: the dispatch differs from its row in {fields}; running the "
        f"row's run" for run, fields in [
            (other_func, "job_id, func, kwargs, scheduled_at, recover"),
            (other_args, "job_id, kwargs, scheduled_at, recover")]), warned


@pytest.mark.parametrize("huge", [2**63 - 1, 2**62, 4], ids=["2**63-1", "2**62", "row+1"])
def test_an_epoch_the_cluster_row_does_not_hold_is_refused_and_the_leader_goes_on(
    db: Database, worker: RunningWorker, huge: int
) -> None:
    first = record(db, 1, func=NOOP, epoch=3, prefix="first")
    target = record(db, 1, func=NOOP, epoch=3, prefix="target")  # a real run, named by them
    with proxy(worker.uri, SECRET, 5.0) as p:
        assert p.submit(3, first)["accepted"] == [first[0]["run_id"]]
        with pytest.raises(ValueError, match=rf"^refused: epoch {huge} is not confirmed: "
                                             r"the cluster row is at 3$"):
            p.submit(huge, target)
        reply, load = p.submit(huge, []), p.ping()
        # (The first run may end between the two calls: its slot is the one difference.)
        assert reply.pop("inflight") <= 1 and load.pop("inflight") <= 1
        assert reply == {"accepted": [], "refused": [], **load}
        assert p.ping()["epoch"] == 3 and p.ping()["inflight"] <= 1
    assert row_of(db, target[0]["run_id"]).status == "scheduled"  # not claimed
    # The real leader's dispatcher sends the target next: taken, and no one steps down.
    stale: list[str] = []
    d = Dispatcher(epoch=3, secret=SECRET, timeout=5.0, strategy="round_robin", batch_size=10,
                   members=lambda: [worker.member], on_stale=stale.append)
    d.start()
    try:
        d.submit(target)
        rows = wait_runs(db, 2)
    finally:
        d.stop()
    assert [r.status for r in rows] == ["succeeded", "succeeded"] and stale == []


def test_an_epoch_before_any_batch_is_refused_unless_the_row_holds_it(
    db: Database, worker: RunningWorker
) -> None:
    runs = record(db, 1, func=NOOP, epoch=1)
    with proxy(worker.uri, SECRET, 5.0) as p:
        with pytest.raises(ValueError, match=r"^refused: epoch 9223372036854775807 is not "):
            p.submit(2**63 - 1, runs)
        assert p.ping()["epoch"] == 0
        assert p.submit(1, runs)["accepted"] == [runs[0]["run_id"]]
        assert p.ping()["epoch"] == 1


def test_a_leader_that_the_cluster_row_has_passed_is_told_it_is_stale(
    db: Database, worker: RunningWorker
) -> None:
    """The fence rises to what the row confirms: an old leader is refused at once, even on
    its first batch to this worker, and the new one is taken."""
    old = record(db, 1, func=NOOP, epoch=3, prefix="old")
    lead(db, 5)
    with proxy(worker.uri, SECRET, 5.0) as p:
        reply = p.submit(3, old)
        assert reply["refused"] == [[old[0]["run_id"], "stale epoch"]] and reply["epoch"] == 5
        assert p.submit(5, old)["accepted"] == [old[0]["run_id"]]  # the new leader's resend


@pytest.mark.parametrize("run_id", [2**64 - 1, 2**63], ids=["2**64-1", "2**63"])
def test_a_run_id_past_int64_is_refused_and_holds_no_place(
    db: Database, worker: RunningWorker, run_id: int
) -> None:
    (good,) = record(db, 1, func=NOOP)
    bad = {**good, "run_id": run_id}
    before = all_runs(db)
    with proxy(worker.uri, SECRET, 5.0) as p:
        for batch in ([bad], [good, bad], [bad] * 100):
            with pytest.raises(ValueError, match=r"^refused: malformed run record: run_id must "
                                                 r"be an integer from 1 to 2\*\*63 - 1"):
                p.submit(1, batch)
            assert p.ping()["inflight"] == 0
        assert all_runs(db) == before  # nothing claimed, the good run included
        assert p.submit(1, [good])["accepted"] == [good["run_id"]]
    assert wait_runs(db, 1)[0].status == "succeeded"
    assert worker.worker.inflight() == 0


BAD_TIMES = [math.inf, -math.inf, math.nan, 1e300, time.time() + 2 * DAY]


@pytest.mark.parametrize("at", BAD_TIMES, ids=["inf", "-inf", "nan", "1e300", "2-days-ahead"])
def test_a_time_that_cannot_be_waited_for_is_refused_and_the_timer_goes_on(
    db: Database, worker: RunningWorker, at: float
) -> None:
    (run,) = record(db, 1, func=NOOP)
    with proxy(worker.uri, SECRET, 5.0) as p:
        with pytest.raises(ValueError, match=r"^refused: malformed run record: scheduled_at "):
            p.submit(1, [{**run, "scheduled_at": at}])
        assert p.ping()["inflight"] == 0
        # The start timer must still be alive for this one. Two seconds ahead: its slot's
        # process starts while it waits (a first start imports qcluster, about 0.5 s).
        nxt = ahead(db, 2.0, 1, "next")
        assert p.submit(1, [nxt])["accepted"] == [nxt["run_id"]]
    (row,) = wait_runs(db, 1)
    assert row.id == nxt["run_id"] and row.status == "succeeded"
    assert nxt["scheduled_at"] <= row.started_at < nxt["scheduled_at"] + 0.5


# -- against a real `qcluster start --role worker` process -------------------------------------


@dataclass
class WorkerNode:
    node: NodeProcess
    db: Database
    uri: str

    def new_leader(self) -> int:
        """What a new leader leaves in the cluster row: the next epoch."""
        epoch = cluster_epoch(self.db) + 1
        lead(self.db, epoch)
        return epoch


def _member_uri(db: Database, node_id: str) -> str | None:
    try:
        with db.read() as conn:
            m = schema.members
            return conn.execute(sa.select(m.c.uri).where(m.c.node_id == node_id)).scalar()
    except Exception:  # no tables yet: the node is still creating them
        return None


@pytest.fixture(scope="module")
def worker_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerNode]:
    tmp = tmp_path_factory.mktemp("attacked-node")
    url = f"sqlite:///{tmp / 'qcluster.db'}"
    config = write_config(tmp, url, worker={"concurrency": 2}, jobs={"allow": ALLOW})
    with start_node(config, node_id="attacked", role="worker", log_path=tmp / "node.log") as node:
        db = Database(url)
        try:
            def uri() -> str | None:
                assert node.running(), f"the node exited\n{node.log_tail()}"
                return _member_uri(db, "attacked")

            found = wait_for(uri, 30, what="the worker node's URI", details=node.log_tail)
            yield WorkerNode(node, db, found)
            assert node.running(), node.log_tail()
        finally:
            db.dispose()


def node_runs(n: WorkerNode, ids: list[int], timeout: float = 20.0) -> list[Any]:
    def done() -> list[Any] | None:
        rows = [row_of(n.db, i) for i in ids]
        return rows if all(r.finished_at is not None for r in rows) else None

    found = wait_for(done, timeout, what=f"runs {ids} to finish", details=n.node.log_tail)
    return found


def test_a_worker_node_runs_the_rows_function_not_the_liars(worker_node: WorkerNode,
                                                            tmp_path: Path) -> None:
    n = worker_node
    epoch = n.new_leader()
    real, fake = tmp_path / "real.jsonl", tmp_path / "fake.jsonl"
    (run,) = record(n.db, 1, kwargs=json.dumps({"path": str(real)}), epoch=epoch,
                    prefix=f"lied-{epoch}-")
    with proxy(n.uri, TEST_SECRET, 5.0) as p:
        assert p.submit(epoch, [lie_about(run, fake)])["accepted"] == [run["run_id"]]
    (row,) = node_runs(n, [run["run_id"]])
    assert (row.status, row.func, row.worker) == ("succeeded", RECORD, "attacked")
    assert lines(fake) == [] and [x["run_id"] for x in lines(real)] == [run["run_id"]]
    wait_for(lambda: f"run {run['run_id']}: the dispatch differs from its row" in n.node.log(),
             5, what="the one log line", details=n.node.log_tail)


def test_a_worker_node_refuses_a_huge_epoch_and_takes_the_real_leaders_next(
    worker_node: WorkerNode,
) -> None:
    n = worker_node
    epoch = n.new_leader()
    runs = record(n.db, 2, func=NOOP, epoch=epoch, prefix=f"fenced-{epoch}-")
    with proxy(n.uri, TEST_SECRET, 5.0) as p:
        assert p.submit(epoch, runs[:1])["accepted"] == [runs[0]["run_id"]]
        with pytest.raises(ValueError, match=r"^refused: epoch 9223372036854775807 is not "
                                             rf"confirmed: the cluster row is at {epoch}$"):
            p.submit(2**63 - 1, runs[1:])
        assert p.ping()["epoch"] == epoch
        assert p.submit(epoch, runs[1:])["accepted"] == [runs[1]["run_id"]]
    assert [r.status for r in node_runs(n, [r["run_id"] for r in runs])] == ["succeeded"] * 2


def test_a_worker_node_refuses_ids_and_times_out_of_range_and_goes_on(
    worker_node: WorkerNode,
) -> None:
    n = worker_node
    epoch = n.new_leader()
    (run,) = record(n.db, 1, func=NOOP, epoch=epoch, prefix=f"bounded-{epoch}-")
    with proxy(n.uri, TEST_SECRET, 5.0) as p:
        for change in ({"run_id": 2**64 - 1}, {"run_id": 2**63}, {"scheduled_at": math.inf},
                       {"scheduled_at": math.nan}, {"scheduled_at": 1e300}):
            with pytest.raises(ValueError, match=r"^refused: malformed run record: "):
                p.submit(epoch, [{**run, **change}])
            assert p.ping()["inflight"] == 0, change
        assert row_of(n.db, run["run_id"]).status == "scheduled"
        nxt = ahead(n.db, 0.5, epoch, f"bounded-next-{epoch}")
        assert p.submit(epoch, [run, nxt])["accepted"] == [run["run_id"], nxt["run_id"]]
    rows = node_runs(n, [run["run_id"], nxt["run_id"]])
    assert [r.status for r in rows] == ["succeeded", "succeeded"]
    assert nxt["scheduled_at"] <= rows[1].started_at < nxt["scheduled_at"] + 0.5

