"""Calendars through the leader's control object (called in-process, on SQLite and on
PostgreSQL): its writes really run, fenced on the leader's epoch; a refusal writes
nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from backends.dblock import DBLockBackend
from qcluster.definitions.jobdefs import JobDef
from qcluster.definitions.policy import Policy
from qcluster.definitions.triggers import make_spec
from qcluster.errors import InputError
from qcluster.leader.control import ControlService
from qcluster.leader.role import LeaderRole
from qcluster.settings import load_settings_from_mapping
from qcluster.store import calendars, catalog, schema
from qcluster.store.cluster import read_cluster, take_epoch
from qcluster.store.db import Database

HELLO = "jobs.examples:hello"


def leading(db: Database) -> LeaderRole:
    """A LeaderRole that leads at the cluster's epoch, with no scheduler or dispatcher."""
    role = LeaderRole(load_settings_from_mapping({}, "test", {}), db, members=list,
                      node_id="s1", control_uri="PYRO:x@127.0.0.1:1", secret="s" * 32,
                      revoke=lambda reason: None)
    state = read_cluster(db)
    assert state is not None
    role.epoch = state.epoch
    return role


def snapshot(db: Database) -> tuple[list[Any], ...]:
    with db.read() as conn:
        return tuple([tuple(r) for r in conn.execute(sa.select(t).order_by(*t.primary_key))]
                     for t in (schema.calendars, schema.jobs, schema.runs))


@pytest.fixture
def control(db: Database) -> ControlService:
    return ControlService(db, leading(db), ["jobs.*"], "s1")


def job(job_id: str, *exclude: str) -> dict[str, Any]:
    return JobDef(job_id, HELLO, make_spec(every="1m"), policy=Policy(exclude=exclude)).to_wire()


def test_the_leader_adds_replaces_and_removes_calendars(control: ControlService,
                                                        db: Database) -> None:
    assert control.add_calendar("xmas", ["2026-12-25", "2026-12-24..2026-12-26"], False) == {
        "ok": True, "result": "created"}
    assert control.add_calendar("xmas", ["2026-12-25"], True)["result"] == "replaced"
    with db.read() as conn:
        cal = calendars.get_calendar(conn, "xmas")
    assert (cal.version, cal.to_wire()["dates"]) == (2, ["2026-12-25"])
    assert control.add_jobs([job("j", "xmas")], False)["ok"]
    refused = control.remove_calendar("xmas")
    assert refused["ok"] is False and "'j'" in refused["error"]
    assert control.remove_job("j")["ok"]
    assert control.remove_calendar("xmas") == {"ok": True, "result": None}


@pytest.mark.parametrize("call", [
    ("add_calendar", ("bad name", ["2026-01-01"], False)),
    ("add_calendar", (7, ["2026-01-01"], False)),
    ("add_calendar", (10**5000, ["2026-01-01"], False)),
    ("add_calendar", ("x", "2026-01-01", False)),
    ("add_calendar", ("x", [], False)),
    ("add_calendar", ("x", [20260101], False)),
    ("add_calendar", ("x", ["2026-02-30"], False)),
    ("add_calendar", ("x", ["2026-01-01,,2026-01-03"], False)),
    ("add_calendar", ("x", ["2026-01-01", " "], False)),
    ("add_calendar", ("x", ["2026-01-01"] * 10_001, False)),
    ("add_calendar", ("x", ["2026-01-01"], "yes")),
    ("add_calendar", ("held", ["2026-01-01"], False)),  # exists, no replace
    ("remove_calendar", ("nope",)),
    ("remove_calendar", ("held",)),  # a job excludes it
    ("remove_calendar", ([],)),
    ("add_jobs", ([job("new", "nope")], False)),
    ("apply_jobs", ([job("ok"), job("new", "held", "nope")], True)),
], ids=["bad-name", "int-name", "huge-int-name", "text-not-list", "no-dates", "int-date",
        "feb-30", "empty-item", "blank-item", "too-many", "replace-not-bool", "exists",
        "remove-missing", "remove-used",
        "remove-list", "job-missing-calendar", "apply-missing-calendar"])
def test_a_refused_calendar_or_job_call_answers_input_and_writes_nothing(
    control: ControlService, db: Database, call: tuple[str, tuple[Any, ...]]
) -> None:
    assert control.add_calendar("held", ["2026-01-01"], False)["ok"]
    assert control.add_jobs([job("user", "held")], False)["ok"]
    before = snapshot(db)
    reply = getattr(control, call[0])(*call[1])
    assert reply["ok"] is False and reply["kind"] == "input", reply
    assert "\n" not in reply["error"]
    assert snapshot(db) == before


def test_a_stale_leader_writes_no_calendar(db: Database) -> None:
    control = ControlService(db, leading(db), ["jobs.*"], "s1")
    backend = DBLockBackend(db, lease_seconds=30.0, member_timeout=3.0)
    lease = backend.try_acquire("s2", lambda reason: None)
    assert lease is not None
    take_epoch(db, node_id="s2", uri="PYRO:s2@x:1", lease=lease)  # a new leader
    reply = control.add_calendar("xmas", ["2026-12-25"], False)
    assert reply["kind"] == "not_leader"
    with db.read() as conn:
        assert calendars.load_calendars(conn) == {}


def test_upsert_jobs_checks_calendars_in_its_transaction(db: Database) -> None:
    defs = [JobDef("j", HELLO, make_spec(every="1m"), policy=Policy(exclude=("a", "b")))]
    state = read_cluster(db)
    assert state is not None
    with pytest.raises(InputError, match="job 'j' excludes calendar 'a'"), \
            db.fenced(state.epoch) as conn:
        catalog.upsert_jobs(conn, defs, replace=False)
    with db.fenced(state.epoch) as conn:
        calendars.put_calendar(conn, "a", calendars.parse_dates(["2026-01-01"]), replace=False)
        calendars.put_calendar(conn, "b", calendars.parse_dates(["2026-01-02"]), replace=False)
        assert catalog.upsert_jobs(conn, defs, replace=False).created == ["j"]
        assert calendars.jobs_using(conn, "b") == ["j"]


def test_a_one_off_job_older_than_the_run_retention_is_refused_with_nothing_written(
    control: ControlService, db: Database,
) -> None:
    """Issue 15's attack: ``--at`` a year ago was accepted, and the job vanished with no
    run row (its ``missed`` row is older than the pruning horizon). Refused now, on the
    leader's path as on the CLI's direct one; a date inside the retention is taken."""
    now = datetime.now(UTC)
    old = (now - timedelta(days=8)).isoformat()  # the default retention is 7 days
    recent = (now - timedelta(days=6)).isoformat()
    before = snapshot(db)
    refused = control.add_jobs([JobDef("old", HELLO, make_spec(at=old)).to_wire(),
                                job("beside")], False)
    assert refused["ok"] is False and refused["kind"] == "input"
    assert refused["error"].startswith("job 'old': its fire time ")
    assert "older than the runs kept ([runs] retention_days = 7)" in refused["error"]
    assert snapshot(db) == before
    assert control.add_jobs([JobDef("recent", HELLO, make_spec(at=recent)).to_wire()],
                            False)["ok"] is True
