"""Runs sent ahead of their fire time (``[scheduler] fire_ahead_seconds``) are withdrawn
when their job changes, so a change applies at once (issue 18, item 1), on SQLite and
PostgreSQL: a pause, an update or a removal inside the window cancels the runs already
sent (``cancelled``, ``withdrawn: ...``), a worker holding one cannot start it, and a
withdrawn fire time that the job's schedule still has is recorded again in the same row,
one attempt later, under the job as it now is. A pause that commits between a pass's read
and its commit leaves no run of the ahead fire. The real-process test is in
tests/cluster/test_process.py."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from qcluster.definitions.jobdefs import validate_job
from qcluster.definitions.triggers import make_spec
from qcluster.leader.scheduler import FireExecutor, LeaderScheduler
from qcluster.store import cancels, catalog, runs, schema
from qcluster.store.cluster import read_cluster
from qcluster.store.db import Database
from qcluster.store.jobstore import SqlJobStore
from qcluster.store.records import RunRecord
from qcluster.store.runs import RunStatus

S = RunStatus
ALLOW = ["jobs.*"]
AHEAD = 3.0


def _epoch(db: Database) -> int:
    state = read_cluster(db)
    assert state is not None
    return state.epoch


def _job(job_id: str, **fields: Any) -> Any:
    spec = make_spec(every="10s", now=datetime.fromtimestamp(_anchor(), UTC))
    return validate_job({"id": job_id, "func": "jobs.builtin:noop", "trigger": spec,
                         **fields}, ALLOW)


def _anchor() -> float:
    return float(int(time.time()) // 10 * 10 - 100)


def _add(db: Database, job_id: str, **fields: Any) -> None:
    """Add or update the job; a new one's first fire time is at least 10 s away by the
    real clock (a withdrawal is judged by the database's), a fire time of its interval."""
    with db.fenced(_epoch(db)) as conn:
        result = cancels.upsert_jobs(conn, [_job(job_id, **fields)], replace=True)
    if result.created:
        with db.write() as conn:  # tests may write the table to set a scene
            j = schema.jobs
            conn.execute(j.update().where(j.c.id == job_id, j.c.next_run_time < time.time() + 10)
                         .values(next_run_time=j.c.next_run_time + 10))


def _next_at(db: Database, job_id: str) -> float | None:
    with db.read() as conn:
        return catalog.job_row(conn, job_id).next_run_time  # type: ignore[no-any-return]


def _fire_ahead(db: Database, job_id: str) -> tuple[list[RunRecord], float]:
    """One pass at a time ``AHEAD`` seconds before the job's next fire time (so that fire
    is ahead); the runs sent and that 'now'."""
    at = _next_at(db, job_id)
    assert at is not None
    now = at - AHEAD + 0.5
    return _pass(db, now), now


def _pass(db: Database, now: float, store: SqlJobStore | None = None,
          due: list[Any] | None = None) -> list[RunRecord]:
    epoch = _epoch(db)
    store = store or SqlJobStore(db, lambda: epoch, misfire_grace_seconds=30, coalesce=True)
    sent: list[RunRecord] = []
    executor = FireExecutor(store, epoch, "leader", sent.extend, retention_seconds=86400)
    at = datetime.fromtimestamp(now, UTC)
    horizon = datetime.fromtimestamp(now + AHEAD, UTC)
    executor.fire(store.get_due_jobs(horizon) if due is None else due, at, horizon)
    return sent


def _rows(db: Database, job_id: str) -> list[Any]:
    r = schema.runs
    with db.read() as conn:
        return list(conn.execute(sa.select(r).where(r.c.job_id == job_id)
                                 .order_by(r.c.scheduled_at)))


def _claim(db: Database, sent: list[RunRecord]) -> None:
    assert runs.claim(db, sent, worker="w", session="s")


@pytest.mark.parametrize("change", ["pause", "remove", "prune", "update-other-schedule"])
def test_a_change_inside_the_window_withdraws_the_runs_sent_ahead(
    db: Database, change: str
) -> None:
    _add(db, "j")
    sent, _ = _fire_ahead(db, "j")
    assert len(sent) == 1
    _claim(db, sent)  # a worker holds it, waiting for its time
    with db.fenced(_epoch(db)) as conn:
        if change == "pause":
            cancels.pause_job(conn, "j")
        elif change == "remove":
            cancels.remove_job(conn, "j")
        elif change == "prune":
            cancels.upsert_jobs(conn, [_job("other")], replace=True, prune=True)
        else:
            spec = make_spec(cron="0 0 1 1 *")
            jd = validate_job({"id": "j", "func": "jobs.builtin:noop", "trigger": spec},
                              ALLOW)
            cancels.upsert_jobs(conn, [jd], replace=True)
    (row,) = _rows(db, "j")
    why = {"pause": "paused", "remove": "removed", "prune": "removed"}.get(change, "updated")
    assert (row.status, row.error) == (S.CANCELLED, f"withdrawn: its job was {why}")
    assert row.retries_left == 0 and row.cancel_requested is not None
    run_id = sent[0]["run_id"]
    assert runs.start(db, [(run_id, 1)], session="s", now=row.scheduled_at) == set()
    if change == "update-other-schedule":  # its next fire follows the new schedule
        assert _next_at(db, "j") != row.scheduled_at


def test_a_paused_and_resumed_job_fires_the_withdrawn_time_again_in_the_same_row(
    db: Database,
) -> None:
    _add(db, "j")
    sent, now = _fire_ahead(db, "j")
    _claim(db, sent)
    with db.fenced(_epoch(db)) as conn:
        cancels.pause_job(conn, "j")
    with db.fenced(_epoch(db)) as conn:
        catalog.resume_job(conn, "j", now=now)  # resumed before the withdrawn time came
    again = _pass(db, now + 0.1)
    assert [(r["run_id"], r["attempt"]) for r in again] == [(sent[0]["run_id"], 2)]
    (row,) = _rows(db, "j")
    assert (row.status, row.attempt, row.error, row.worker, row.cancel_requested) == (
        S.SCHEDULED, 2, None, None, None)
    assert runs.start(db, [(row.id, 1)], session="s", now=row.scheduled_at) == set()
    _claim(db, again)  # the new attempt is new to the worker that held the old one
    assert runs.start(db, [(row.id, 2)], session="s", now=row.scheduled_at) == {(row.id, 2)}


def test_an_update_that_keeps_the_schedule_fires_the_withdrawn_time_as_it_now_is(
    db: Database,
) -> None:
    _add(db, "j", kwargs={"v": 1})
    sent, now = _fire_ahead(db, "j")
    fire_time = sent[0]["scheduled_at"]
    assert _next_at(db, "j") == fire_time + 10  # the pass moved it on
    _add(db, "j", kwargs={"v": 2})
    assert _next_at(db, "j") == fire_time  # set back to the withdrawn time
    again = _pass(db, now + 0.1)
    assert [(r["scheduled_at"], r["attempt"], r["kwargs"]) for r in again] == [
        (fire_time, 2, '{"v": 2}')]
    assert len(_rows(db, "j")) == 1


def test_a_run_whose_fire_time_has_come_is_not_withdrawn(db: Database) -> None:
    _add(db, "j")
    with db.write() as conn:  # tests may write the table to set a scene
        conn.execute(schema.jobs.update().values(next_run_time=float(int(time.time()) - 2)))
    sent = _pass(db, time.time())  # due (by the database's clock too), not ahead
    with db.fenced(_epoch(db)) as conn:
        cancels.pause_job(conn, "j")
    assert [r.status for r in _rows(db, "j") if r.id == sent[0]["run_id"]] == [S.SCHEDULED]


def test_a_pause_committed_between_a_pass_read_and_its_commit_leaves_no_ahead_run(
    db: Database,
) -> None:
    _add(db, "j")
    at = _next_at(db, "j")
    assert at is not None
    epoch = _epoch(db)
    store = SqlJobStore(db, lambda: epoch, misfire_grace_seconds=30, coalesce=True)
    now = at - AHEAD + 0.5
    due = store.get_due_jobs(datetime.fromtimestamp(now + AHEAD, UTC))
    assert [j.id for j in due] == ["j"]
    with db.fenced(epoch) as conn:
        cancels.pause_job(conn, "j")
    assert _pass(db, now, store, due) == [] and _rows(db, "j") == []
    assert _next_at(db, "j") is None  # still paused: the pass's advance did not apply


def test_a_one_off_recorded_ahead_is_removed_by_withdrawing_its_run_and_not_paused(
    db: Database,
) -> None:
    """Issue 18's known limit: a one-off's row is gone once its only fire is recorded, so
    inside the window ``jobs remove`` said "no such job" and the run went ahead. Removing
    it now withdraws the run; pausing is refused with the run to cancel; a job that never
    existed is still not found."""
    from qcluster.errors import JobNotFound

    at = datetime.fromtimestamp(time.time() + 15, UTC).isoformat()
    jd = validate_job({"id": "once", "func": "jobs.builtin:noop", "trigger": make_spec(at=at)},
                      ALLOW)
    with db.fenced(_epoch(db)) as conn:
        cancels.upsert_jobs(conn, [jd], replace=False)
    sent, _ = _fire_ahead(db, "once")
    assert len(sent) == 1
    _claim(db, sent)
    with db.read() as conn:
        assert conn.execute(sa.select(schema.jobs.c.id)).all() == []  # its last fire is made
    run_id = sent[0]["run_id"]
    with pytest.raises(JobNotFound, match=f"run {run_id} is sent ahead of its time .*"
                                          f"runs cancel {run_id}"), \
            db.fenced(_epoch(db)) as conn:
        cancels.pause_job(conn, "once")
    assert _rows(db, "once")[0].status == S.DISPATCHED  # the refusal wrote nothing
    with db.fenced(_epoch(db)) as conn:
        cancels.remove_job(conn, "once")
    (row,) = _rows(db, "once")
    assert (row.status, row.error) == (S.CANCELLED, "withdrawn: its job was removed")
    assert runs.start(db, [(run_id, 1)], session="s", now=row.scheduled_at) == set()
    for change in (cancels.remove_job, cancels.pause_job):
        with pytest.raises(JobNotFound), db.fenced(_epoch(db)) as conn:
            change(conn, "once")  # nothing ahead any more


def test_an_overlap_policy_is_judged_at_the_fire_time_not_ahead_of_it(db: Database) -> None:
    """Issue 18's known limit: with fire-ahead on, ``skip`` was decided when the run was
    recorded, up to the window before its time, so it skipped a fire whose previous run
    ended before it came. A job with an overlap policy now fires at its time only; a job
    without one is still recorded ahead, and the pass says when to look again."""
    _add(db, "skip", overlap="skip")
    _add(db, "plain")
    first = _next_at(db, "skip")
    assert first is not None
    with db.write() as conn:  # the two adds may straddle a 10 s boundary (a loaded machine)
        conn.execute(schema.jobs.update().where(schema.jobs.c.id == "plain")
                     .values(next_run_time=first))
    assert _next_at(db, "plain") == first
    sent = _pass(db, first + 0.01)  # both at their first time
    assert sorted(r["job_id"] for r in sent) == ["plain", "skip"]
    _claim(db, sent)
    (open_run,) = [r for r in sent if r["job_id"] == "skip"]
    assert runs.start(db, [(open_run["run_id"], 1)], session="s", now=first) == {
        (open_run["run_id"], 1)}
    epoch = _epoch(db)
    store = SqlJobStore(db, lambda: epoch, misfire_grace_seconds=30, coalesce=True)
    executor = FireExecutor(store, epoch, "leader", lambda _: None, retention_seconds=86400)
    ahead = first + 10 - AHEAD + 0.5  # the second fire is inside the window
    at, horizon = (datetime.fromtimestamp(t, UTC) for t in (ahead, ahead + AHEAD))
    executor.fire(store.get_due_jobs(horizon), at, horizon)
    assert [r.scheduled_at for r in _rows(db, "plain")] == [first, first + 10]
    assert [r.scheduled_at for r in _rows(db, "skip")] == [first]  # not judged yet
    assert executor.deferred == 1
    assert executor.deferred_until == datetime.fromtimestamp(first + 10, UTC)
    # the loop neither spins on it (it is "due" within the window) nor sleeps past it
    loop = LeaderScheduler(store, executor, poll_seconds=30, on_fenced=lambda _: None,
                           fire_ahead_seconds=AHEAD, now=lambda: ahead + 0.1)
    assert loop._pass() == pytest.approx(AHEAD / 2)
    assert [r.scheduled_at for r in _rows(db, "skip")] == [first]
    # the open run ends before the second fire time comes: that fire is not skipped
    runs.write_outcomes(db, "s", {(open_run["run_id"], 1): runs.Outcome(
        S.SUCCEEDED, first, first + 5, None)})
    again = _pass(db, first + 10.01)
    assert [(r["job_id"], r["scheduled_at"]) for r in again] == [("skip", first + 10)]
    assert [r.status for r in _rows(db, "skip")] == [S.SUCCEEDED, S.SCHEDULED]


def test_a_fire_time_skipped_by_the_overlap_policy_does_not_use_up_max_runs(
    db: Database,
) -> None:
    """Issue 15's second attack: ``--max-runs 3 --overlap skip`` ended after 2 runs; the
    bound was applied before the overlap policy, so a skipped fire time used up a run."""
    _add(db, "mr", overlap="skip", max_runs=2)
    first = _next_at(db, "mr")
    assert first is not None
    (run,) = _pass(db, first + 0.01)
    _claim(db, [run])
    assert runs.start(db, [(run["run_id"], 1)], session="s", now=first) == {(run["run_id"], 1)}
    assert _pass(db, first + 10.01) == []  # skipped: the first run is still open
    assert _next_at(db, "mr") == first + 20  # not ended by the skip
    runs.write_outcomes(db, "s", {(run["run_id"], 1): runs.Outcome(
        S.SUCCEEDED, first, first + 15, None)})
    (second,) = _pass(db, first + 20.01)
    assert second["scheduled_at"] == first + 20
    assert [r.status for r in _rows(db, "mr")] == [S.SUCCEEDED, S.SKIPPED, S.SCHEDULED]
    with db.read() as conn:
        job = catalog.job_row(conn, "mr")
    assert (job.next_run_time, job.runs_made) == (None, 2)  # ended after its 2 runs
