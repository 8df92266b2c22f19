"""The leader's job policies (issue 15), on SQLite and PostgreSQL: what each due fire time
becomes (misfire, overlap, bounds, jitter, calendars) and what recovery does with failed
attempts (retries) and buffered runs. The real-process tests are in
tests/cluster/test_policies.py."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from qcluster.definitions.jobdefs import validate_job
from qcluster.definitions.policy import backoff, jitter_of
from qcluster.definitions.triggers import make_spec
from qcluster.errors import InputError
from qcluster.leader import recovery
from qcluster.leader.recovery import recover_runs
from qcluster.leader.scheduler import FireExecutor
from qcluster.store import backfill, calendars, cancels, catalog, runs, schema
from qcluster.store.cluster import read_cluster
from qcluster.store.db import Database
from qcluster.store.jobstore import SqlJobStore
from qcluster.store.records import RunRecord
from qcluster.store.runs import RunStatus

S = RunStatus
ALLOW = ["jobs.*"]
BASE = float(int(time.time()) // 60 * 60 + 120)  # a whole minute, in the future


def _epoch(db: Database) -> int:
    state = read_cluster(db)
    assert state is not None
    return state.epoch


def _add(db: Database, job_id: str, *, next_at: float = BASE, **fields: Any) -> None:
    spec = make_spec(every="1s", now=datetime.fromtimestamp(next_at - 100, UTC))
    jd = validate_job({"id": job_id, "func": "jobs.builtin:noop", "trigger": spec, **fields},
                      ALLOW)
    with db.fenced(_epoch(db)) as conn:
        catalog.upsert_jobs(conn, [jd], replace=True)
        conn.execute(schema.jobs.update().where(schema.jobs.c.id == job_id)
                     .values(next_run_time=next_at))


def _fire(db: Database, at: float, *, grace: int = 30) -> list[RunRecord]:
    epoch = _epoch(db)
    store = SqlJobStore(db, lambda: epoch, misfire_grace_seconds=grace, coalesce=True)
    sent: list[RunRecord] = []
    executor = FireExecutor(store, epoch, "leader", sent.extend, retention_seconds=86400)
    now = datetime.fromtimestamp(at, UTC)
    executor.fire(store.get_due_jobs(now), now)
    return sent


def _runs(db: Database, job_id: str) -> list[Any]:
    r = schema.runs
    with db.read() as conn:
        return list(conn.execute(sa.select(r).where(r.c.job_id == job_id)
                                 .order_by(r.c.scheduled_at)))


def _statuses(db: Database, job_id: str) -> list[tuple[float, str]]:
    return [(row.scheduled_at - BASE, row.status) for row in _runs(db, job_id)]


def _job(db: Database, job_id: str) -> Any:
    with db.read() as conn:
        return conn.execute(sa.select(schema.jobs).where(schema.jobs.c.id == job_id)).one()


def _set(db: Database, run_id: int, **values: Any) -> None:
    with db.write() as conn:  # tests may write the table to set a scene
        conn.execute(schema.runs.update().where(schema.runs.c.id == run_id).values(**values))


# -- misfire ---------------------------------------------------------------------------


def test_misfire_run_once_coalesces_what_is_within_the_catch_up_window(db: Database) -> None:
    _add(db, "once", misfire="run-once", catch_up="60s")
    _fire(db, BASE + 90.5, grace=5)  # 91 fire times: 0..90
    got = _statuses(db, "once")
    assert got[-1] == (90.0, "scheduled")
    assert {s for t, s in got if 30 <= t < 90} == {"missed"}  # coalesced, within 60 s
    assert all(s == "missed" for _, s in got[:-1])
    errors = {row.error for row in _runs(db, "once")[:-1]}
    assert any(e.startswith("missed by") and "catch-up 60s" in e for e in errors)
    assert "coalesced into a later run" in errors


def test_misfire_run_all_runs_each_time_within_the_window_in_order(db: Database) -> None:
    _add(db, "all", misfire="run-all", catch_up="10s")
    _fire(db, BASE + 20.5, grace=2)
    got = _statuses(db, "all")
    assert [s for t, s in got if t >= 11] == ["scheduled"] * 10  # 11..20: within 10 s
    assert {s for t, s in got if t < 10} == {"missed"}


def test_misfire_skip_records_late_times_missed_and_runs_on_time_ones(db: Database) -> None:
    _add(db, "skip", misfire="skip", catch_up="1h")
    _fire(db, BASE + 10.5, grace=3)
    got = dict(_statuses(db, "skip"))
    assert [got[t] for t in (8.0, 9.0, 10.0)] == ["scheduled"] * 3  # within the grace
    assert {got[t] for t in range(0, 7)} == {"missed"}
    assert "misfire policy skip" in _runs(db, "skip")[0].error


def test_coalesce_false_is_run_all_and_a_contradiction_is_refused() -> None:
    spec = make_spec(every="1s")
    with pytest.raises(InputError, match="contradicts"):
        validate_job({"id": "x", "func": "jobs.builtin:noop", "trigger": spec,
                      "coalesce": False, "misfire": "run-once"}, ALLOW)


# -- overlap -----------------------------------------------------------------------------


def _open_one(db: Database, job_id: str, status: RunStatus = S.RUNNING) -> int:
    """Fire the job once at BASE, and put its run in ``status``; its id."""
    _fire(db, BASE + 0.1)
    (row,) = _runs(db, job_id)
    _set(db, row.id, status=status, worker="w", worker_session="s")
    return int(row.id)


def test_overlap_skip_records_skipped_while_the_previous_run_is_open(db: Database) -> None:
    _add(db, "sk", overlap="skip", misfire="run-all")
    first = _open_one(db, "sk")
    _fire(db, BASE + 2.1)
    rows = _runs(db, "sk")
    assert [r.status for r in rows] == ["running", "skipped", "skipped"]
    assert f"run {first} of this job is still open" in rows[1].error
    _set(db, first, status=S.SUCCEEDED)
    _fire(db, BASE + 3.1)
    assert _runs(db, "sk")[-1].status == "scheduled"


def test_overlap_buffer_one_keeps_one_and_recovery_sends_it_after(db: Database) -> None:
    _add(db, "b1", overlap="buffer-one", misfire="run-all")
    first = _open_one(db, "b1")
    _fire(db, BASE + 3.1)
    assert [r.status for r in _runs(db, "b1")] == ["running", "buffered", "skipped", "skipped"]
    out = recover_runs(db, _epoch(db), live_workers={("w", "s")}, grace_seconds=30)
    assert out.unbuffered == 0  # the first still runs
    _set(db, first, status=S.SUCCEEDED)
    out = recover_runs(db, _epoch(db), live_workers={("w", "s")}, grace_seconds=30)
    assert out.unbuffered == 1 and [r["scheduled_at"] for r in out.resend] == [BASE + 1]
    assert _runs(db, "b1")[1].status == "scheduled"
    # to start at its fire time if that is still to come (BASE is in the future when the
    # module is imported, maybe not in a long run), not before it
    sent = _runs(db, "b1")[1]
    assert sent.due_at == max(BASE + 1, sent.created_at)


def test_overlap_buffer_all_buffers_each_and_sends_them_one_at_a_time(db: Database) -> None:
    _add(db, "ba", overlap="buffer-all", misfire="run-all")
    first = _open_one(db, "ba")
    _fire(db, BASE + 2.1)
    assert [r.status for r in _runs(db, "ba")] == ["running", "buffered", "buffered"]
    _set(db, first, status=S.FAILED)
    out = recover_runs(db, _epoch(db), live_workers={("w", "s")}, grace_seconds=30)
    assert out.unbuffered == 1  # the next waits for this one
    out = recover_runs(db, _epoch(db), live_workers={("w", "s")}, grace_seconds=30)
    assert out.unbuffered == 0


def test_overlap_cancel_other_cancels_the_open_run_and_waits_for_it(db: Database) -> None:
    _add(db, "co", overlap="cancel-other")
    first = _open_one(db, "co", S.DISPATCHED)
    _fire(db, BASE + 1.1)
    rows = _runs(db, "co")
    assert [r.status for r in rows] == ["cancelled", "buffered"]
    assert "overlap cancel-other: replaced by the fire" in rows[0].error
    out = recover_runs(db, _epoch(db), live_workers={("w", "s")}, grace_seconds=30)
    assert out.unbuffered == 1 and out.resend[0]["run_id"] == rows[1].id
    assert first != rows[1].id


def test_overlap_cancel_other_records_the_replaced_run_cancelled_and_superseded_ones_skipped(
    db: Database,
) -> None:
    """What README's run-statuses table says: the open run a later fire replaces is
    ``cancelled``; the fire times of one pass that a later one of the same pass supersedes
    are ``skipped``; the latest waits (``buffered``) for the cancelled run to end."""
    _add(db, "cs", overlap="cancel-other", misfire="run-all")
    _open_one(db, "cs", S.SCHEDULED)
    _fire(db, BASE + 3.1)
    rows = _runs(db, "cs")
    assert [r.status for r in rows] == ["cancelled", "skipped", "skipped", "buffered"]
    assert rows[0].error.startswith("overlap cancel-other: replaced by the fire at ")
    assert {r.error for r in rows[1:3]} == {
        "overlap cancel-other: a later fire time replaced it in the same pass"}


def test_overlap_cancel_other_marks_a_running_run_for_its_worker(db: Database) -> None:
    _add(db, "cr", overlap="cancel-other")
    first = _open_one(db, "cr", S.RUNNING)
    _fire(db, BASE + 1.1)
    rows = _runs(db, "cr")
    assert rows[0].status == "running" and rows[0].cancel_requested is not None
    assert rows[1].status == "buffered"
    assert recover_runs(db, _epoch(db), live_workers={("w", "s")},
                        grace_seconds=30).unbuffered == 0
    _set(db, first, status=S.CANCELLED)  # what its worker writes once it stopped it
    assert recover_runs(db, _epoch(db), live_workers={("w", "s")},
                        grace_seconds=30).unbuffered == 1


def test_a_run_of_a_dead_worker_does_not_hold_the_overlap(db: Database) -> None:
    """Open means the runs table says so: recovery records a dead worker's run lost."""
    _add(db, "dead", overlap="skip")
    _open_one(db, "dead", S.RUNNING)
    recover_runs(db, _epoch(db), live_workers=set(), grace_seconds=30)
    assert _runs(db, "dead")[0].status == "lost"
    _fire(db, BASE + 1.1)
    assert _runs(db, "dead")[1].status == "scheduled"


# -- bounds, jitter, calendars ------------------------------------------------------------


def test_start_end_and_max_runs_bound_the_fire_times(db: Database) -> None:
    start = datetime.fromtimestamp(BASE + 5, UTC).isoformat()
    end = datetime.fromtimestamp(BASE + 8, UTC).isoformat()
    _add(db, "se", start=start, end=end)
    _fire(db, BASE + 20.5)
    assert [t for t, _ in _statuses(db, "se")] == [5.0, 6.0, 7.0, 8.0]
    job = _job(db, "se")
    assert job.next_run_time is None  # ended by its bound, kept to be seen
    _add(db, "mr", max_runs=3, misfire="run-all")
    _fire(db, BASE + 1.1)
    _fire(db, BASE + 5.1)
    assert len([s for _, s in _statuses(db, "mr") if s == "scheduled"]) == 3
    job = _job(db, "mr")
    assert (job.runs_made, job.next_run_time) == (3, None)


def test_jitter_is_the_same_for_every_leader_and_within_its_bound(db: Database) -> None:
    _add(db, "jit", jitter="30s", misfire="run-all")
    _fire(db, BASE + 4.1)
    rows = _runs(db, "jit")
    assert len(rows) == 5
    for row in rows:
        shift = row.due_at - row.scheduled_at
        assert 0 <= shift < 30
        assert row.due_at == pytest.approx(row.scheduled_at + jitter_of("jit", row.scheduled_at,
                                                                         30.0))
    assert len({round(r.due_at - r.scheduled_at, 3) for r in rows}) > 1


def test_a_fire_on_an_excluded_date_is_recorded_skipped_naming_the_calendar(
        db: Database) -> None:
    today = datetime.fromtimestamp(BASE, UTC).date()
    with db.fenced(_epoch(db)) as conn:
        calendars.put_calendar(conn, "holidays", calendars.parse_dates([today.isoformat()]),
                               replace=False)
        calendars.put_calendar(conn, "other", calendars.parse_dates(["2000-01-01"]),
                               replace=False)
    _add(db, "ex", exclude=["other", "holidays"], misfire="run-all")
    _fire(db, BASE + 1.1)
    rows = _runs(db, "ex")
    assert [r.status for r in rows] == ["skipped", "skipped"]
    assert rows[0].error == "excluded by calendar holidays"
    with db.fenced(_epoch(db)) as conn:  # the leader sees a change of the dates
        calendars.put_calendar(conn, "holidays", calendars.parse_dates([date(2001, 1, 1)
                                                                         .isoformat()]),
                               replace=True)
        with pytest.raises(InputError, match="excluded by 1 jobs"):
            calendars.remove_calendar(conn, "holidays")
    _fire(db, BASE + 2.1)
    assert _runs(db, "ex")[-1].status == "scheduled"


# -- retries -------------------------------------------------------------------------------


def test_a_failed_attempt_is_retried_after_its_backoff_then_gives_up(db: Database) -> None:
    _add(db, "rt", retries=2, retry_backoff="10s", retry_max_backoff="15s")
    _fire(db, BASE + 0.1)
    (row,) = _runs(db, "rt")
    assert (row.retries_left, row.retry_backoff, row.retry_max_backoff) == (2, 10.0, 15.0)
    epoch = _epoch(db)
    _set(db, row.id, status=S.FAILED, worker="w", worker_session="s", error="boom")
    now = BASE + 1
    out = recover_runs(db, epoch, live_workers=set(), grace_seconds=30, now=now)
    (row,) = _runs(db, "rt")
    assert (out.retries, row.status, row.attempt, row.retries_left) == (1, "scheduled", 2, 1)
    assert row.due_at == pytest.approx(now + backoff(row.id, 1, 10.0, 15.0))
    assert 5 <= row.due_at - now <= 10 and "boom" in row.error
    assert out.resend == []  # not due yet: sent about a second before its time
    out = recover_runs(db, epoch, live_workers=set(), grace_seconds=30, now=row.due_at - 0.5)
    assert [(r["run_id"], r["attempt"]) for r in out.resend] == [(row.id, 2)]
    _set(db, row.id, status=S.TIMED_OUT, worker="w", worker_session="s2")
    recover_runs(db, epoch, live_workers=set(), grace_seconds=30, now=now + 20)
    (row,) = _runs(db, "rt")
    assert (row.attempt, row.retries_left, row.status) == (3, 0, "scheduled")
    assert 7.5 <= row.due_at - (now + 20) <= 15  # min(15, 10 * 2) with equal jitter
    _set(db, row.id, status=S.FAILED, worker="w", worker_session="s3")
    out = recover_runs(db, epoch, live_workers=set(), grace_seconds=30, now=now + 60)
    assert out.retries == 0 and _runs(db, "rt")[0].status == "failed"


def test_no_retry_for_a_cancelled_run_or_a_removed_job(db: Database) -> None:
    _add(db, "gone", retries=3)
    _fire(db, BASE + 0.1)
    (row,) = _runs(db, "gone")
    _set(db, row.id, status=S.FAILED, worker="w", worker_session="s")
    with db.fenced(_epoch(db)) as conn:
        cancels.remove_job(conn, "gone")  # as jobs remove does
    out = recover_runs(db, _epoch(db), live_workers=set(), grace_seconds=30)
    (row,) = _runs(db, "gone")
    assert (out.retries, row.status, row.retries_left) == (0, "failed", 0)
    assert "no retry: its job was removed" in row.error


def test_a_one_off_job_ended_by_its_fire_keeps_its_retries_and_its_grace(
    db: Database,
) -> None:
    """An ``--at`` job's row is deleted once it has fired: not a removal. Its failed run
    is still retried, and an unstarted one is judged by the job's own grace, which the
    run keeps (the attack of 2026-12-02 found both lost with the row)."""
    for job_id in ("once", "late"):
        spec = make_spec(at=datetime.fromtimestamp(BASE, UTC).isoformat())
        jd = validate_job({"id": job_id, "func": "jobs.builtin:noop", "trigger": spec,
                           "retries": 2, "misfire_grace_seconds": 120}, ALLOW)
        with db.fenced(_epoch(db)) as conn:
            catalog.upsert_jobs(conn, [jd], replace=True)
    _fire(db, BASE + 0.1)
    with db.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(schema.jobs)).scalar() == 0
    (once,), (late,) = _runs(db, "once"), _runs(db, "late")
    assert late.grace == 120
    epoch = _epoch(db)
    _set(db, once.id, status=S.FAILED, worker="w", worker_session="s", error="boom")
    _set(db, late.id, status=S.DISPATCHED, worker="w", worker_session="s", epoch=epoch - 1)
    out = recover_runs(db, epoch, live_workers={("w", "s")}, grace_seconds=30,
                       now=BASE + 60)
    assert (out.retries, out.missed) == (1, 0)
    assert (_runs(db, "once")[0].status, _runs(db, "once")[0].attempt) == ("scheduled", 2)
    assert _runs(db, "late")[0].status == "dispatched"  # 60 s late: within its 120 s
    out = recover_runs(db, epoch, live_workers={("w", "s")}, grace_seconds=30,
                       now=BASE + 121)
    assert out.missed == 1 and "(120s)" in _runs(db, "late")[0].error


def test_a_backoff_grows_and_is_bounded() -> None:
    delays = [backoff(7, n, 1.0, 8.0) for n in range(1, 7)]
    for n, d in enumerate(delays, 1):
        full = min(8.0, 2.0 ** (n - 1))
        assert full / 2 <= d <= full
    assert backoff(7, 3, 1.0, 8.0) == backoff(7, 3, 1.0, 8.0)  # reproducible


def test_overlap_cancel_other_also_ends_a_retry_to_come(db: Database) -> None:
    _add(db, "cf", overlap="cancel-other", retries=3)
    first = _open_one(db, "cf", S.FAILED)
    _fire(db, BASE + 1.1)
    rows = _runs(db, "cf")
    assert (rows[0].id, rows[0].status, rows[0].retries_left) == (first, "failed", 0)
    assert "no retry: overlap cancel-other" in rows[0].error
    out = recover_runs(db, _epoch(db), live_workers=set(), grace_seconds=30)
    assert (out.retries, out.unbuffered) == (0, 1)


@pytest.mark.parametrize("end", [S.SUCCEEDED, S.INTERRUPTED, S.CANCELLED, S.FAILED,
                                 S.TIMED_OUT, S.MISSED, S.LOST])
def test_only_a_run_that_can_still_be_retried_keeps_retries_left(db: Database,
                                                                  end: RunStatus) -> None:
    """A run ended any other way than failed or timed out gets no retry, so it shows
    none left (and leaves the partial index of retriable rows), whichever write ends it:
    the worker's outcome (SQLite: a statement per row; PostgreSQL: the unnest), a cancel,
    recovery's missed past the grace or lost with its worker."""
    _add(db, "rl", retries=2)
    _fire(db, BASE + 0.1)
    (row,) = _runs(db, "rl")
    epoch = _epoch(db)
    if end in (S.MISSED, S.LOST):
        status = S.SCHEDULED if end == S.MISSED else S.RUNNING
        _set(db, row.id, status=status, worker="w", worker_session="s", epoch=epoch - 1)
        out = recover_runs(db, epoch, live_workers=set(), grace_seconds=30, now=BASE + 60)
        assert (out.missed, out.lost) == ((1, 0) if end == S.MISSED else (0, 1))
    elif end == S.CANCELLED:
        with db.fenced(epoch) as conn:
            runs.cancel(conn, row.id, now=BASE + 1, reason="cancelled: test")
    else:
        _set(db, row.id, status=S.RUNNING, worker="w", worker_session="s")
        runs.write_outcomes(db, "s", {(row.id, 1): runs.Outcome(end, BASE, BASE + 1, "x")})
    (row,) = _runs(db, "rl")
    assert row.status == end
    assert row.retries_left == (2 if end in runs.RETRIABLE else 0)


def test_a_lost_recover_run_made_again_keeps_its_retries(db: Database) -> None:
    _add(db, "rr", retries=2, recover=True)
    _fire(db, BASE + 0.1)
    (row,) = _runs(db, "rr")
    _set(db, row.id, status=S.RUNNING, worker="w", worker_session="s")
    out = recover_runs(db, _epoch(db), live_workers=set(), grace_seconds=30, now=BASE + 1)
    (row,) = _runs(db, "rr")
    assert (out.lost, out.retried, row.status, row.attempt, row.retries_left) == (
        1, 1, "scheduled", 2, 2)


@pytest.mark.parametrize("status", [S.SCHEDULED, S.DISPATCHED])
def test_recovery_judges_an_unstarted_run_by_its_jobs_own_misfire_grace(
    db: Database, status: RunStatus
) -> None:
    """Between its commit and its start, a run is missed past its job's
    ``misfire_grace_seconds``, not the scheduler-wide default (issue 14's residual)."""
    for job_id, grace in (("tight", 5), ("loose", 60)):
        _add(db, job_id, misfire_grace_seconds=grace)
    _add(db, "default")
    _fire(db, BASE + 0.1)
    epoch = _epoch(db)
    for job_id in ("tight", "loose", "default"):
        (row,) = _runs(db, job_id)
        _set(db, row.id, status=status, epoch=epoch - 1,
             **({"worker": "w", "worker_session": "s"} if status == S.DISPATCHED else {}))
    out = recover_runs(db, epoch, live_workers={("w", "s")}, grace_seconds=30, now=BASE + 20)
    assert out.missed == 1
    (tight,) = _runs(db, "tight")
    assert tight.status == "missed" and "misfire grace time (5s)" in tight.error
    assert [_runs(db, j)[0].status for j in ("loose", "default")] == [status] * 2
    out = recover_runs(db, epoch, live_workers={("w", "s")}, grace_seconds=30, now=BASE + 40)
    assert out.missed == 1 and _runs(db, "default")[0].status == "missed"
    assert _runs(db, "loose")[0].status == status


# -- backfill in recovery --------------------------------------------------------------------


def test_backfill_runs_wait_their_turn_in_the_bulk_lane_not_missed_by_the_grace(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backfill's unsent runs are handed to the dispatcher's bulk lane, oldest first and
    at most BULK_PER_PASS per pass, and are not missed for waiting past the misfire grace
    (thousands are due at once); only past BACKFILL_WAIT. A claimed one is judged by the
    grace from its claim. A live run past its grace is still missed."""
    monkeypatch.setattr(recovery, "BULK_PER_PASS", 3)
    _add(db, "live", next_at=BASE)
    _fire(db, BASE + 0.1)
    jd = validate_job({"id": "bf", "func": "jobs.builtin:noop",
                       "trigger": make_spec(cron="0 * * * *"), "misfire_grace_seconds": 5},
                      ALLOW)
    epoch = _epoch(db)
    with db.fenced(epoch) as conn:
        catalog.upsert_jobs(conn, [jd], replace=False)
    written_at = BASE - 100
    with db.fenced(epoch) as conn:
        new, _ = backfill.backfill(conn, "bf", "2026-01-01T00:00Z", "2026-01-01T04:30Z",
                                   epoch, "leader", now=written_at)
    assert len(new) == 5 and all(r.backfill for r in _runs(db, "bf"))
    out = recover_runs(db, epoch, live_workers={("w", "s")}, grace_seconds=30,
                       now=BASE + 3600)
    assert out.missed == 1 and _runs(db, "live")[0].status == "missed"
    assert out.resend == []
    times = sorted(r.scheduled_at for r in _runs(db, "bf"))
    assert [r["scheduled_at"] for r in out.bulk] == times[:3]
    assert {r.status for r in _runs(db, "bf")} == {"scheduled"}
    first = _runs(db, "bf")[0]
    _set(db, first.id, status=S.DISPATCHED, worker="w", worker_session="s",
         dispatched_at=BASE + 3600)
    out = recover_runs(db, epoch, live_workers={("w", "s")}, grace_seconds=30,
                       now=BASE + 3604)
    assert out.missed == 0 and [r["scheduled_at"] for r in out.bulk] == times[1:4]
    out = recover_runs(db, epoch, live_workers={("w", "s")}, grace_seconds=30,
                       now=BASE + 3606)
    assert out.missed == 1 and "(5s)" in _runs(db, "bf")[0].error  # the job's grace
    out = recover_runs(db, epoch, live_workers=set(), grace_seconds=30,
                       now=written_at + recovery.BACKFILL_WAIT + 1)
    assert out.missed == 4 and out.bulk == []
    assert all("backfill run never dispatched within 24h" in r.error
               for r in _runs(db, "bf")[1:])
