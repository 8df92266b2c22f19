"""Job changes (add, apply, pause, resume, remove, run now, backfill) and run cancels, as
the CLI and Client make them.

Job changes go to the leader's control object while a leader is alive, so that the one
scheduler that owns the store makes them. When no leader is alive, they are written
directly, in a transaction fenced on the epoch read beforehand: if a leader appears in
between, the write is refused rather than racing it. The leader re-reads the store within
``poll_seconds`` either way.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from backends.base import LeaderInfo
from qcluster.client.admin import cluster_backends, live_leader, open_db, read_state
from qcluster.client.reads import read
from qcluster.definitions.jobdefs import JobDef, check_job_id
from qcluster.definitions.policy import defaults_from
from qcluster.errors import INPUT_KINDS, DatabaseUnavailable, Fenced, InputError, QClusterError
from qcluster.settings import Settings
from qcluster.store import backfill, bounds, cancels, catalog
from qcluster.store.cancels import cancel_run as cancel_one
from qcluster.store.cluster import ClusterState, read_cluster
from qcluster.store.db import Database

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """A job change's result, and whether it went through the leader or the database."""

    result: Any
    via: str  # "leader <node id>" or "database"


def _leader_alive(settings: Settings, db: Database) -> LeaderInfo | None:
    state = read_state(db)
    with cluster_backends(settings, db, state.required) as backends:
        return live_leader(state, backends)


def _call_leader(settings: Settings, uri: str, method: str, args: tuple[Any, ...]) -> Any:
    # Imported here: read-only commands (`jobs list`, `runs list`) never load Pyro5 or
    # the node's machinery, which is most of a command's start-up time.
    from qcluster.node import cluster_secret
    from qcluster.rpc.pyro import configure_pyro, proxy

    s = settings
    configure_pyro(serializer=s.rpc.serializer, timeout=s.rpc.timeout_seconds,
                   max_message_bytes=s.rpc.max_message_bytes, tls=s.rpc.tls)
    with proxy(uri, cluster_secret(settings), min(5.0, s.rpc.timeout_seconds)) as p:
        return getattr(p, method)(*args)


def change(
    settings: Settings,
    method: str,
    args: tuple[Any, ...],
    direct: Callable[[Connection, int], Any],
) -> Outcome:
    """Make a job change through the leader, or directly when no leader is alive.

    A leader that wins the election between our read of the cluster row and our fenced
    write makes the write fail with nothing written; that race is expected (a node
    starting as the command runs), so the change is made again, now through the new
    leader, up to :data:`CHANGE_ATTEMPTS` times in all."""
    db = open_db(settings)
    try:
        for _ in range(CHANGE_ATTEMPTS):
            outcome = _change_once(settings, db, method, args, direct)
            if outcome is not None:
                return outcome
        raise QClusterError("leaders kept taking over during the change; try again")
    finally:
        db.dispose()


CHANGE_ATTEMPTS = 3


def _change_once(settings: Settings, db: Database, method: str, args: tuple[Any, ...],
                 direct: Callable[[Connection, int], Any]) -> Outcome | None:
    """One try of :func:`change`; None if a leader took over before the direct write."""
    state = read_cluster(db)
    assert state is not None
    reply = _try_leader(settings, state, method, args)
    if reply is not None:
        return reply
    info = _leader_alive(settings, db)
    if info is not None:
        reply = _try_leader(settings, dataclasses.replace(state, leader_uri=info.uri),
                            method, args)
        if reply is not None:
            return reply
        raise QClusterError(
            f"leader {info.node_id} is alive but its control API at {info.uri} did not "
            "answer; try again"
        )
    try:
        with db.fenced(state.epoch) as conn:
            return Outcome(direct(conn, state.epoch), "database")
    except Fenced:
        log.info("a leader took over during the change (epoch %s); trying again", state.epoch)
        return None
    except IntegrityError:
        # Another direct change inserted the same job id between our read and our insert
        # (PostgreSQL: fenced writers share the cluster row lock). Made again, the change
        # sees that job: `add` reports that it exists, `apply` updates it.
        log.info("a concurrent change wrote the same job; trying again")
        return None


def _try_leader(settings: Settings, state: ClusterState, method: str,
                args: tuple[Any, ...]) -> Outcome | None:
    if not state.leader_uri:
        return None
    import Pyro5.errors

    try:
        reply = _call_leader(settings, state.leader_uri, method, args)
    except Pyro5.errors.CommunicationError as e:
        log.info("leader at %s did not answer: %s", state.leader_uri, e)
        return None
    except Pyro5.errors.PyroError as e:
        raise QClusterError(f"leader refused the call: {e}") from None
    if not isinstance(reply, dict):
        raise QClusterError("leader sent a malformed reply")
    if reply.get("ok"):
        return Outcome(reply.get("result", reply.get("run_id")), f"leader {state.leader_id}")
    kind, error = reply.get("kind"), str(reply.get("error", "unknown error"))
    if kind == "not_leader":
        return None
    if kind == "input":
        raise InputError(error)
    if kind in INPUT_KINDS:
        raise INPUT_KINDS[kind](error)
    if kind == "unavailable":
        raise DatabaseUnavailable(error)
    raise QClusterError(error)


# -- the job changes ----------------------------------------------------------------------


def add_jobs(settings: Settings, defs: list[JobDef], *, replace: bool) -> Outcome:
    wire = [d.to_wire() for d in defs]
    return change(
        settings, "add_jobs", (wire, replace),
        lambda conn, _epoch: cancels.upsert_jobs(
            conn, defs, replace=replace,
            retention_seconds=settings.runs.retention_seconds).to_wire(),
    )


def apply_jobs(settings: Settings, defs: list[JobDef], *, prune: bool) -> Outcome:
    def direct(conn: Connection, _epoch: int) -> dict[str, list[str]]:
        return cancels.upsert_jobs(conn, defs, replace=True, prune=prune,
                                   retention_seconds=settings.runs.retention_seconds).to_wire()

    return change(settings, "apply_jobs", ([d.to_wire() for d in defs], prune), direct)


_ONE: dict[str, Callable[[Connection, str], None]] = {
    "pause_job": cancels.pause_job,  # and its runs sent ahead withdrawn
    "resume_job": catalog.resume_job,
    "remove_job": cancels.remove_job,  # and its open runs cancelled
}


def job_action(settings: Settings, action: str, job_id: str) -> Outcome:
    """``pause``, ``resume`` or ``remove`` one job."""
    check_job_id(job_id)
    op = _ONE[f"{action}_job"]
    return change(settings, f"{action}_job", (job_id,), lambda conn, _e: op(conn, job_id))


def run_job(settings: Settings, job_id: str) -> Outcome:
    """Fire a job now. With no leader, the run is recorded and the next leader sends it."""
    check_job_id(job_id)
    return change(
        settings, "run_job", (job_id,),
        lambda conn, epoch: catalog.run_now(
            conn, job_id, epoch, "cli", defaults=defaults_from(settings.scheduler))["run_id"],
    )


def backfill_job(settings: Settings, job_id: str, start: str, end: str) -> Outcome:
    """Run each fire time of ``job_id`` in ``[start, end]`` that has no run yet
    (:mod:`qcluster.store.backfill`); the result is the counts. Checked and planned here
    first, so a bad range is refused before any leader is asked; with no leader, the plan
    is written fenced on the epoch read, and the next leader sends the new runs."""
    check_job_id(job_id)
    first = backfill.check_time_text(start, "--from")
    last = backfill.check_time_text(end, "--to")
    window = read(settings, lambda conn: backfill.window(
        conn, job_id, first, last, retention_seconds=settings.runs.retention_seconds))
    planned = backfill.compute(window)  # with no transaction open (store/backfill.py)
    defaults = defaults_from(settings.scheduler)
    return change(
        settings, "backfill_job", (job_id, first, last),
        lambda conn, epoch: backfill.record(conn, planned, epoch, "cli",
                                            defaults=defaults)[1].to_wire(),
    )


def cancel_run(settings: Settings, run_id: int) -> Outcome:
    """Stop any further attempt of run ``run_id``; the result is ``{"run_id", "status",
    "attempt"}`` with ``status`` ``cancelled`` (it never starts) or ``running`` (marked:
    its worker stops it and records it ``cancelled``; no new attempt). InputError
    for a run that does not exist or has already finished."""
    bounds.check_int(run_id, "run id", bounds.RUN_ID)
    return change(settings, "cancel_run", (run_id,),
                  lambda conn, _epoch: cancel_one(conn, run_id))
