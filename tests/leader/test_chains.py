"""Dependent jobs (issue 16, item 1), on SQLite and PostgreSQL: the chain pass
(``leader/chains.py``, run by every recovery pass) records each child's run once per parent
fire time, when its parents' runs have ended as it asks; what the catalog refuses (cycles,
a parent that is no job, removing a parent with children). The real-process test with a
leader and a worker killed mid-chain is in tests/cluster/test_chains.py."""

from __future__ import annotations

import time
from typing import Any

import pytest
import sqlalchemy as sa

from qcluster.definitions.jobdefs import validate_job
from qcluster.definitions.triggers import make_spec
from qcluster.errors import InputError
from qcluster.leader import chains, role
from qcluster.leader.recovery import RecoveryResult, recover_runs
from qcluster.store import cancels, catalog, schema
from qcluster.store.db import Database
from qcluster.store.runs import RunStatus
from tests.conftest import DatabaseFactory
from tests.helpers import wait_for
from tests.leader.test_policies import ALLOW, BASE, _add, _epoch, _fire, _runs, _set
from tests.leader.test_terms import _leading

S = RunStatus


def _child(db: Database, job_id: str, *after: str, **fields: Any) -> None:
    jd = validate_job({"id": job_id, "func": "jobs.builtin:noop",
                       "trigger": make_spec(after=list(after)), **fields}, ALLOW)
    with db.fenced(_epoch(db)) as conn:
        catalog.upsert_jobs(conn, [jd], replace=True)


def _pass(db: Database, at: float, *, grace: float = 30) -> RecoveryResult:
    return recover_runs(db, _epoch(db), live_workers=set(), grace_seconds=grace, now=at,
                        leader="n1")


def _end(db: Database, job_id: str, status: RunStatus = S.SUCCEEDED, *, at: float = BASE,
         retries_left: int = 0) -> int:
    (row,) = [r for r in _runs(db, job_id) if r.scheduled_at == at]
    _set(db, row.id, status=status, finished_at=at + 1, retries_left=retries_left)
    return int(row.id)


def _only(db: Database, job_id: str) -> Any:
    rows = _runs(db, job_id)
    assert len(rows) == 1, [(r.scheduled_at, r.status) for r in rows]
    return rows[0]


def test_a_chain_runs_each_child_once_per_parent_run_and_a_retried_parent_once(
        db: Database) -> None:
    _add(db, "a", retries=2)
    _child(db, "b", "a")
    _child(db, "c", "b")
    _fire(db, BASE)
    assert _only(db, "a").chain is True
    assert _pass(db, BASE + 0.5).chained == {}  # a has not ended: no child yet
    _end(db, "a", S.FAILED, retries_left=2)  # a retry is to come: not ended for b
    _pass(db, BASE + 1)  # (it retries a: scheduled again, attempt 2)
    assert not _runs(db, "b")
    assert _only(db, "a").attempt == 2
    parent = _end(db, "a", S.SUCCEEDED)
    result = _pass(db, BASE + 2)
    b = _only(db, "b")
    assert (b.status, b.scheduled_at, b.parent_run, b.due_at) == (S.SCHEDULED, BASE, parent,
                                                                  BASE + 2)
    assert [r["run_id"] for r in result.resend if r["job_id"] == "b"] == [b.id]
    assert result.chained == {"scheduled": 1}
    assert _only(db, "a").chain is None  # decided
    assert b.chain is True  # b has a child of its own
    for later in (3, 4):  # passes again (a new leader's, say): nothing more
        assert _pass(db, BASE + later).chained == {}
    _end(db, "b", S.SUCCEEDED)
    _pass(db, BASE + 5)
    c = _only(db, "c")
    assert (c.status, c.parent_run) == (S.SCHEDULED, b.id)
    assert len(_runs(db, "b")) == 1


def test_a_child_on_success_is_skipped_with_the_reason_and_one_on_failure_runs(
        db: Database) -> None:
    _add(db, "a")
    _child(db, "ok", "a")
    _child(db, "bad", "a:failure")
    _child(db, "any", "a:always")
    _fire(db, BASE)
    parent = _end(db, "a", S.TIMED_OUT)
    assert _pass(db, BASE + 2).chained == {"skipped": 1, "scheduled": 2}
    ok = _only(db, "ok")
    assert ok.status == S.SKIPPED and ok.parent_run == parent
    assert ok.error == f"after 'a': its run {parent} ended timed_out ('ok' runs after it on " \
                      "success)"
    assert _only(db, "bad").status == S.SCHEDULED
    assert _only(db, "any").status == S.SCHEDULED


def test_a_parent_that_never_ran_skips_its_child_and_a_paused_child_is_skipped(
        db: Database) -> None:
    _add(db, "a")
    _add(db, "p")
    _child(db, "b", "a:always")
    _child(db, "q", "p")
    _fire(db, BASE)
    _end(db, "a", S.MISSED)
    _end(db, "p", S.SUCCEEDED)
    with db.fenced(_epoch(db)) as conn:
        catalog.pause_job(conn, "q")
    _pass(db, BASE + 2)
    assert _only(db, "b").status == S.SKIPPED
    assert "ended missed (its code did not run)" in _only(db, "b").error
    q = _only(db, "q")
    assert (q.status, q.error) == (S.SKIPPED, "'q' is paused")


def test_two_parents_join_on_the_same_fire_time_and_an_absent_one_is_missed_after_the_grace(
        db: Database) -> None:
    _add(db, "a")
    _add(db, "c")
    _add(db, "lone")
    _add(db, "never")
    _child(db, "b", "a", "c")
    _child(db, "d", "lone", "never")  # "never" has no run at BASE
    with db.fenced(_epoch(db)) as conn:  # a parent on another schedule: no run at BASE
        conn.execute(schema.jobs.update().where(schema.jobs.c.id == "never")
                     .values(next_run_time=BASE + 3600))
    _fire(db, BASE)
    _end(db, "a")
    assert _pass(db, BASE + 2).chained == {}  # c is still open: b waits
    _end(db, "c")
    _end(db, "lone")
    assert _pass(db, BASE + 3).chained == {"scheduled": 1}
    assert _only(db, "b").status == S.SCHEDULED
    assert not _runs(db, "d")  # within the grace: d waits for "never"
    assert _pass(db, BASE + 31).chained == {"missed": 1}
    d = _only(db, "d")
    assert d.status == S.MISSED and d.error.startswith("after 'never': it has no run")
    assert _pass(db, BASE + 40).chained == {}


def _write(db: Database, *defs: Any, prune: bool = False) -> None:
    with db.fenced(_epoch(db)) as conn:
        cancels.upsert_jobs(conn, list(defs), replace=True, prune=prune)


def _def(job_id: str, *after: str, every: str | None = None) -> Any:
    spec = make_spec(after=list(after)) if after else make_spec(every=every or "1m")
    return validate_job({"id": job_id, "func": "jobs.builtin:noop", "trigger": spec}, ALLOW)


def _edges(db: Database) -> list[tuple[str, str, str]]:
    d = schema.job_deps
    with db.read() as conn:
        return sorted(tuple(r) for r in conn.execute(
            sa.select(d.c.child_id, d.c.parent_id, d.c.condition)))


def test_what_the_catalog_refuses_leaves_the_jobs_and_their_edges_as_they_were(
        db: Database) -> None:
    _write(db, _def("a"), _def("b", "a"), _def("c", "b:always"))
    before = _edges(db)
    assert before == [("b", "a", "success"), ("c", "b", "always")]
    with pytest.raises(InputError, match=r"a cycle of dependent jobs: 'a' -> 'c' -> 'b' -> 'a'"):
        _write(db, _def("a", "c"))
    with pytest.raises(InputError, match="runs after 'ghost', which is no job"):
        _write(db, _def("x", "ghost"))
    with db.fenced(_epoch(db)) as conn, pytest.raises(InputError, match="'c' runs after 'b'"):
        cancels.remove_job(conn, "b")
    with pytest.raises(InputError, match="'b' runs after 'a'"):
        _write(db, _def("b", "a"), _def("c", "b"), prune=True)  # a would go, b stays
    with pytest.raises(InputError, match="cannot run after itself"):
        _def("s", "s")
    with pytest.raises(InputError, match="jitter applies to a schedule"):
        validate_job({"id": "j", "func": "jobs.builtin:noop", "jitter": 5,
                      "trigger": make_spec(after=["a"])}, ALLOW)
    assert _edges(db) == before
    with db.read() as conn:
        assert [j["id"] for j in catalog.list_jobs(conn)] == ["a", "b", "c"]
        assert catalog.get_job(conn, "b")["children"] == ["c"]
    _write(db, _def("c", every="5m"))  # c no longer runs after b: its edge goes
    assert _edges(db) == [("b", "a", "success")]
    with db.fenced(_epoch(db)) as conn:
        cancels.remove_job(conn, "c")
        cancels.remove_job(conn, "b")
        cancels.remove_job(conn, "a")
    assert _edges(db) == []


def test_a_dependency_written_both_ways_at_once_is_refused_once(db: Database) -> None:
    _write(db, _def("a"), _def("b"))
    with pytest.raises(InputError, match="a cycle"):
        _write(db, _def("a", "b"), _def("b", "a"))
    assert _edges(db) == []


def test_a_leader_decides_a_child_between_two_recovery_passes(
        sqlite_url: str, make_db: DatabaseFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no recovery pass for an hour, the leader's chain pass (every CHAIN_INTERVAL,
    when a marked run has ended) still records the child soon after its parent ends."""
    monkeypatch.setattr(role, "RECOVERY_INTERVAL", 3600.0)
    db = make_db(sqlite_url, backend="memory")
    _add(db, "a", next_at=BASE + 3600)
    _child(db, "b", "a")
    with _leading(db) as led:
        epoch = led.leader.epoch
        assert epoch is not None
        with db.fenced(epoch) as conn:
            parent = catalog.run_now(conn, "a", epoch, "cli")["run_id"]
        # Ended now: BASE is a time near the test module's import, minutes before this
        # runs in a long suite, older than what the check between passes reads.
        _set(db, parent, status=S.SUCCEEDED, finished_at=time.time())
        b = wait_for(lambda: _runs(db, "b"), 10.0, 0.02, "b's run")[0]
        assert (b.parent_run, b.status) == (parent, S.SCHEDULED)
        assert not led.revoked


def test_runs_that_wait_for_long_do_not_hold_back_the_other_chains(
        db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """A join whose other parent never runs, within a grace of years, leaves its parent's
    runs marked: more of them than a pass reads must not stop every other chain (found by
    an outside look: 5,000 such runs stopped every child of the cluster)."""
    monkeypatch.setattr(chains, "PER_PASS", 3)
    _add(db, "p")
    _add(db, "z", next_at=BASE + 86400)
    _child(db, "j", "p", "z", misfire_grace_seconds=2**31 - 1)
    _add(db, "a")
    _child(db, "b", "a")
    epoch = _epoch(db)
    with db.fenced(epoch) as conn:
        stuck = [catalog.run_now(conn, "p", epoch, "cli", now=BASE + i)["run_id"]
                 for i in range(7)]
        parent = catalog.run_now(conn, "a", epoch, "cli", now=BASE + 10)["run_id"]
    for run_id in [*stuck, parent]:
        _set(db, run_id, status=S.SUCCEEDED, finished_at=BASE + 11)
    cursor = None
    for n in range(4):  # 8 marked runs, 3 a pass: the last is read by the third pass
        result = recover_runs(db, epoch, live_workers=set(), grace_seconds=30,
                              now=BASE + 12 + n, leader="n1", chain_after=cursor)
        cursor = result.chain_cursor
    b = _only(db, "b")
    assert (b.parent_run, b.status) == (parent, S.SCHEDULED)
    assert not _runs(db, "j")  # still waiting for z, within its grace


def test_a_child_whose_policy_cannot_be_read_is_skipped_with_the_reason(db: Database) -> None:
    _add(db, "a")
    _child(db, "b", "a")
    with db.write() as conn:  # a row written by hand, or by a newer version
        conn.execute(schema.jobs.update().where(schema.jobs.c.id == "b")
                     .values(policy='{"retries": "many"}'))
    _fire(db, BASE)
    parent = _end(db, "a")
    _pass(db, BASE + 2)
    b = _only(db, "b")
    assert (b.status, b.parent_run) == (S.SKIPPED, parent)
    assert b.error.startswith("'b' has an unreadable policy: ")
