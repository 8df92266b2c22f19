"""What the CLI does, as library functions: job changes, listings, cluster status.

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

import Pyro5.errors
from sqlalchemy.engine import Connection

from backends.base import LeaderInfo
from backends.loader import load_backend
from qcluster import catalog
from qcluster.cluster import ClusterState, ensure_cluster, read_cluster
from qcluster.config import Settings
from qcluster.db import Database
from qcluster.errors import DatabaseUnavailable, Fenced, InputError, QClusterError
from qcluster.jobdefs import JobDef, check_job_id
from qcluster.node import cluster_secret
from qcluster.rpc import configure_pyro, proxy

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """A job change's result, and whether it went through the leader or the database."""

    result: Any
    via: str  # "leader <node id>" or "database"


def open_db(settings: Settings, *, create: bool | None = None) -> Database:
    """The shared database, with its schema checked. An embedded one is created on use."""
    db = Database(settings.database_url())
    create = settings.is_embedded if create is None else create
    if not db.is_current():
        if not create:
            raise DatabaseUnavailable(
                f"database {db.display_url} has no current qcluster schema; "
                "run `qcluster db upgrade`"
            )
        db.upgrade()
    ensure_cluster(db, settings.cluster.name, settings.coordination.backend)
    return db


def _leader_alive(settings: Settings, db: Database) -> LeaderInfo | None:
    backend = load_backend(settings, db)
    backend.start()
    try:
        return backend.read_leader()
    finally:
        backend.stop()


def _call_leader(settings: Settings, uri: str, method: str, args: tuple[Any, ...]) -> Any:
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
    """Make a job change through the leader, or directly when no leader is alive."""
    db = open_db(settings)
    try:
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
                result = direct(conn, state.epoch)
        except Fenced:
            raise QClusterError("a leader took over during the change; try again") from None
        return Outcome(result, "database")
    finally:
        db.dispose()


def _try_leader(settings: Settings, state: ClusterState, method: str,
                args: tuple[Any, ...]) -> Outcome | None:
    if not state.leader_uri:
        return None
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
    if kind == "unavailable":
        raise DatabaseUnavailable(error)
    raise QClusterError(error)


# -- the job changes ----------------------------------------------------------------------


def add_jobs(settings: Settings, defs: list[JobDef], *, replace: bool) -> Outcome:
    wire = [d.to_wire() for d in defs]
    return change(
        settings, "add_jobs", (wire, replace),
        lambda conn, _epoch: catalog.upsert_jobs(conn, defs, replace=replace).to_wire(),
    )


def apply_jobs(settings: Settings, defs: list[JobDef], *, prune: bool) -> Outcome:
    def direct(conn: Connection, _epoch: int) -> dict[str, list[str]]:
        result = catalog.upsert_jobs(conn, defs, replace=True)
        if prune:
            result.removed = catalog.prune_jobs(conn, [d.id for d in defs])
        return result.to_wire()

    return change(settings, "apply_jobs", ([d.to_wire() for d in defs], prune), direct)


_ONE: dict[str, Callable[[Connection, str], None]] = {
    "pause_job": catalog.pause_job,
    "resume_job": catalog.resume_job,
    "remove_job": catalog.remove_job,
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
        lambda conn, epoch: catalog.run_now(conn, job_id, epoch, "cli")["run_id"],
    )


# -- reads ------------------------------------------------------------------------------------


def list_jobs(settings: Settings, *, limit: int) -> list[dict[str, Any]]:
    db = open_db(settings)
    try:
        with db.read() as conn:
            return catalog.list_jobs(conn, limit=limit)
    finally:
        db.dispose()


def show_job(settings: Settings, job_id: str) -> dict[str, Any]:
    check_job_id(job_id)
    db = open_db(settings)
    try:
        with db.read() as conn:
            job = catalog.get_job(conn, job_id)
            job["recent_runs"] = catalog.list_runs(conn, job_id=job_id, limit=5)
            return job
    finally:
        db.dispose()


def list_runs(settings: Settings, **filters: Any) -> list[dict[str, Any]]:
    db = open_db(settings)
    try:
        with db.read() as conn:
            return catalog.list_runs(conn, **filters)
    finally:
        db.dispose()


def cluster_status(settings: Settings) -> dict[str, Any]:
    db = open_db(settings)
    try:
        state = read_cluster(db)
        assert state is not None
        backend = load_backend(settings, db)
        backend.start()
        try:
            info = backend.read_leader()
            members = backend.live_members()
        finally:
            backend.stop()
    finally:
        db.dispose()
    leader = None
    if info is not None:
        leader = {"node_id": info.node_id, "uri": info.uri, "since": catalog.iso(info.since),
                  "epoch": info.epoch}
    return {
        "cluster": state.name,
        "backend": state.backend,
        "phase": state.phase,
        "epoch": state.epoch,
        "leader": leader,
        "members": [
            {"node_id": m.node_id, "roles": list(m.roles), "uri": m.uri,
             "capacity": m.capacity, "status": m.status, "last_seen": catalog.iso(m.last_seen)}
            for m in members
        ],
    }


def upgrade_db(settings: Settings) -> str:
    db = Database(settings.database_url())
    try:
        db.upgrade()
        ensure_cluster(db, settings.cluster.name, settings.coordination.backend)
        return db.current_revision() or "?"
    finally:
        db.dispose()


def check_database(settings: Settings) -> str:
    db = Database(settings.database_url())
    try:
        with db.read() as conn:
            db.now(conn)
        return db.display_url
    except QClusterError:
        raise
    finally:
        db.dispose()
