"""``qcluster backend migrate``: move the cluster to another coordination backend, and wait
until the leader has finished the move (see :mod:`qcluster.leader.migration`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from backends.base import MemberInfo
from backends.loader import BACKENDS, load_backend_by_name
from qcluster.client.admin import cluster_backends, live_members, open_db, read_state, snapshot
from qcluster.client.reads import backend_view
from qcluster.errors import BackendUnavailable, InputError, QClusterError
from qcluster.leader import migration
from qcluster.settings import Settings
from qcluster.store.cluster import ClusterState, Phase
from qcluster.store.db import Database


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
        state, _info, members = snapshot(settings, db)
        rollback = state.phase == Phase.JOINT and state.backend == to
        if not rollback and not (state.phase == Phase.STABLE and state.backend == to):
            _check_move(settings, db, state, to, members)
        if dry_run:
            return {"dry_run": True, "plan": migration.plan(state, to, members),
                    **backend_view(state, members)}
        started = time.monotonic()
        move, state = migration.request_move(db, to, expect_version=state.config_version)
        report(f"{move.value}: {migration.plan(state, to, members)[0]}"
               if move is migration.Move.RESUMED else _moved_line(move, state, to))
        last = ""
        progress = migration.progress(state, members)
        # Connected once for the whole wait: both backends of the move (and the database).
        with cluster_backends(settings, db, (state.backend, to)) as backends:
            while state.phase == Phase.JOINT:
                if time.monotonic() - started > timeout:
                    who = ", ".join(n for n, _ in progress.waiting) or "the leader"
                    raise QClusterError(
                        f"the move to {to} is not done after {timeout:g}s (waiting for "
                        f"{who}); it goes on: run the command again to wait, `qcluster "
                        f"backend status` to watch, or `--to {state.backend}` to roll back"
                    )
                time.sleep(poll)
                state, members = read_state(db), live_members(backends)
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
                **backend_view(state, members)}
    finally:
        db.dispose()


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
    if state.phase == Phase.JOINT and state.target_backend != to:
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
