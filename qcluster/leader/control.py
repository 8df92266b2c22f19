"""The control object: how the CLI changes jobs through the leader, over Pyro5.

Every method takes plain data, checks it as the CLI and ``qcluster.Client`` do (the same
function, ``definitions/jobdefs.validate_job`` with ``import_it=True``: the allow list,
then the import, so a function that does not import or is not allowed is never stored),
and answers ``{"ok": True, ...}`` or
``{"ok": False, "kind": ..., "error": "one line"}``; no exception crosses the wire.
``kind`` is ``not_leader`` (ask again elsewhere or write directly), ``input`` (bad
request: nothing was written; ``not_found``, ``exists`` and ``not_allowed`` are the kinds
of it that have an exception class of their own, see :data:`INPUT_KINDS`) or
``unavailable``. Writes happen in one transaction
fenced on the leader's epoch, and then the scheduler is woken so it sees them at once.

Numbers from the caller: the only one stored in an integer column is a job's
``misfire_grace_seconds`` (``qc_jobs``, int4), refused by ``validate_job`` outside 1 to
2**31 - 1; a trigger's ``seconds`` is bounded by the trigger checks, and integers inside
``args``/``kwargs`` are stored as JSON text. Run ids and epochs are made by the leader,
never taken from the caller. A value that cannot even be shown in the refusal (an
integer of more than 4300 digits, which only an in-process caller can pass: neither
msgpack nor JSON over Pyro5 decodes one) is refused as ``input`` too, not raised.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import Pyro5.server
from sqlalchemy.engine import Connection

from qcluster.definitions.jobdefs import check_job_id, validate_job
from qcluster.definitions.policy import Defaults, check_calendar_name, defaults_from
from qcluster.errors import INPUT_KINDS, Fenced, InputError, QClusterError
from qcluster.leader.role import LeaderRole
from qcluster.rpc.server import refuse_call
from qcluster.settings import redact_text
from qcluster.store import backfill, bounds, calendars, cancels, catalog
from qcluster.store.cancels import cancel_run
from qcluster.store.db import Database
from qcluster.store.records import RunRecord

log = logging.getLogger(__name__)

MAX_JOBS_PER_CALL = 100_000
_T = TypeVar("_T")


def _ok(**data: Any) -> dict[str, Any]:
    return {"ok": True, **data}


def _err(kind: str, error: str) -> dict[str, Any]:
    return {"ok": False, "kind": kind, "error": error}


def _refused(e: InputError) -> dict[str, Any]:
    kind = next((k for k, cls in INPUT_KINDS.items() if isinstance(e, cls)), "input")
    refuse_call("control", str(e))
    return _err(kind, str(e))


#: What checking a value can raise when the value cannot be shown in the InputError:
#: ValueError from str() of an integer past Python's 4300 digits, RecursionError from the
#: repr of a very deeply nested list.
_UNSHOWABLE = (ValueError, RecursionError)


def _unshowable(e: BaseException) -> dict[str, Any]:
    what = "too deeply nested" if isinstance(e, RecursionError) else "too large"
    return _err("input", f"malformed request: a value {what} to check")


@Pyro5.server.expose
class ControlService:
    """Job changes, made by the leader that owns the store."""

    def __init__(self, db: Database, leader: LeaderRole, allow: list[str], node_id: str,
                 defaults: Defaults | None = None) -> None:
        self._db = db
        self._leader = leader
        self._allow = allow
        self._node_id = node_id
        # [scheduler] retries and backoff, for run now and backfill
        self._defaults = (defaults_from(leader.settings.scheduler) if defaults is None
                          else defaults)
        # [runs] retention_days: a run older could not be recorded (it would be pruned)
        self._retention = leader.settings.runs.retention_seconds

    def whoami(self) -> dict[str, Any]:
        return _ok(node_id=self._node_id, leading=self._leader.active, epoch=self._leader.epoch)

    def add_jobs(self, jobs: Any, replace: Any) -> dict[str, Any]:
        if not isinstance(replace, bool):
            return _err("input", "replace must be true or false")
        return self._apply(jobs, replace=replace, prune=False)

    def apply_jobs(self, jobs: Any, prune: Any) -> dict[str, Any]:
        if not isinstance(prune, bool):
            return _err("input", "prune must be true or false")
        return self._apply(jobs, replace=True, prune=prune)

    def pause_job(self, job_id: Any) -> dict[str, Any]:
        return self._one(job_id, cancels.pause_job)

    def resume_job(self, job_id: Any) -> dict[str, Any]:
        return self._one(job_id, catalog.resume_job)

    def remove_job(self, job_id: Any) -> dict[str, Any]:
        return self._one(job_id, cancels.remove_job)

    def cancel_run(self, run_id: Any) -> dict[str, Any]:
        """Stop any further attempt of one run (:func:`qcluster.store.runs.cancel`): the
        result is ``{"run_id", "status", "attempt"}``, ``status`` ``cancelled`` or
        ``running`` (it goes on; it gets no new attempt)."""
        try:
            rid = bounds.check_int(run_id, "run id", bounds.RUN_ID)
        except InputError as e:
            return _refused(e)
        except _UNSHOWABLE as e:
            return _unshowable(e)
        return self._write(lambda conn: cancel_run(conn, rid))

    def run_job(self, job_id: Any) -> dict[str, Any]:
        runs: list[RunRecord] = []

        def record(conn: Connection, jid: str) -> None:
            epoch = self._leader.epoch
            assert epoch is not None
            runs.extend(catalog.run_now_all(conn, jid, epoch, self._node_id,
                                            defaults=self._defaults))

        reply = self._one(job_id, record)
        if reply["ok"]:
            self._leader.send(runs)
            reply["run_id"] = reply["result"] = runs[0]["run_id"]
        return reply

    def backfill_job(self, job_id: Any, start: Any, end: Any) -> dict[str, Any]:
        """Run each fire time of a job in ``[start, end]`` (ISO 8601 texts) that has no
        run yet (:mod:`qcluster.store.backfill`); the new runs are sent once committed.
        The result is the counts (``fire_times``, ``new``, ``skipped``, ``already``)."""
        try:
            jid = check_job_id(job_id)
            first = backfill.check_time_text(start, "--from")
            last = backfill.check_time_text(end, "--to")
            # Read on a read connection, then planned with none open: computing 10,000
            # fire times must not hold a transaction idle (store/backfill.py).
            with self._db.read() as conn:
                window = backfill.window(conn, jid, first, last,
                                         retention_seconds=self._retention)
            planned = backfill.compute(window)
        except InputError as e:
            return _refused(e)
        except _UNSHOWABLE as e:
            return _unshowable(e)
        except QClusterError as e:
            return _err("unavailable", str(e))
        runs: list[RunRecord] = []
        defaults = self._defaults

        def write(conn: Connection) -> dict[str, Any]:
            epoch = self._leader.epoch
            assert epoch is not None
            new, counts = backfill.record(conn, planned, epoch, self._node_id,
                                          defaults=defaults)
            runs.extend(new)
            return counts.to_wire()

        reply = self._write(write)
        if reply["ok"]:
            self._leader.send(runs, bulk=True)
        return reply

    def add_calendar(self, name: Any, dates: Any, replace: Any) -> dict[str, Any]:
        """Create calendar ``name`` from ``dates`` (texts, as ``qcluster calendars add``
        takes them); with ``replace``, set its dates. The result is ``created``,
        ``replaced`` or ``unchanged``."""
        if not isinstance(replace, bool):
            return _err("input", "replace must be true or false")
        if not isinstance(dates, list) or len(dates) > calendars.MAX_RANGES:
            return _err("input", f"dates must be a list of at most {calendars.MAX_RANGES}")
        return self._checked(
            lambda: (check_calendar_name(name), calendars.parse_dates(dates)),
            lambda conn, c: calendars.put_calendar(conn, *c, replace=replace))

    def remove_calendar(self, name: Any) -> dict[str, Any]:
        """Remove calendar ``name``; refused while a job excludes it."""
        return self._checked(lambda: check_calendar_name(name), calendars.remove_calendar)

    # -- plumbing ------------------------------------------------------------------------

    def _apply(self, jobs: Any, *, replace: bool, prune: bool) -> dict[str, Any]:
        if not isinstance(jobs, list) or len(jobs) > MAX_JOBS_PER_CALL:
            return _err("input", f"jobs must be a list of at most {MAX_JOBS_PER_CALL}")
        try:
            defs = [validate_job(j, self._allow, import_it=True) for j in jobs]
        except InputError as e:
            return _refused(e)
        except _UNSHOWABLE as e:
            return _unshowable(e)

        def write(conn: Connection) -> dict[str, Any]:
            return cancels.upsert_jobs(conn, defs, replace=replace, prune=prune,
                                       retention_seconds=self._retention).to_wire()

        return self._write(write)

    def _one(self, job_id: Any, op: Callable[[Connection, str], None]) -> dict[str, Any]:
        return self._checked(lambda: check_job_id(job_id), op)

    def _checked(self, check: Callable[[], _T], op: Callable[[Connection, _T], Any]
                 ) -> dict[str, Any]:
        """``op`` on what ``check`` made of the caller's data, in :meth:`_write`'s fenced
        transaction; a refusal of ``check`` answers ``input`` and writes nothing."""
        try:
            value = check()
        except InputError as e:
            return _refused(e)
        except _UNSHOWABLE as e:
            return _unshowable(e)
        return self._write(lambda conn: op(conn, value))

    def _write(self, op: Callable[[Connection], Any]) -> dict[str, Any]:
        epoch = self._leader.epoch
        if epoch is None or not self._leader.active:
            return _err("not_leader", f"node {self._node_id} does not lead")
        try:
            with self._db.fenced(epoch) as conn:
                result = op(conn)
        except InputError as e:
            return _refused(e)
        except Fenced as e:
            return _err("not_leader", str(e))
        except QClusterError as e:
            return _err("unavailable", str(e))
        except Exception as e:  # never let a bug take the daemon thread's caller down
            log.exception("control call failed")
            return _err("internal", f"{type(e).__name__}: {redact_text(str(e))}")
        self._leader.wakeup()
        return _ok(result=result)

