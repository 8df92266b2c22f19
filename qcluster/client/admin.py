"""The shared database and the coordination backends as a command sees them: opening,
upgrading and checking the database, reading the cluster row, the live leader and members.

The commands themselves: job changes in :mod:`qcluster.client.changes`, reads and status in
:mod:`qcluster.client.reads`, the backend move in :mod:`qcluster.client.moves`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator

from backends.base import CoordinationBackend, LeaderInfo, MemberInfo
from backends.joint import merge_members
from backends.loader import load_backend_by_name
from qcluster.errors import DatabaseUnavailable, QClusterError
from qcluster.settings import Settings
from qcluster.store.cluster import ClusterState, ensure_cluster, read_cluster
from qcluster.store.db import Database

log = logging.getLogger(__name__)


def open_db(settings: Settings, *, create: bool | None = None) -> Database:
    """The shared database, with its schema checked. An embedded one is created on use."""
    db = Database.from_settings(settings)
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


@contextlib.contextmanager
def cluster_backends(settings: Settings, db: Database,
                     names: Iterable[str]) -> Iterator[list[CoordinationBackend]]:
    """The backends ``names`` that this config can reach, connected, with ``dblock`` (the
    member list every node keeps in the database) first. One that cannot be reached is
    left out: every member is listed in the database anyway, and a rollback must work
    precisely when the new backend does not answer."""
    capable = settings.coordination.capabilities()
    wanted = ["dblock", *(b for b in dict.fromkeys(names) if b != "dblock" and b in capable)]
    started: list[CoordinationBackend] = []
    try:
        for name in wanted:
            backend = load_backend_by_name(name, settings, db)
            try:
                backend.start()
            except QClusterError as e:
                if name == "dblock":
                    raise
                log.info("cannot reach %s: %s", name, e)
                continue
            started.append(backend)
        yield started
    finally:
        for backend in started:
            backend.stop()


def snapshot(settings: Settings,
             db: Database) -> tuple[ClusterState, LeaderInfo | None, list[MemberInfo]]:
    """The cluster row, the live leader (as the phase's backends tell) and live members."""
    state = read_state(db)
    with cluster_backends(settings, db, state.required) as backends:
        members = live_members(backends)
        return state, live_leader(state, backends, members), members


def live_leader(state: ClusterState, backends: list[CoordinationBackend],
                members: list[MemberInfo] | None = None) -> LeaderInfo | None:
    """The leader as the phase's backends tell. When this config reaches none of them
    (it names another backend and has no servers for the cluster's), the leader the
    cluster row records, if that node is a live member (every node checks in to the
    database's member list) that says it leads: the leader is found whatever backend
    the command's own config names."""
    reached = [b for b in backends if b.name in state.required]
    for backend in reached:
        info = backend.read_leader()
        if info is not None:
            return info
    if reached or members is None or not state.leader_id or not state.leader_uri:
        return None
    for m in members:
        if m.node_id == state.leader_id and m.status.startswith("leader"):
            return LeaderInfo(state.leader_id, state.leader_uri, state.epoch,
                              state.leader_since or 0.0)
    return None


def live_members(backends: list[CoordinationBackend]) -> list[MemberInfo]:
    listings = []
    for backend in backends:
        try:
            listings.append(backend.live_members())
        except QClusterError:
            if backend.name == "dblock":
                raise
    return merge_members(listings)


def read_state(db: Database) -> ClusterState:
    state = read_cluster(db)
    assert state is not None
    return state


def upgrade_db(settings: Settings) -> str:
    db = Database(settings.database_url())
    try:
        db.upgrade()
        ensure_cluster(db, settings.cluster.name, settings.coordination.backend)
        return db.current_revision() or "?"
    finally:
        db.dispose()


def check_database(settings: Settings) -> str:
    db = Database.from_settings(settings)
    try:
        with db.read() as conn:
            db.now(conn)
        return db.display_url
    except QClusterError:
        raise
    finally:
        db.dispose()
