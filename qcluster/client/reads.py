"""What the read commands show: jobs, runs, the cluster and its coordination backend."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.engine import Connection

from backends.base import MemberInfo
from qcluster.client.admin import open_db, snapshot
from qcluster.definitions.jobdefs import check_job_id
from qcluster.leader import migration
from qcluster.settings import Settings
from qcluster.store import catalog, groups
from qcluster.store.cluster import ClusterState

T = TypeVar("T")


def read(settings: Settings, op: Callable[[Connection], T]) -> T:
    """``op`` on a read connection of a database opened for it, and closed after."""
    db = open_db(settings)
    try:
        with db.read() as conn:
            return op(conn)
    finally:
        db.dispose()


def list_jobs(settings: Settings, *, limit: int) -> list[dict[str, Any]]:
    return read(settings, lambda conn: catalog.list_jobs(conn, limit=limit))


def show_job(settings: Settings, job_id: str) -> dict[str, Any]:
    check_job_id(job_id)

    def show(conn: Connection) -> dict[str, Any]:
        job = catalog.get_job(conn, job_id)
        job["recent_runs"] = catalog.list_runs(conn, job_id=job_id, limit=5)
        return job

    return read(settings, show)


def list_runs(settings: Settings, **filters: Any) -> list[dict[str, Any]]:
    return read(settings, lambda conn: catalog.list_runs(conn, **filters))


def show_run(settings: Settings, run_id: int) -> dict[str, Any]:
    return read(settings, lambda conn: catalog.get_run(conn, run_id))


def cluster_status(settings: Settings) -> dict[str, Any]:
    db = open_db(settings)
    try:
        state, info, members = snapshot(settings, db)
        with db.read() as conn:
            placed = groups.list_groups(conn)
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
        "target_backend": state.target_backend,
        "config_version": state.config_version,
        "epoch": state.epoch,
        "leader": leader,
        "members": [member_view(m) for m in members],
        "groups": [{**g, "since": catalog.iso(g["since"])} for g in placed],
    }


def member_view(m: MemberInfo) -> dict[str, Any]:
    return {"node_id": m.node_id, "roles": list(m.roles), "uri": m.uri,
            "capacity": m.capacity, "tags": list(m.tags), "backends": list(m.backends),
            "config_version": m.config_version, "status": m.status,
            "last_seen": catalog.iso(m.last_seen)}


def backend_status(settings: Settings) -> dict[str, Any]:
    """The cluster's backend and migration phase, and which scheduler nodes honour it."""
    db = open_db(settings)
    try:
        state, _info, members = snapshot(settings, db)
    finally:
        db.dispose()
    return backend_view(state, members)


def backend_view(state: ClusterState, members: list[MemberInfo]) -> dict[str, Any]:
    p = migration.progress(state, members)
    return {
        "backend": state.backend,
        "phase": state.phase,
        "target_backend": state.target_backend,
        "config_version": state.config_version,
        "phase_since": catalog.iso(state.phase_since),
        "epoch": state.epoch,
        "leader": state.leader_id if state.leader_uri else None,
        "leader_lease": state.leader_backend,
        "joined": p.joined,
        "waiting": [{"node_id": n, "why": why} for n, why in p.waiting],
        "schedulers": [member_view(m) for m in migration.schedulers(members)],
    }
