"""A run's routing in the database (issue 16, items 2 and 3), on both databases: a fire, a
run now, a retry and a resend by recovery all carry the routing their job had when it
fired (``qc_runs.routing``), and a run no live worker could take is recorded ``missed``
with the reason; a group's placement is read back, and a move counted."""

from __future__ import annotations

import json

from qcluster.leader.recovery import recover_runs
from qcluster.store import catalog, groups
from qcluster.store.db import Database
from tests.leader.test_policies import BASE, _add, _epoch, _fire, _runs, _set

GPU = json.dumps({"tags": ["eu", "gpu"]}, separators=(",", ":"))


def test_a_fire_and_its_resends_carry_the_routing_it_fired_with(db: Database) -> None:
    _add(db, "g", tags=["gpu", "eu"], group="etl", route="consistent-hash")
    _add(db, "plain")
    sent = {r["job_id"]: r for r in _fire(db, BASE)}
    routing = json.loads(sent["g"]["routing"])
    assert routing == {"tags": ["eu", "gpu"], "group": "etl", "route": "consistent_hash"}
    assert "routing" not in sent["plain"]  # the runs of most jobs: no routing at all
    (row,) = _runs(db, "g")
    assert json.loads(row.routing) == routing
    _add(db, "g", tags=["tpu"])  # changed after it fired: the run keeps what it had
    _set(db, row.id, created_at=BASE - 60)
    again = recover_runs(db, _epoch(db), live_workers=[], grace_seconds=3600, now=BASE + 1)
    (resent,) = [r for r in again.resend if r["job_id"] == "g"]
    assert json.loads(resent["routing"]) == routing
    with db.fenced(_epoch(db)) as conn:
        now = catalog.run_now(conn, "g", _epoch(db), "leader", now=BASE + 2)
    assert json.loads(now["routing"]) == {"tags": ["tpu"]}  # the job as it is now


def test_a_run_no_live_worker_could_take_is_missed_saying_why(db: Database) -> None:
    _add(db, "g", tags=["gpu", "eu"])
    _add(db, "grouped", group="etl", tags=["gpu"])
    _add(db, "plain")
    _fire(db, BASE)
    for name in ("g", "grouped", "plain"):
        _set(db, _runs(db, name)[0].id, created_at=BASE)
    with db.fenced(_epoch(db)) as conn:
        groups.place(conn, "etl", "w-cpu", epoch=_epoch(db), now=BASE)
    tags = {"w-gpu": frozenset({"gpu"}), "w-cpu": frozenset()}
    recover_runs(db, _epoch(db), live_workers=[], grace_seconds=5, now=BASE + 60,
                 worker_tags=tags)
    errors = {name: _runs(db, name)[0] for name in ("g", "grouped", "plain")}
    assert {n: r.status for n, r in errors.items()} == dict.fromkeys(errors, "missed")
    assert errors["g"].error.endswith(": no live worker has the tags eu, gpu")
    assert errors["grouped"].error.endswith(
        ": its affinity group 'etl' sits on worker w-cpu, which lacks the tags gpu")
    assert errors["plain"].error == "never dispatched within the misfire grace time (5s)"


def test_a_placement_is_read_back_and_a_move_is_counted(db: Database) -> None:
    epoch = _epoch(db)
    with db.fenced(epoch) as conn:
        groups.place(conn, "etl", "w1", epoch=epoch, now=BASE)
        groups.place(conn, "etl", "w1", epoch=epoch, now=BASE + 1)  # the same: no move
        groups.place(conn, "ml", "w2", epoch=epoch, now=BASE + 2)
        groups.place(conn, "etl", "w3", epoch=epoch, now=BASE + 3)
    with db.read() as conn:
        assert groups.placements(conn) == {"etl": "w3", "ml": "w2"}
        assert groups.placements(conn, ["ml", "none"]) == {"ml": "w2"}
        assert [(g["name"], g["worker"], g["moves"]) for g in groups.list_groups(conn)] == [
            ("etl", "w3", 1), ("ml", "w2", 0)]


def test_a_grace_shorter_than_the_resend_delay_is_kept(db: Database) -> None:
    """An outside look found runs that waited for their tags starting 5 s late with a 1 s
    grace: recovery let a fresh row be (the dispatcher has it) before judging its grace."""
    _add(db, "g", tags=["tpu"], misfire_grace_seconds=2)
    _fire(db, BASE)
    (row,) = _runs(db, "g")
    _set(db, row.id, created_at=BASE)  # written at its fire time, by this epoch
    recover_runs(db, _epoch(db), live_workers=[], grace_seconds=60, now=BASE + 1.5,
                 worker_tags={})
    assert _runs(db, "g")[0].status == "scheduled"  # within its grace: left to the dispatcher
    recover_runs(db, _epoch(db), live_workers=[], grace_seconds=60, now=BASE + 3,
                 worker_tags={})
    (row,) = _runs(db, "g")
    assert (row.status, row.error) == (
        "missed", "never dispatched within the misfire grace time (2s): no live worker has "
                  "the tags tpu")
