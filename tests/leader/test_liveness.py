"""The leader's judge of silent workers (qcluster/leader/liveness.py) and recovery on its
verdicts (docs/DESIGN.md invariant 7, issue 14 point 10): a run is made again only when
its worker is known to have stopped running it, never only because the worker is missing
from the database's member list. Real database (SQLite and PostgreSQL), a real worker on
an authenticated Pyro5 daemon where the worker's word matters, a fake clock for the
lease."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from qcluster.leader.liveness import Kind, SessionJudge
from qcluster.leader.recovery import recover_runs
from qcluster.rpc.pyro import proxy
from qcluster.store import schema
from qcluster.store.db import Database
from qcluster.store.reports import FENCE_MARGIN, HeldReport
from qcluster.store.runs import Outcome, RunStatus, claim, start
from tests.worker.common import SECRET, RunningWorker, lead, record

S = RunStatus
LEASE = 8.0
QUIET = LEASE + FENCE_MARGIN


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def member(db: Database, node_id: str, session: str, uri: str | None, *,
           silent: float) -> None:
    """A qc_members row heard ``silent`` seconds ago on the database's clock (tests may
    write the table)."""
    m = schema.members
    with db.write() as conn:
        now = db.now(conn)
        conn.execute(m.delete().where(m.c.node_id == node_id))
        conn.execute(m.insert().values(node_id=node_id, session=session, roles="worker",
                                       uri=uri, capacity=1, tags="[]", backends="",
                                       config_version=0, started_version=0, status="",
                                       last_seen=now - silent))


class Fake:
    """A worker that answers ``report`` with what it is told to (or raises it)."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.calls: list[tuple[int, list[list[int]]]] = []

    @contextlib.contextmanager
    def connect(self, uri: str) -> Iterator[Fake]:
        yield self

    def report(self, epoch: int, keys: list[list[int]]) -> object:
        self.calls.append((epoch, keys))
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


def judge(db: Database, fake: Fake, clock: Clock) -> SessionJudge:
    return SessionJudge(db, epoch=1, secret=SECRET, lease_seconds=LEASE, margin=FENCE_MARGIN,
                        connect=fake.connect, clock=clock)


_jobs = itertools.count()


def running_run(db: Database, session: str = "s-w1", recover: bool = True) -> int:
    """One run claimed and started by ``session`` (as worker w1); its id."""
    (rec,) = record(db, 1, prefix=f"job{next(_jobs)}-")
    with db.write() as conn:
        conn.execute(schema.runs.update().where(schema.runs.c.id == rec["run_id"])
                     .values(recover=recover))
    claim(db, [rec], worker="w1", session=session)
    start(db, [(rec["run_id"], 1)], session=session, now=1000.0)
    return rec["run_id"]


def status_of(db: Database, run_id: int) -> Any:
    with db.read() as conn:
        return conn.execute(sa.select(schema.runs).where(schema.runs.c.id == run_id)).one()


def test_a_worker_that_answers_for_its_session_is_alive_with_what_it_holds(db: Database) -> None:
    clock = Clock()
    member(db, "w1", "s-w1", "PYRO:w@127.0.0.1:1", silent=60)
    fake = Fake({"session": "s-w1", "running": [[7, 1]], "finished": []})
    v = judge(db, fake, clock)({"s-w1": [(7, 1), (8, 1)]})["s-w1"]
    assert v.kind == Kind.ALIVE and v.report == HeldReport("s-w1", frozenset({(7, 1)}), {})
    assert fake.calls == [(1, [[7, 1], [8, 1]])]


def test_another_session_at_the_address_or_no_member_row_is_known_stopped(
    db: Database
) -> None:
    clock = Clock()
    member(db, "w1", "s-w1", "PYRO:w@127.0.0.1:1", silent=1)
    fake = Fake({"session": "s-new", "running": [], "finished": []})
    verdicts = judge(db, fake, clock)({"s-w1": [(7, 1)], "s-gone": [(9, 1)]})
    assert verdicts["s-w1"].kind == Kind.STOPPED
    assert "another session" in verdicts["s-w1"].reason
    assert verdicts["s-gone"].kind == Kind.STOPPED
    assert "member record is gone" in verdicts["s-gone"].reason


@pytest.mark.parametrize("answer", [
    ConnectionRefusedError("refused"), TimeoutError("timed out"),
    {"session": "s-w1", "running": [[99, 1]], "finished": []},  # not asked: malformed
    ["not", "a", "report"],
], ids=["refused", "timeout", "unasked", "malformed"])
def test_no_answer_is_counted_out_only_past_the_lease_since_the_term_began(
    db: Database, answer: Any
) -> None:
    """A refused connection is no proof (a REJECT rule looks the same): only silence past
    the claim lease, in the database and to this leader since its term began, is."""
    clock = Clock()
    j = judge(db, Fake(answer), clock)
    member(db, "w1", "s-w1", "PYRO:w@127.0.0.1:1", silent=QUIET + 5)
    assert j({"s-w1": [(7, 1)]})["s-w1"].kind == Kind.UNKNOWN  # the term is new
    clock.t += QUIET
    assert j({"s-w1": [(7, 1)]})["s-w1"].kind == Kind.STOPPED
    member(db, "w1", "s-w1", "PYRO:w@127.0.0.1:1", silent=QUIET - 1)
    assert j({"s-w1": [(7, 1)]})["s-w1"].kind == Kind.UNKNOWN  # the database heard it


def test_a_worker_that_answered_this_leader_lately_is_not_counted_out(db: Database) -> None:
    clock = Clock()
    fake = Fake({"session": "s-w1", "running": [[7, 1]], "finished": []})
    j = judge(db, fake, clock)
    member(db, "w1", "s-w1", "PYRO:w@127.0.0.1:1", silent=100)
    clock.t += 50
    assert j({"s-w1": [(7, 1)]})["s-w1"].kind == Kind.ALIVE
    fake.answer = TimeoutError("cut")
    clock.t += QUIET - 1
    assert j({"s-w1": [(7, 1)]})["s-w1"].kind == Kind.UNKNOWN
    clock.t += 1
    assert j({"s-w1": [(7, 1)]})["s-w1"].kind == Kind.STOPPED


def test_recovery_records_a_reported_outcome_keeps_a_held_run_and_retries_an_unheld_one(
    db: Database
) -> None:
    lead(db, 1)
    reported, held, unheld = (running_run(db) for _ in range(3))
    member(db, "w1", "s-w1", "PYRO:w@127.0.0.1:1", silent=60)
    fake = Fake({"session": "s-w1", "running": [[held, 1]],
                 "finished": [[reported, 1, "succeeded", 1000.0, 1004.0, None]]})
    result = recover_runs(db, 1, live_workers=set(), grace_seconds=30,
                          judge=judge(db, fake, Clock()))
    assert (result.reported, result.lost, result.retried) == (1, 1, 1)
    r = status_of(db, reported)
    assert (r.status, r.attempt, r.duration) == (S.SUCCEEDED, 1, 4.0)
    assert "reported to the leader" in r.error
    assert (status_of(db, held).status, status_of(db, held).attempt) == (S.RUNNING, 1)
    u = status_of(db, unheld)
    assert (u.status, u.attempt) == (S.SCHEDULED, 2)
    assert "says it does not hold attempt 1" in u.error
    assert [r["run_id"] for r in result.resend] == [unheld]


def test_recovery_leaves_the_runs_of_an_unknown_session_alone(db: Database) -> None:
    lead(db, 1)
    run_id = running_run(db)
    member(db, "w1", "s-w1", "PYRO:w@127.0.0.1:1", silent=60)
    result = recover_runs(db, 1, live_workers=set(), grace_seconds=30,
                          judge=judge(db, Fake(TimeoutError("cut")), Clock()))
    assert (result.waiting, result.lost, result.resend) == (1, 0, [])
    assert status_of(db, run_id).status == S.RUNNING


def test_a_real_worker_reports_what_it_holds_and_what_it_could_not_write(db: Database) -> None:
    """Over the authenticated daemon: the worker of the claim answers ``report``; an
    outcome its writer still holds is reported finished; a call below its fence is
    refused; and the leader's judge makes sense of the answer."""
    lead(db, 3)
    w = RunningWorker(db, "w1")
    try:
        run_id = running_run(db, session=w.worker.session)
        w.worker.writer.stop()  # nothing is written from here on: the database "is away"
        w.worker.writer.finished(run_id, 1, S.SUCCEEDED, 1000.0, 1002.0, None)
        with proxy(w.uri, SECRET, 5) as p:
            answer = p.report(3, [[run_id, 1], [run_id + 50, 1]])
            lead(db, 4)
            assert w.worker._fence.admit(4) is None  # the fence rises to a confirmed epoch
            with pytest.raises(Exception, match="below this worker's fence"):
                p.report(3, [[run_id, 1]])
        assert answer == {"session": w.worker.session, "running": [],
                          "finished": [[run_id, 1, "succeeded", 1000.0, 1002.0, None]]}
        member(db, "w1", w.worker.session, w.uri, silent=60)
        j = SessionJudge(db, epoch=4, secret=SECRET, lease_seconds=LEASE, margin=FENCE_MARGIN)
        v = j({w.worker.session: [(run_id, 1)]})[w.worker.session]
        assert v.kind == Kind.ALIVE and v.report is not None
        assert v.report.finished == {(run_id, 1): Outcome(S.SUCCEEDED, 1000.0, 1002.0, None)}
    finally:
        w.stop()


def test_a_leader_past_its_lease_deadline_asks_no_worker(db: Database) -> None:
    """A deposed leader (a paused process that woke up) must not renew a worker's claim
    lease behind the next leader's back: it asks nothing, and counts no one out early."""
    member(db, "w1", "s-w1", "PYRO:w@127.0.0.1:1", silent=60)
    fake = Fake({"session": "s-w1", "running": [[7, 1]], "finished": []})
    j = SessionJudge(db, epoch=1, secret=SECRET, lease_seconds=LEASE, margin=FENCE_MARGIN,
                     connect=fake.connect, clock=Clock(), leading=lambda: False)
    v = j({"s-w1": [(7, 1)]})["s-w1"]
    assert (v.kind, fake.calls) == (Kind.UNKNOWN, [])
    assert "past its deadline" in v.reason


def test_a_session_whose_node_row_another_session_took_waits_a_lease_then_is_stopped(
    db: Database
) -> None:
    """A restart, or a second process given the same id: the old session may still run
    its runs until its next heartbeat ends it (or its lease runs out). It is not asked
    (its address went with the row) and is counted out only a claim lease after this
    leader first saw the row taken."""
    clock = Clock()
    member(db, "w1", "s-new", "PYRO:w@127.0.0.1:2", silent=0)
    fake = Fake({"session": "s-new", "running": [], "finished": []})
    j = judge(db, fake, clock)
    clock.t += 100  # the term is old: only the replacement's age counts
    v = j({"s-old": [(7, 1)]}, {"s-old": "w1"})["s-old"]
    assert v.kind == Kind.UNKNOWN and "registered by another session" in v.reason
    assert fake.calls == []
    clock.t += QUIET - 0.5
    assert j({"s-old": [(7, 1)]}, {"s-old": "w1"})["s-old"].kind == Kind.UNKNOWN
    clock.t += 0.5
    assert j({"s-old": [(7, 1)]}, {"s-old": "w1"})["s-old"].kind == Kind.STOPPED
    assert j({"s-gone": [(8, 1)]}, {"s-gone": "w9"})["s-gone"].kind == Kind.STOPPED
