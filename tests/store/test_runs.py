"""The owner of qc_runs (the qcluster/store/runs package), on SQLite and PostgreSQL: each
transition of the run state machine is made by its function, anything else is refused and
writes nothing; the run record round-trips and what the leader makes passes the worker's check;
and no other module writes the table."""

from __future__ import annotations

import ast
import dataclasses
import itertools
import json
import re
from pathlib import Path
from typing import Any

import msgpack
import pytest
import sqlalchemy as sa

from qcluster.definitions.jobdefs import JobDef
from qcluster.definitions.triggers import make_spec
from qcluster.errors import Fenced, InputError
from qcluster.leader.recovery import prune_runs, recover_runs
from qcluster.store import catalog, records, runs, schema
from qcluster.store.cluster import read_cluster
from qcluster.store.db import Database
from qcluster.store.records import RunRecord, from_wire, to_wire
from qcluster.store.runs import (
    TRANSITIONS,
    FireRow,
    Outcome,
    RunStatus,
    Transition,
    Writer,
)
from qcluster.worker.runner import check_batch

S = RunStatus
ROOT = Path(__file__).resolve().parents[2]
#: The keys every qcluster version sends for a run: the wire format, never to change.
WIRE_KEYS = {"run_id", "job_id", "func", "args", "kwargs", "scheduled_at", "attempt", "epoch",
             "recover"}


def epoch_of(db: Database) -> int:
    state = read_cluster(db)
    assert state is not None
    return state.epoch


def new_epoch(db: Database) -> int:
    """What a newer leader's take_epoch leaves behind: the cluster's epoch + 1."""
    epoch = epoch_of(db) + 1
    with db.write() as conn:
        conn.execute(schema.cluster.update().values(epoch=epoch))
    return epoch


_keys = itertools.count(1)


def fire(status: RunStatus = S.SCHEDULED, recover: bool = False) -> FireRow:
    n = next(_keys)
    # Each row is scheduled before the ones made earlier, so that pruning the times up to
    # a new row's removes no other row.
    return FireRow(f"job{n}", "jobs.builtin:noop", "[]", "{}", 1e6 - n, status, recover,
                   None if status == S.SCHEDULED else "why")


def insert(db: Database, status: RunStatus = S.SCHEDULED, recover: bool = False) -> int:
    """A new run row (through the owner), its id: written at its fire time, as a leader
    that keeps up writes it (recovery counts a grace from the later of the two)."""
    f = fire(status, recover)
    with db.fenced(epoch_of(db)) as conn:
        runs.insert_runs(conn, [f], epoch_of(db), "leader", now=f.scheduled_at)
        return int(conn.execute(sa.select(schema.runs.c.id)
                                .where(schema.runs.c.job_id == f.job_id)).scalar_one())


def force(db: Database, run_id: int, status: RunStatus, *, attempt: int = 1,
          session: str | None = "s1") -> None:
    """Put a row in a state for the test (tests may write the table; qcluster may not)."""
    with db.write() as conn:
        conn.execute(schema.runs.update().where(schema.runs.c.id == run_id).values(
            status=status, attempt=attempt, worker=session and "w1", worker_session=session,
            retries_left=1))


def row(db: Database, run_id: int) -> Any:
    with db.read() as conn:
        return conn.execute(sa.select(schema.runs).where(schema.runs.c.id == run_id)).one_or_none()


def record(db: Database, run_id: int) -> RunRecord:
    r = row(db, run_id)
    return records.run_record(r.id, r.job_id, r.func, r.args, r.kwargs, r.scheduled_at,
                              r.attempt, r.epoch, r.recover)


def claimed_ids(db: Database, recs: list[RunRecord], *, worker: str, session: str) -> set[int]:
    """The ids that :func:`runs.claim` took (it returns each as its row holds it)."""
    taken = runs.claim(db, recs, worker=worker, session=session)
    assert all(taken[key].record["attempt"] == key[1] for key in taken)
    return {run_id for run_id, _ in taken}


def make(db: Database, t: Transition, run_id: int, source: RunStatus) -> object:
    """Ask ``t.via`` for ``t.target`` on a row in ``source``; what the function answered."""
    epoch = epoch_of(db)
    if t.via == "claim":
        return claimed_ids(db, [record(db, run_id)], worker="w2", session="s2")
    if t.via == "write_outcomes":  # it says nothing: the row tells
        assert t.target is not None
        runs.write_outcomes(db, "s1", {(run_id, 1): Outcome(t.target, 5.0, 6.5, "e")})
        return None
    if t.via == "start":
        return {k[0] for k in runs.start(db, [(run_id, 1)], session="s1", now=5.0)}
    if t.via == "release":
        return runs.release(db, session="s1", keys=[(run_id, 1)])
    with db.fenced(epoch) as conn:
        return _make_fenced(conn, db, t, run_id, source, epoch)


def _make_fenced(conn: Any, db: Database, t: Transition, run_id: int, source: RunStatus,
                 epoch: int) -> object:
    """The leader's writes of :func:`make`, in its fenced transaction."""
    if t.via in ("withdraw", "insert_runs"):
        return _make_fire_ahead(conn, db, t, run_id, source, epoch)
    if t.via == "mark_missed":
        return runs.mark_missed(conn, run_id, 1, source, now=7.0, error="never sent")
    if t.via == "cancel":
        try:
            return runs.cancel(conn, run_id, now=7.0, reason="cancelled").status == t.target
        except InputError:
            return False
    if t.via == "mark_lost":
        return runs.mark_lost(conn, run_id, 1, source, now=7.0, error="worker left")
    if t.via == "retry":
        return runs.retry(conn, run_id, 1, epoch=epoch, now=7.0, error="again")
    if t.via == "prune":
        return runs.prune(conn, older_than=row(db, run_id).scheduled_at + 0.5)
    if t.via == "unclaim":
        return runs.unclaim(conn, run_id, 1, "s1")
    if t.via == "retry_failed":
        return runs.retry_failed(conn, run_id, 1, epoch=epoch, now=7.0, due_at=9.0,
                                 error="again")
    if t.via == "unbuffer":
        return runs.unbuffer(conn, run_id, epoch=epoch, now=7.0) is not None
    if t.via == "record_reported":
        assert t.target is not None
        return runs.record_reported(conn, run_id, 1, "s1", status=t.target, started=5.0,
                                    finished=6.5, error="e")
    raise AssertionError(t)


def _make_fire_ahead(conn: Any, db: Database, t: Transition, run_id: int,
                     source: RunStatus, epoch: int) -> object:
    """A run sent ahead withdrawn, and a withdrawn fire time recorded again."""
    if t.via == "withdraw":
        return bool(runs.withdraw(conn, [row(db, run_id).job_id], now=7.0, reason="test"))
    assert t.via == "insert_runs"  # the fire time of a withdrawn row recorded again
    assert t.target is not None
    was = row(db, run_id)
    if source == S.CANCELLED:
        conn.execute(schema.runs.update().where(schema.runs.c.id == run_id)
                     .values(error=runs.WITHDRAWN + "test"))
    again = FireRow(was.job_id, was.func, was.args, was.kwargs, was.scheduled_at,
                    t.target, False, None if t.target == S.SCHEDULED else "why")
    sent = runs.insert_runs(conn, [again], epoch, "leader")
    now = conn.execute(sa.select(schema.runs).where(schema.runs.c.id == run_id)).one()
    revived = now.status == t.target and now.attempt == was.attempt + 1
    assert revived == bool(sent) or t.target != S.SCHEDULED
    return revived


def test_every_allowed_transition_is_made_by_its_function(db: Database) -> None:
    for t in TRANSITIONS:
        if t.source is None:  # an insert
            assert t.target is not None
            f = fire(t.target)
            with db.fenced(epoch_of(db)) as conn:
                sent = runs.insert_runs(conn, [f], epoch_of(db), "leader")
            with db.read() as conn:
                (got,) = conn.execute(sa.select(schema.runs)
                                      .where(schema.runs.c.job_id == f.job_id)).all()
            assert got.status == t.target and got.attempt == 1, t
            assert [r["run_id"] for r in sent] == ([got.id] if t.target == S.SCHEDULED else [])
            assert (got.finished_at is not None) == (t.target in (S.MISSED, S.SKIPPED)), t
            continue
        run_id = insert(db)
        force(db, run_id, t.source, session=None if t.source == S.SCHEDULED else "s1")
        answer = make(db, t, run_id, t.source)
        after = row(db, run_id)
        if t.target is None:
            assert after is None and answer == 1, t
            continue
        assert after.status == t.target, t
        assert answer in (True, {run_id}, None, 1), (t, answer)
        if t.via == "claim":
            assert (after.worker, after.worker_session) == ("w2", "s2")
            assert after.dispatched_at is not None
        if t.via in ("retry", "release", "retry_failed", "insert_runs"):
            assert after.worker is None and after.worker_session is None
            assert after.attempt == (1 if t.via == "release" else 2)
        if t.via == "withdraw":
            assert after.error == "withdrawn: test"
        if t.via == "retry_failed":
            assert (after.due_at, after.retries_left) == (9.0, 0)
        if t.via == "start":
            assert after.started_at == 5.0
        if t.target in runs.states.ENDS and t.source is not None and t.via in (
                "write_outcomes", "record_reported"):
            assert (after.started_at, after.finished_at, after.duration) == (5.0, 6.5, 1.5)


def test_every_other_transition_is_refused_and_writes_nothing(db: Database) -> None:
    made = {(t.source, t.target, t.via) for t in TRANSITIONS}
    checked = 0
    # one of each function and target (inserts: the test below)
    for t in {(t.target, t.via): t for t in TRANSITIONS if t.source is not None}.values():
        for source in RunStatus:
            if (source, t.target, t.via) in made:
                continue
            if (t.via, source) == ("cancel", S.RUNNING):
                continue  # not a transition: marked, see the cancel tests
            run_id = insert(db)
            force(db, run_id, source)
            before = tuple(row(db, run_id))
            reads = {"mark_lost": S.LOST, "mark_missed": S.MISSED}
            target = reads.get(t.via)
            if target is not None and source not in runs.sources(target, Writer.LEADER, t.via):
                with pytest.raises(ValueError, match="does not become"):
                    make(db, t, run_id, source)
                answer = make(db, t, run_id, S.RUNNING if t.via == "mark_lost"
                              else S.DISPATCHED)  # what the caller read
            else:
                answer = make(db, t, run_id, source)
            assert answer in (False, set(), 0, None), (source, t, answer)
            assert tuple(row(db, run_id)) == before, (source, t)
            checked += 1
    assert checked > 30  # e.g. succeeded → running, lost → dispatched, scheduled → lost


def test_statuses_a_function_cannot_make_are_refused_before_any_write(db: Database) -> None:
    for status in set(RunStatus) - {S.SCHEDULED, S.MISSED, S.SKIPPED, S.BUFFERED}:
        with pytest.raises(ValueError, match="not recorded as"), \
                db.fenced(epoch_of(db)) as conn:
            runs.insert_runs(conn, [fire(S.SCHEDULED), fire(status)], epoch_of(db), "leader")
    with db.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(schema.runs)).scalar() == 0
    run_id = insert(db)
    force(db, run_id, S.RUNNING)
    before = tuple(row(db, run_id))
    for status in set(RunStatus) - set(runs.states.ENDS):
        with pytest.raises(ValueError, match="does not end as"):
            runs.write_outcomes(db, "s1", {(run_id, 1): Outcome(status, 5.0, 6.0, None)})
    assert tuple(row(db, run_id)) == before


def test_a_worker_writes_only_over_its_own_claim_not_a_newer_epochs(db: Database) -> None:
    """Worker 1 claims attempt 1; a newer leader declares it lost and retries it (attempt
    2, its epoch). Nothing worker 1 still sends for attempt 1 is written; worker 2's claim
    of attempt 2 is, and only worker 2 may write its outcome."""
    run_id = insert(db, recover=True)
    old = record(db, run_id)
    assert claimed_ids(db, [old], worker="w1", session="s1") == {run_id}
    assert claimed_ids(db, [old], worker="w2", session="s2") == set()  # one claim commits
    assert runs.start(db, [(run_id, 1)], session="s1", now=4.0) == {(run_id, 1)}
    epoch = new_epoch(db)
    result = recover_runs(db, epoch, live_workers=set(), grace_seconds=30)
    assert (result.lost, result.retried) == (1, 1)
    (again,) = result.resend
    assert (again["attempt"], again["epoch"]) == (2, epoch)
    retried = tuple(row(db, run_id))
    assert (row(db, run_id).status, row(db, run_id).epoch) == (S.SCHEDULED, epoch)
    assert runs.start(db, [(run_id, 1)], session="s1", now=5.0) == set()
    runs.write_outcomes(db, "s1", {(run_id, 1): Outcome(S.SUCCEEDED, 5.0, 6.0, None)})
    assert claimed_ids(db, [old], worker="w1", session="s1") == set()
    assert tuple(row(db, run_id)) == retried
    assert claimed_ids(db, [again], worker="w2", session="s2") == {run_id}
    assert runs.start(db, [(run_id, 2)], session="s1", now=5.0) == set()  # not its claim
    assert runs.start(db, [(run_id, 2)], session="s2", now=7.0) == {(run_id, 2)}
    runs.write_outcomes(db, "s1", {(run_id, 2): Outcome(S.FAILED, 5.0, 6.0, "not mine")})
    assert row(db, run_id).status == S.RUNNING
    runs.write_outcomes(db, "s2", {(run_id, 2): Outcome(S.SUCCEEDED, 8.0, 9.0, None)})
    assert (row(db, run_id).status, row(db, run_id).worker) == (S.SUCCEEDED, "w2")


def test_leader_writes_at_an_old_epoch_are_fenced_and_write_nothing(db: Database) -> None:
    old = epoch_of(db)
    run_id = insert(db)
    force(db, run_id, S.RUNNING)
    done = insert(db, S.MISSED)
    new_epoch(db)
    before = [tuple(row(db, i)) for i in (run_id, done)]
    with pytest.raises(Fenced):
        recover_runs(db, old, live_workers=set(), grace_seconds=30)
    with pytest.raises(Fenced):
        prune_runs(db, old, older_than=1e12)
    with pytest.raises(Fenced), db.fenced(old) as conn:
        runs.insert_runs(conn, [fire()], old, "stale")
    with pytest.raises(Fenced), db.fenced(old) as conn:
        catalog.run_now(conn, "job1", old, "stale")
    assert [tuple(row(db, i)) for i in (run_id, done)] == before
    with db.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(schema.runs)).scalar() == 2


def test_recovery_resends_unsent_runs_marks_old_ones_missed_and_keeps_fresh_ones(
    db: Database,
) -> None:
    epoch = new_epoch(db)
    fresh, unsent, late = insert(db), insert(db), insert(db)
    r = schema.runs
    with db.write() as conn:
        # ours, just recorded (the dispatcher has it); an earlier leader's, inside the
        # grace; an earlier leader's, long past it
        conn.execute(r.update().where(r.c.id == fresh).values(created_at=2e9 - 1))
        conn.execute(r.update().where(r.c.id == unsent).values(epoch=0, scheduled_at=2e9 - 10))
        conn.execute(r.update().where(r.c.id == late).values(epoch=0))
    result = recover_runs(db, epoch, live_workers=set(), grace_seconds=30, now=2e9)
    assert [r["run_id"] for r in result.resend] == [unsent] and result.missed == 1
    assert [row(db, i).status for i in (fresh, unsent, late)] == [S.SCHEDULED, S.SCHEDULED,
                                                                  S.MISSED]
    assert check_batch(epoch, result.resend, now=2e9) == result.resend


def test_the_claim_returns_each_run_as_its_row_holds_it(db: Database) -> None:
    """Only the run id and attempt of what the worker was sent are read: the claim hands
    back the row's job, function, arguments, fire time, epoch and recover flag."""
    run_id = insert(db)
    stored = record(db, run_id)
    lie = records.run_record(run_id, "other", "jobs.builtin:shell", '["rm", "-rf", "/"]',
                             '{"x": 1}', 5.0, 1, 2**62, True)
    taken = runs.claim(db, [lie], worker="w1", session="s1")
    assert taken == {(run_id, 1): runs.Claimed(stored, None, None)}
    assert row(db, run_id).status == S.DISPATCHED
    other = insert(db)
    later = records.run_record(other, "job", "jobs.builtin:noop", "[]", "{}", 5.0, 2, 1, False)
    assert runs.claim(db, [later], worker="w2", session="s2") == {}  # not at that attempt
    assert row(db, other).status == S.SCHEDULED


@pytest.mark.parametrize(("due_at", "timeout", "claimed"), [
    (None, None, (None, None)),
    (2000.5, 30.0, (2000.5, 30.0)),
    (1000.0 + 3 * 86400, 0.5, (1000.0 + records.MAX_AHEAD, 0.5)),  # held a day at most
    (1500.0, 0.0, (1500.0, None)),  # a timeout that is not positive bounds nothing
    (1500.0, -5.0, (1500.0, None)),
])
def test_the_claim_returns_the_rows_start_time_and_timeout_bounded(
    db: Database, due_at: float | None, timeout: float | None,
    claimed: tuple[float | None, float | None],
) -> None:
    run_id = insert(db)
    force_values(db, run_id, due_at=due_at, timeout=timeout)
    (taken,) = runs.claim(db, [record(db, run_id)], worker="w1", session="s1",
                          now=1000.0).values()
    assert (taken.due_at, taken.timeout) == claimed
    assert taken.start_at == (taken.record["scheduled_at"] if due_at is None else claimed[0])
    assert len(taken.record) == 9  # the wire record is unchanged


def force_values(db: Database, run_id: int, **values: object) -> None:
    with db.write() as conn:
        conn.execute(schema.runs.update().where(schema.runs.c.id == run_id).values(**values))


# -- the run record ---------------------------------------------------------------------------


def test_a_run_record_round_trips_through_the_wire_unchanged() -> None:
    rec = records.run_record(7, "j", "jobs.builtin:noop", "[1]", '{"a": 2}', 1000, 2, 5, True)
    assert isinstance(rec["scheduled_at"], float)
    assert set(to_wire(rec)) == WIRE_KEYS
    assert from_wire(to_wire(rec)) == rec
    for data in (msgpack.unpackb(msgpack.packb(to_wire(rec))), json.loads(json.dumps(rec))):
        assert from_wire(data) == rec
    assert from_wire({**rec, "scheduled_at": 1000}) == rec  # an int time comes back a float


@pytest.mark.parametrize(("change", "reason"), [
    ({"extra": 1}, "malformed run record$"),
    ({"attempt": True}, "attempt must be an integer from 1 to 2\\*\\*31 - 1"),
    ({"recover": 1}, "malformed run record: recover$"),
    ({"func": "x" * 401}, "run record too large"),
    ({"epoch": 0}, "epoch must be an integer from 1 to 2\\*\\*63 - 1"),
    ({"scheduled_at": 2e9 + 86401}, "scheduled_at is more than a day ahead"),
])
def test_from_wire_refuses_with_one_line(change: dict[str, Any], reason: str) -> None:
    rec = records.run_record(7, "j", "jobs.builtin:noop", "[]", "{}", 1000.0, 1, 5, False)
    with pytest.raises(InputError, match=reason) as info:
        from_wire({**rec, **change}, now=2e9)
    assert "\n" not in str(info.value)


def test_what_the_leader_makes_passes_the_workers_check(db: Database) -> None:
    epoch = new_epoch(db)  # a leader's: the first is 1
    with db.fenced(epoch) as conn:
        fired = runs.insert_runs(conn, [fire(), fire(), fire(S.MISSED)], epoch, "leader")
        catalog.upsert_jobs(conn, [JobDef("now", "jobs.examples:hello", make_spec(every="1h"),
                                          kwargs={"name": "z"}, recover=True)], replace=False)
        now = catalog.run_now(conn, "now", epoch, "leader")
    made = [*fired, now]
    assert len(made) == 3 and all(set(r) == WIRE_KEYS for r in made)
    assert check_batch(epoch, [to_wire(r) for r in made]) == made
    assert check_batch(epoch, msgpack.unpackb(msgpack.packb(made))) == made


# -- no other module writes qc_runs -----------------------------------------------------------

OWNER = ROOT / "qcluster" / "store" / "runs"  # the package
#: Alembic's revisions create and drop the table: schema changes, not row writes.
MIGRATIONS = ROOT / "qcluster" / "store" / "migrations"
_WRITES = {"insert", "update", "delete"}
_SQL_WRITE = re.compile(r"\b(insert\s+into|update|delete\s+from|truncate(\s+table)?)\s+"
                        r"(\w+\.)?\"?qc_runs\b", re.IGNORECASE)


def runs_writes(source: str) -> list[int]:
    """The lines of ``source`` that write qc_runs: ``.insert()``/``.update()``/``.delete()``
    of ``schema.runs`` or a name bound to it, ``insert(schema.runs)`` and the like, and SQL
    text that inserts into, updates, deletes from or truncates qc_runs."""
    tree = ast.parse(source)

    schemas, names = {"schema"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            schemas |= {a.asname for a in node.names if a.name == "schema" and a.asname}
            if (node.module or "").endswith("schema"):
                names |= {a.asname or a.name for a in node.names if a.name == "runs"}

    def is_table(node: ast.AST, names: set[str]) -> bool:
        return ((isinstance(node, ast.Attribute) and node.attr == "runs"
                 and (getattr(node.value, "id", None) or getattr(node.value, "attr", None))
                 in schemas)
                or (isinstance(node, ast.Name) and node.id in names))

    for _ in range(3):  # aliases of aliases
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None \
                    and is_table(node.value, names):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names |= {t.id for t in targets if isinstance(t, ast.Name)}
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            if name in _WRITES and (
                (isinstance(f, ast.Attribute) and is_table(f.value, names))
                or any(is_table(a, names) for a in node.args)
            ):
                found.add(node.lineno)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docstrings and _SQL_WRITE.search(node.value):
            found.add(node.lineno)
    return sorted(found)


@pytest.mark.parametrize("snippet", [
    "schema.runs.insert().values(x=1)",
    "conn.execute(schema.runs.update().where(x))",
    "from qcluster.store import schema\nr = schema.runs\nconn.execute(r.delete())",
    "r = schema.runs\nt = r\nt.update()",
    "from qcluster.store.schema import runs as table\ntable.insert()",
    "from qcluster.store import schema as s\ns.runs.delete()",
    "sqlite.insert(schema.runs).on_conflict_do_nothing()",
    "r = schema.runs\nsa.update(r).values(status='lost')",
    "sa.text('UPDATE qc_runs SET status = 1')",
    "sa.text(f'INSERT INTO qc_runs ({cols}) VALUES (1)')",
    "conn.exec_driver_sql('delete from qc_runs')",
])
def test_the_check_finds_a_write(snippet: str) -> None:
    assert runs_writes(snippet)


@pytest.mark.parametrize("snippet", [
    "sa.select(schema.runs).where(schema.runs.c.status == 'lost')",
    "r = schema.runs\nconn.execute(sa.select(r.c.id))",
    "claimed.update(ids)\nruns.update(x)\nruns.insert_runs(conn, fires, 1, 'a')",
    "schema.jobs.update().values(x=1)\nsa.text('SELECT * FROM qc_runs')",
    '"""Workers update qc_runs rows (a docstring)."""',
])
def test_the_check_lets_reads_and_other_tables_be(snippet: str) -> None:
    assert runs_writes(snippet) == []


def test_only_store_runs_writes_qc_runs() -> None:
    assert any(runs_writes(p.read_text()) for p in OWNER.rglob("*.py")), (
        "the check no longer sees the owner's own writes")
    offenders = [
        f"{path.relative_to(ROOT)}:{line}"
        for folder in ("qcluster", "backends")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if OWNER not in path.parents and MIGRATIONS not in path.parents
        for line in runs_writes(path.read_text())
    ]
    assert offenders == [], f"qc_runs written outside qcluster/store/runs/: {offenders}"


# -- bounded attempts, quarantine, cancel, runs no slot took ---------------------------------


def claim_and_start(db: Database, run_id: int, session: str) -> None:
    rec = record(db, run_id)
    assert claimed_ids(db, [rec], worker=f"w-{session}", session=session) == {run_id}
    assert runs.start(db, [(run_id, rec["attempt"])], session=session, now=5.0)


def test_a_run_whose_worker_died_on_two_attempts_is_quarantined(db: Database) -> None:
    run_id = insert(db, recover=True)
    epoch = new_epoch(db)
    claim_and_start(db, run_id, "s1")
    first = recover_runs(db, epoch, live_workers=set(), grace_seconds=30)
    assert (first.lost, first.retried, first.quarantined) == (1, 1, 0)
    assert (row(db, run_id).status, row(db, run_id).deaths) == (S.SCHEDULED, 1)
    claim_and_start(db, run_id, "s2")
    second = recover_runs(db, epoch, live_workers=set(), grace_seconds=30, max_attempts=10)
    assert (second.lost, second.retried, second.quarantined, second.resend) == (1, 0, 1, [])
    after = row(db, run_id)
    assert (after.status, after.attempt, after.deaths) == (S.LOST, 2, 2)
    assert after.error.startswith("quarantined: its worker died on 2 attempts; worker w-s2")
    assert recover_runs(db, epoch, live_workers=set(), grace_seconds=30).lost == 0


def test_a_job_whose_runs_keep_killing_their_worker_is_set_aside(db: Database) -> None:
    """Per-run quarantine alone let a recurring poison job kill a worker at every fire
    (an attack: 12 worker deaths in 60 s): its second quarantined run sets the job aside."""
    epoch = new_epoch(db)
    with db.fenced(epoch) as conn:
        catalog.upsert_jobs(conn, [JobDef("poison", "jobs.builtin:noop", make_spec(every="1h"),
                                          recover=True)], replace=False)
    j = schema.jobs

    def broken() -> Any:
        with db.read() as conn:
            return conn.execute(sa.select(j.c.broken).where(j.c.id == "poison")).scalar_one()

    def quarantine(at: float) -> None:
        with db.fenced(epoch) as conn:
            run_id = catalog.run_now(conn, "poison", epoch, "leader", now=at)["run_id"]
        for session in (f"a{at}", f"b{at}"):
            claim_and_start(db, run_id, session)
            recover_runs(db, epoch, live_workers=set(), grace_seconds=1e9, max_attempts=10)
        assert row(db, run_id).error.startswith("quarantined:")

    quarantine(1001.0)
    assert broken() is None  # one poison run: only the run is quarantined
    # a run that succeeds in between: the two quarantined ones were bad luck (the soak's
    # worker kills), not a poison job
    with db.fenced(epoch) as conn:
        ok = catalog.run_now(conn, "poison", epoch, "leader", now=1001.5)["run_id"]
    claim_and_start(db, ok, "ok")
    runs.write_outcomes(db, "ok", {(ok, 1): runs.Outcome(S.SUCCEEDED, 1001.5, 1001.6, None)})
    quarantine(1002.0)
    assert broken() is None
    quarantine(1003.0)  # two in a row
    assert broken().startswith("quarantined: 2 of its runs killed their worker")


@pytest.mark.parametrize("recover", [True, False], ids=["recover", "no-recover"])
def test_a_run_whose_worker_stopped_before_starting_it_is_sent_again_at_the_same_attempt(
    db: Database, recover: bool
) -> None:
    """Claimed (``dispatched``) but never started when its worker is known to have
    stopped: its code never ran (a run starts only once ``running``), so it is not lost
    and uses no attempt, ``recover`` or not: the claim is undone and the run is sent
    again (the soak of 2026-12-01 found a tick recorded ``lost`` that never ran, its
    worker killed between claim and start). The stopped session can no longer start it."""
    epoch = new_epoch(db)
    run_id = insert(db, recover=recover)
    for session in ("s1", "s2"):
        assert claimed_ids(db, [record(db, run_id)], worker="w", session=session)
        result = recover_runs(db, epoch, live_workers=set(), grace_seconds=1e9)
        assert (result.unclaimed, result.lost, result.retried) == (1, 0, 0)
        after = row(db, run_id)
        assert (after.status, after.attempt, after.deaths, after.worker_session) == (
            S.SCHEDULED, 1, 0, None)
        assert runs.start(db, [(run_id, 1)], session=session, now=5.0) == set()
    resent = recover_runs(db, epoch, live_workers=set(), grace_seconds=1e10,
                          now=row(db, run_id).created_at + 60)
    assert [r["run_id"] for r in resent.resend] == [run_id]


def test_a_claimed_run_no_worker_started_within_the_grace_is_missed_and_cannot_start(
    db: Database,
) -> None:
    epoch = new_epoch(db)
    run_id = insert(db)  # scheduled at about 1e6
    assert claimed_ids(db, [record(db, run_id)], worker="w1", session="s1")
    live = {("w1", "s1")}
    sched = row(db, run_id).scheduled_at
    assert recover_runs(db, epoch, live_workers=live, grace_seconds=30, now=sched + 29).missed == 0
    assert row(db, run_id).status == S.DISPATCHED
    result = recover_runs(db, epoch, live_workers=live, grace_seconds=30, now=sched + 31)
    assert result.missed == 1 and result.lost == 0
    after = row(db, run_id)
    assert after.status == S.MISSED and "no free worker slot" in after.error
    assert runs.start(db, [(run_id, 1)], session="s1", now=5.0) == set()  # never starts
    assert row(db, run_id).status == S.MISSED
    # and the other order: a run that started first is left to run
    other = insert(db)
    claim_and_start(db, other, "s1")
    assert recover_runs(db, epoch, live_workers={("w-s1", "s1")}, grace_seconds=30,
                        now=2e9).missed == 0
    assert row(db, other).status == S.RUNNING


@pytest.mark.parametrize("claimed", [False, True])
def test_a_run_written_after_its_fire_time_has_its_grace_from_when_it_was_written(
    db: Database, claimed: bool,
) -> None:
    """Issue 15's attack: a ``run-once`` make-up run (1 s grace, a catch-up window) is
    written 20 s after its fire time; recovery recorded it missed before a worker could
    start it. Its grace now counts from when the leader wrote it, sent or claimed."""
    epoch = new_epoch(db)
    f = fire()
    written = f.scheduled_at + 20
    with db.fenced(epoch) as conn:
        runs.insert_runs(conn, [f], epoch, "old-leader", now=written)
    run_id = next(r.id for r in all_rows(db) if r.job_id == f.job_id)
    new_epoch(db)  # a later leader's recovery: the row is not its dispatcher's own
    epoch = epoch_of(db)
    live = {("w1", "s1")}
    if claimed:
        assert claimed_ids(db, [record(db, run_id)], worker="w1", session="s1")
    within = recover_runs(db, epoch, live_workers=live, grace_seconds=1, now=written + 0.5)
    assert within.missed == 0
    assert row(db, run_id).status == (S.DISPATCHED if claimed else S.SCHEDULED)
    assert [r["run_id"] for r in within.resend] == ([] if claimed else [run_id])
    past = recover_runs(db, epoch, live_workers=live, grace_seconds=1, now=written + 1.5)
    assert past.missed == 1
    assert row(db, run_id).status == S.MISSED


def test_cancel_stops_every_further_attempt_and_refuses_finished_or_unknown_runs(
    db: Database,
) -> None:
    epoch = new_epoch(db)
    waiting, claimed, running = insert(db), insert(db, recover=True), insert(db, recover=True)
    assert claimed_ids(db, [record(db, claimed)], worker="w1", session="s1")
    claim_and_start(db, running, "s1")
    with db.fenced(epoch) as conn:
        assert runs.cancel(conn, waiting, now=7.0, reason="cancelled: test").status == S.CANCELLED
        assert runs.cancel(conn, claimed, now=7.0, reason="cancelled: test").status == S.CANCELLED
        assert runs.cancel(conn, running, now=7.0, reason="cancelled: test").status == S.RUNNING
    assert [row(db, i).status for i in (waiting, claimed, running)] == [
        S.CANCELLED, S.CANCELLED, S.RUNNING]
    assert row(db, waiting).error == "cancelled: test"
    assert runs.start(db, [(claimed, 1)], session="s1", now=8.0) == set()
    for run_id, message in ((waiting, f"run {waiting} has already finished \\(cancelled\\)"),
                            (10**9, "no run 1000000000")):
        before = [tuple(r) for r in all_rows(db)]
        with pytest.raises(InputError, match=message), db.fenced(epoch) as conn:
            runs.cancel(conn, run_id, now=9.0, reason="x")
        assert [tuple(r) for r in all_rows(db)] == before
    # its worker dies: lost, and no new attempt although the job recovers
    result = recover_runs(db, epoch, live_workers=set(), grace_seconds=30)
    assert (result.lost, result.retried) == (1, 0)
    assert row(db, running).error.startswith("cancelled: no further attempt")


def test_removing_a_job_cancels_its_open_runs(db: Database) -> None:
    from qcluster.store.cancels import remove_job

    epoch = new_epoch(db)
    spec = make_spec(every="1h")
    with db.fenced(epoch) as conn:
        catalog.upsert_jobs(conn, [JobDef("gone", "jobs.builtin:noop", spec, recover=True,
                                          max_attempts=5)], replace=False)
        first = catalog.run_now(conn, "gone", epoch, "leader")["run_id"]
    assert row(db, first).max_attempts == 5
    claim_and_start(db, first, "s1")
    with db.fenced(epoch) as conn:
        second = catalog.run_now(conn, "gone", epoch, "leader")["run_id"]
        remove_job(conn, "gone")
    assert row(db, second).status == S.CANCELLED
    assert row(db, second).error == "cancelled: its job was removed"
    assert (row(db, first).status, row(db, first).cancel_requested is not None) == (
        S.RUNNING, True)


def all_rows(db: Database) -> list[Any]:
    with db.read() as conn:
        return list(conn.execute(sa.select(schema.runs).order_by(schema.runs.c.id)))


@pytest.mark.parametrize("status", [S.SKIPPED, S.MISSED, S.SCHEDULED, S.BUFFERED])
def test_a_run_recorded_ended_has_no_retries_left(db: Database, status: RunStatus) -> None:
    """Issue 15's second attack: ``skipped`` rows of a job with ``--retries 2`` showed
    ``retries_left = 2``; a row that is recorded ended (skipped, missed) is never tried
    again, so it says 0. One that is to run keeps its job's retries."""
    epoch = new_epoch(db)
    f = dataclasses.replace(fire(status), retries=2)
    with db.fenced(epoch) as conn:
        runs.insert_runs(conn, [f], epoch, "leader", now=f.scheduled_at)
    (r,) = [r for r in all_rows(db) if r.job_id == f.job_id]
    assert r.retries_left == (2 if status in (S.SCHEDULED, S.BUFFERED) else 0)


def outputs(db: Database, run_id: int) -> list[tuple[int, str | None, str | None]]:
    o = schema.run_output
    with db.read() as conn:
        return [tuple(r) for r in conn.execute(  # type: ignore[misc]
            sa.select(o.c.attempt, o.c.output, o.c.result).where(o.c.run_id == run_id)
            .order_by(o.c.attempt))]


def test_a_runs_output_is_written_with_its_outcome_only_over_its_claim_once_and_pruned(
    db: Database
) -> None:
    """Issue 17 item 1: the output goes where the outcome went (the same claim, attempt and
    end), each attempt its own; written again (a lost commit answer) it stays as it was;
    a claim that lost the run writes none; pruning a run takes its output."""
    run_id = insert(db, recover=True)
    assert claimed_ids(db, [record(db, run_id)], worker="w1", session="s1") == {run_id}
    assert runs.start(db, [(run_id, 1)], session="s1", now=4.0) == {(run_id, 1)}
    runs.write_outcomes(db, "s1", {(run_id, 1): Outcome(S.FAILED, 5.0, 6.0, "E: x",
                                                        "attempt 1 said\n", None)})
    runs.write_outcomes(db, "s1", {(run_id, 1): Outcome(S.FAILED, 5.0, 6.0, "E: x",
                                                        "a second write\n", None)})
    assert outputs(db, run_id) == [(1, "attempt 1 said\n", None)]
    runs.write_outcomes(db, "s9", {(run_id, 1): Outcome(S.SUCCEEDED, 5.0, 7.0, None,
                                                        "not its claim", "'x'")})
    assert outputs(db, run_id) == [(1, "attempt 1 said\n", None)]
    quiet = insert(db)
    assert claimed_ids(db, [record(db, quiet)], worker="w1", session="s1") == {quiet}
    assert runs.start(db, [(quiet, 1)], session="s1", now=4.0) == {(quiet, 1)}
    runs.write_outcomes(db, "s1", {(quiet, 1): Outcome(S.SUCCEEDED, 5.0, 6.0, None)})
    assert outputs(db, quiet) == []
    with db.read() as conn:
        listed = {r["run_id"]: r["has_output"] for r in catalog.list_runs(conn, limit=0)}
        shown = catalog.get_run(conn, run_id)
    assert (listed[run_id], listed[quiet]) == (True, False)
    assert shown["attempts"] == [{"attempt": 1, "output": "attempt 1 said\n", "result": None}]
    with db.fenced(epoch_of(db)) as conn:
        assert runs.prune(conn, older_than=row(db, run_id).scheduled_at + 0.5) >= 1
    assert row(db, run_id) is None and outputs(db, run_id) == []
