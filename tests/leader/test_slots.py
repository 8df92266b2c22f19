"""Shards and broadcast (issue 16, items 4 and 5), on both databases: a fire time of a
sharded job is one run per shard, of a broadcast job one per live worker with its tags,
each keyed on (job, fire time, slot) and written once; a run now and a backfill make a
sharded job's every shard; a broadcast job with no live worker is one ``missed`` run; a
child of a sharded parent runs once per fire time, after all of its shards."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from backends.base import MemberInfo
from qcluster.definitions.jobdefs import validate_job
from qcluster.definitions.triggers import make_spec
from qcluster.errors import InputError
from qcluster.leader.scheduler import FireExecutor
from qcluster.store import backfill, catalog
from qcluster.store.db import Database
from qcluster.store.jobstore import SqlJobStore
from qcluster.store.records import RunRecord
from qcluster.store.runs import RunStatus
from tests.leader.test_chains import _child, _pass
from tests.leader.test_policies import ALLOW, BASE, _add, _epoch, _fire, _runs, _set

S = RunStatus


def _worker(name: str, *tags: str) -> MemberInfo:
    return MemberInfo(name, f"{name}-s", ("worker",), f"PYRO:w@{name}:1", 4, tags=tags)


def _fire_with(db: Database, at: float, workers: list[MemberInfo]) -> list[RunRecord]:
    epoch = _epoch(db)
    store = SqlJobStore(db, lambda: epoch, misfire_grace_seconds=30, coalesce=True)
    sent: list[RunRecord] = []
    executor = FireExecutor(store, epoch, "leader", sent.extend, retention_seconds=86400,
                            workers=lambda: workers)
    now = datetime.fromtimestamp(at, UTC)
    executor.fire(store.get_due_jobs(now), now)
    return sent


def _slots(db: Database, job_id: str) -> list[tuple[float, str, str]]:
    return [(r.scheduled_at - BASE, r.slot, r.status) for r in _runs(db, job_id)]


def test_a_sharded_fire_time_is_one_run_per_shard_each_written_once(db: Database) -> None:
    _add(db, "idx", shards=3)
    sent = _fire(db, BASE)
    assert sorted(r["job_id"] for r in sent) == ["idx"] * 3
    assert _slots(db, "idx") == [(0, "0/3", "scheduled"), (0, "1/3", "scheduled"),
                                 (0, "2/3", "scheduled")]
    _set(db, _runs(db, "idx")[0].id, status=S.SUCCEEDED)
    _add(db, "idx", shards=3)  # the same fire time planned again (a new leader): nothing new
    assert _fire(db, BASE) == [] and len(_runs(db, "idx")) == 3
    _fire(db, BASE + 1)
    assert [s for t, s, _ in _slots(db, "idx") if t == 1] == ["0/3", "1/3", "2/3"]


def test_a_run_now_and_a_backfill_make_every_shard(db: Database) -> None:
    _add(db, "idx", shards=4)
    with db.fenced(_epoch(db)) as conn:
        made = catalog.run_now_all(conn, "idx", _epoch(db), "leader", now=BASE - 30)
    assert len(made) == 4 and len({r["run_id"] for r in made}) == 4
    # A backfill of the three fire times before: twelve runs, counted as three fire times.
    spec = make_spec(every="1m", now=datetime.fromtimestamp(BASE - 3600, UTC))
    jd = validate_job({"id": "hourly", "func": "jobs.builtin:noop", "trigger": spec,
                       "shards": 2}, ALLOW)
    with db.fenced(_epoch(db)) as conn:
        catalog.upsert_jobs(conn, [jd], replace=False)
    start = datetime.fromtimestamp(BASE - 3600, UTC)

    def iso(d: datetime) -> str:
        return d.isoformat().replace("+00:00", "Z")

    with db.fenced(_epoch(db)) as conn:
        planned = backfill.plan(conn, "hourly", iso(start + timedelta(minutes=1)),
                                iso(start + timedelta(minutes=3)), now=BASE)
        runs, counts = backfill.record(conn, planned, _epoch(db), "leader", now=BASE)
    assert (len(runs), counts.new, counts.already) == (6, 3, 0)


def test_a_broadcast_fire_time_is_one_run_per_live_worker_with_its_tags(
        db: Database) -> None:
    _add(db, "sweep", broadcast=True, tags=["linux"])
    workers = [_worker("w1", "linux"), _worker("w2"), _worker("w3", "linux", "eu")]
    sent = _fire_with(db, BASE, workers)
    assert _slots(db, "sweep") == [(0, "@w1", "scheduled"), (0, "@w3", "scheduled")]
    assert sorted(json.loads(r["routing"])["worker"] for r in sent) == ["w1", "w3"]
    workers.append(_worker("w4", "linux"))  # joins: from the next fire time on
    _fire_with(db, BASE + 1, workers)
    assert [s for t, s, _ in _slots(db, "sweep") if t == 1] == ["@w1", "@w3", "@w4"]
    _fire_with(db, BASE + 2, [_worker("w2")])  # none with the tag is live
    ((_, slot, status),) = [x for x in _slots(db, "sweep") if x[0] == 2]
    assert (slot, status) == ("", "missed")
    (row,) = [r for r in _runs(db, "sweep") if r.scheduled_at == BASE + 2]
    assert row.error == "broadcast: no live worker has its tags linux"
    with db.fenced(_epoch(db)) as conn, pytest.raises(InputError, match="broadcast"):
        catalog.run_now_all(conn, "sweep", _epoch(db), "leader")


def test_a_broadcast_run_whose_worker_left_is_missed_naming_it(db: Database) -> None:
    from qcluster.leader.recovery import recover_runs

    _add(db, "sweep", broadcast=True)
    _fire_with(db, BASE, [_worker("w1"), _worker("w2")])
    for r in _runs(db, "sweep"):
        _set(db, r.id, created_at=BASE)
    recover_runs(db, _epoch(db), live_workers=[], grace_seconds=5, now=BASE + 60,
                 worker_tags={"w2": frozenset()})
    errors = {r.slot: (r.status, r.error) for r in _runs(db, "sweep")}
    assert errors["@w1"] == ("missed", "never dispatched within the misfire grace time (5s): "
                             "its worker w1 (a broadcast run) is not a live member")
    assert errors["@w2"] == ("missed", "never dispatched within the misfire grace time (5s)")


def test_a_buffered_fire_time_of_a_sharded_job_is_sent_whole(db: Database) -> None:
    """An outside look stopped every leader with it: the buffered runs of one fire time
    were looked up as one row (MultipleResultsFound in every recovery pass)."""
    _add(db, "idx", shards=3, overlap="buffer-one")
    _fire(db, BASE)
    _fire(db, BASE + 1)  # the first fire time's shards still open: its shards wait
    assert [st for t, _, st in _slots(db, "idx") if t == 1] == ["buffered"] * 3
    for r in _runs(db, "idx")[:3]:
        _set(db, r.id, status=S.SUCCEEDED, finished_at=BASE + 1.5, retries_left=0)
    result = _pass(db, BASE + 2)
    assert result.unbuffered == 3 and len(result.resend) == 3
    assert [st for t, _, st in _slots(db, "idx") if t == 1] == ["scheduled"] * 3


def test_a_broadcast_run_whose_worker_died_is_lost_not_sent_elsewhere(db: Database) -> None:
    """An outside look: a --recover broadcast run whose worker was killed got attempt 2,
    still pinned to the dead worker, and stayed scheduled for ever."""
    from qcluster.leader.recovery import recover_runs

    _add(db, "sweep", broadcast=True, recover=True, retries=2)
    _fire_with(db, BASE, [_worker("w1"), _worker("w2")])
    one, two = _runs(db, "sweep")
    _set(db, one.id, status=S.RUNNING, worker="w1", worker_session="w1-s", started_at=BASE)
    _set(db, two.id, status=S.FAILED, worker="w2", worker_session="w2-s",
         finished_at=BASE + 1)  # a retry to come, pinned to w2
    recover_runs(db, _epoch(db), live_workers=[], grace_seconds=5, now=BASE + 2,
                 worker_tags={})
    one, two = _runs(db, "sweep")
    assert (one.status, one.attempt) == ("lost", 1)
    assert one.error.startswith("a broadcast run: its worker is gone, and no other runs it")
    assert (two.status, two.attempt) == ("scheduled", 2)  # its retry, on w2 only
    recover_runs(db, _epoch(db), live_workers=[], grace_seconds=5, now=BASE + 60,
                 worker_tags={})
    (_, two) = _runs(db, "sweep")
    assert (two.status, two.error) == (
        "missed", "never dispatched within the misfire grace time (5s): its worker w2 (a "
                  "broadcast run) is not a live member")


@pytest.mark.parametrize(("last", "child"), [(S.SUCCEEDED, "scheduled"),
                                             (S.FAILED, "skipped")])
def test_a_child_of_a_sharded_parent_runs_once_after_all_its_shards(
        db: Database, last: RunStatus, child: str) -> None:
    _add(db, "idx", shards=3)
    _child(db, "report", "idx")
    _fire(db, BASE)
    shards = _runs(db, "idx")
    for r in shards[:2]:
        _set(db, r.id, status=S.SUCCEEDED, finished_at=BASE + 1, retries_left=0)
    _pass(db, BASE + 2)
    assert _runs(db, "report") == []  # one shard still runs: the child waits
    _set(db, shards[2].id, status=last, finished_at=BASE + 3, retries_left=0)
    _pass(db, BASE + 4)
    _pass(db, BASE + 5)
    (row,) = _runs(db, "report")
    assert (row.status, row.scheduled_at, row.slot) == (child, BASE, "")
    assert row.parent_run in {r.id for r in shards}
    assert all(r.chain is None for r in _runs(db, "idx"))  # every shard's mark cleared


@pytest.mark.parametrize(("fields", "message"), [
    ({"shards": 1}, "shards must be a whole number from 2 to 1000"),
    ({"shards": 1001}, "shards must be a whole number from 2 to 1000"),
    ({"shards": 2, "broadcast": True}, "either broadcast"),
    ({"broadcast": True, "group": "etl"}, "broadcast job runs on every live worker"),
    ({"broadcast": "yes"}, "broadcast must be true or false"),
])
def test_bad_shards_and_broadcast_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError, match=message):
        validate_job({"id": "x", "func": "jobs.builtin:noop",
                      "trigger": make_spec(every="1m"), **fields}, ALLOW)
    with pytest.raises(InputError, match="cannot be sharded or broadcast"):
        validate_job({"id": "c", "func": "jobs.builtin:noop",
                      "trigger": make_spec(after=["p"]), "shards": 2}, ALLOW)
