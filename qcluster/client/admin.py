"""What the CLI does, as library functions: job changes, listings, cluster status.

Job changes go to the leader's control object while a leader is alive, so that the one
scheduler that owns the store makes them. When no leader is alive, they are written
directly, in a transaction fenced on the epoch read beforehand: if a leader appears in
between, the write is refused rather than racing it. The leader re-reads the store within
``poll_seconds`` either way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from backends.base import CoordinationBackend, LeaderInfo, MemberInfo
from backends.joint import merge_members
from backends.loader import BACKENDS, load_backend_by_name
from qcluster.definitions.jobdefs import JobDef, check_job_id
from qcluster.errors import (
    INPUT_KINDS,
    BackendUnavailable,
    DatabaseUnavailable,
    Fenced,
    InputError,
    QClusterError,
)
from qcluster.leader import migration
from qcluster.settings import Settings
from qcluster.store import catalog
from qcluster.store.cluster import ClusterState, ensure_cluster, read_cluster
from qcluster.store.db import Database

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


def _leader_alive(settings: Settings, db: Database) -> LeaderInfo | None:
    state = _read(db)
    with cluster_backends(settings, db, state.required) as backends:
        return _live_leader(state, backends)


def _snapshot(settings: Settings,
              db: Database) -> tuple[ClusterState, LeaderInfo | None, list[MemberInfo]]:
    """The cluster row, the live leader (as the phase's backends tell) and live members."""
    state = _read(db)
    with cluster_backends(settings, db, state.required) as backends:
        return state, _live_leader(state, backends), live_members(backends)


def _live_leader(state: ClusterState,
                 backends: list[CoordinationBackend]) -> LeaderInfo | None:
    for backend in backends:
        if backend.name in state.required:
            info = backend.read_leader()
            if info is not None:
                return info
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
        state, info, members = _snapshot(settings, db)
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
        "members": [_member_view(m) for m in members],
    }


def _member_view(m: MemberInfo) -> dict[str, Any]:
    return {"node_id": m.node_id, "roles": list(m.roles), "uri": m.uri,
            "capacity": m.capacity, "backends": list(m.backends),
            "config_version": m.config_version, "status": m.status,
            "last_seen": catalog.iso(m.last_seen)}


# -- backend migration ----------------------------------------------------------------------


def backend_status(settings: Settings) -> dict[str, Any]:
    """The cluster's backend and migration phase, and which scheduler nodes honour it."""
    db = open_db(settings)
    try:
        state, _info, members = _snapshot(settings, db)
    finally:
        db.dispose()
    return _backend_view(state, members)


def _backend_view(state: ClusterState, members: list[MemberInfo]) -> dict[str, Any]:
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
        "schedulers": [_member_view(m) for m in migration.schedulers(members)],
    }


def migrate_backend(
    settings: Settings,
    to: str,
    *,
    dry_run: bool = False,
    timeout: float = 120.0,
    poll: float = 0.5,
    report: Callable[[str], None] = lambda _line: None,
) -> dict[str, Any]:
    """Move the cluster to the backend ``to`` (see :mod:`qcluster.leader.migration`): check,
    start (or resume, or roll back) the move, and wait until the leader has finished it."""
    if to not in BACKENDS:
        raise InputError(f"unknown backend {to!r}; choose one of {', '.join(BACKENDS)}")
    db = open_db(settings)
    try:
        state, _info, members = _snapshot(settings, db)
        rollback = state.phase == "joint" and state.backend == to
        if not rollback and not (state.phase == "stable" and state.backend == to):
            _check_move(settings, db, state, to, members)
        if dry_run:
            return {"dry_run": True, "plan": migration.plan(state, to, members),
                    **_backend_view(state, members)}
        started = time.monotonic()
        move, state = migration.request_move(db, to, expect_version=state.config_version)
        report(f"{move.value}: {migration.plan(state, to, members)[0]}"
               if move is migration.Move.RESUMED else _moved_line(move, state, to))
        last = ""
        progress = migration.progress(state, members)
        # Connected once for the whole wait: both backends of the move (and the database).
        with cluster_backends(settings, db, (state.backend, to)) as backends:
            while state.phase == "joint":
                if time.monotonic() - started > timeout:
                    who = ", ".join(n for n, _ in progress.waiting) or "the leader"
                    raise QClusterError(
                        f"the move to {to} is not done after {timeout:g}s (waiting for "
                        f"{who}); it goes on: run the command again to wait, `qcluster "
                        f"backend status` to watch, or `--to {state.backend}` to roll back"
                    )
                time.sleep(poll)
                state, members = _read(db), live_members(backends)
                progress = migration.progress(state, members)
                line = _progress_line(progress)
                if line != last:
                    report(line)
                    last = line
        if state.backend != to:
            raise QClusterError(
                f"the move was rolled back meanwhile: the cluster runs {state.backend}"
            )
        elapsed = time.monotonic() - started
        if move is not migration.Move.NOTHING:
            report(f"done: the cluster runs {to} (config version {state.config_version}) "
                   f"after {elapsed:.1f}s")
        return {"dry_run": False, "move": move.value, "seconds": round(elapsed, 3),
                **_backend_view(state, members)}
    finally:
        db.dispose()


def _read(db: Database) -> ClusterState:
    state = read_cluster(db)
    assert state is not None
    return state


def _moved_line(move: migration.Move, state: ClusterState, to: str) -> str:
    if move is migration.Move.NOTHING:
        return f"nothing to do: the cluster already runs {to}"
    if move is migration.Move.ROLLED_BACK:
        return (f"rolled back: the cluster runs {state.backend} alone "
                f"(config version {state.config_version})")
    return (f"joint phase (config version {state.config_version}): leaders hold "
            f"{state.backend} and {state.target_backend}")


def _progress_line(p: migration.Progress) -> str:
    if p.done:
        return f"phase stable on {p.state.backend} (config version {p.state.config_version})"
    joined = ", ".join(p.joined) or "none yet"
    waiting = "; ".join(f"{n}: {why}" for n, why in p.waiting)
    line = f"joint phase: joined {joined}"
    if waiting:
        line += f"; waiting for {waiting}"
    if not p.state.leader_uri:
        line += "; no leader at the moment (the next leader finishes the move)"
    return line


def _check_move(settings: Settings, db: Database, state: ClusterState, to: str,
                members: list[MemberInfo]) -> None:
    """Refuse a move that cannot finish: no settings for ``to`` here, ``to`` unreachable,
    or a live scheduler node whose config cannot use both backends."""
    if state.phase == "joint" and state.target_backend != to:
        raise InputError(
            f"the cluster is moving from {state.backend} to {state.target_backend}; finish "
            f"that (--to {state.target_backend}) or roll it back (--to {state.backend}) first"
        )
    if to not in settings.coordination.capabilities():
        raise InputError(
            f"{settings.source}: no [coordination.{to}] servers; the command checks that it "
            f"can reach {to} before moving the cluster there"
        )
    target = load_backend_by_name(to, settings, db)
    try:
        target.start()
        target.live_members()
    except QClusterError as e:
        raise BackendUnavailable(f"cannot reach {to}: {e}") from None
    finally:
        target.stop()
    lacking = [m.node_id for m in migration.schedulers(members)
               if to not in m.backends or state.backend not in m.backends]
    if lacking:
        raise InputError(
            f"scheduler node(s) {', '.join(lacking)} have no [coordination.{to}] servers in "
            f"their config; add them and restart those nodes (or stop them) first"
        )


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
