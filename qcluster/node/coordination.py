"""The coordination backends of a :class:`~qcluster.node.Node`: each connected on first
use (or, for the leadership and maintenance loops, on a thread of its own, tried again
:data:`CONNECT_RETRY` seconds after a failure), the joint backend of a migration phase,
and the live members as every started backend lists them.
"""

from __future__ import annotations

import logging
import threading
import time

from backends.base import CoordinationBackend, MemberInfo
from backends.joint import JointBackend, merge_members
from backends.loader import load_backend_by_name
from qcluster.errors import BackendUnavailable, QClusterError
from qcluster.settings import Settings
from qcluster.store.db import Database

log = logging.getLogger("qcluster.node")  # the node's one logger

CONNECT_RETRY = 5.0  # seconds between two attempts to connect a backend that failed


class NodeCoordination:
    """The backends half of :class:`~qcluster.node.Node`, on the fields that
    ``Node.__init__`` sets."""

    settings: Settings
    db: Database | None
    backends: dict[str, CoordinationBackend]
    _backends_lock: threading.Lock
    _connecting: dict[str, threading.Thread]
    _connect_failed: dict[str, tuple[float, str]]  # when, why
    _joints: dict[tuple[str, ...], JointBackend]
    _stop: threading.Event

    def _backend(self, name: str, *, wait: bool = True) -> CoordinationBackend:
        """The backend ``name``, connected on first use. With ``wait=False`` (the
        leadership and maintenance loops), a backend not connected yet is connected on a
        thread of its own, and this raises BackendUnavailable meanwhile: a server that
        does not answer must not hold the loops, nor the membership heartbeat."""
        assert self.db is not None
        with self._backends_lock:
            backend = self.backends.get(name)
            if backend is not None:
                return backend
            if not wait:
                pending = self._connecting.get(name)
                failed = self._connect_failed.get(name)
                if pending is None and (failed is None
                                        or time.monotonic() - failed[0] > CONNECT_RETRY):
                    pending = threading.Thread(target=self._connect, args=(name, True),
                                               name=f"qc-connect-{name}", daemon=True)
                    self._connecting[name] = pending
                    pending.start()
                if failed is not None:
                    raise BackendUnavailable(f"cannot reach {name}: {failed[1]}")
                raise BackendUnavailable(f"connecting to {name}")
        self._connect(name, False)
        with self._backends_lock:
            backend = self.backends.get(name)
        if backend is None:
            raise BackendUnavailable(f"the node is stopping; {name} was not kept")
        return backend

    def _connect(self, name: str, quiet: bool) -> None:
        assert self.db is not None
        try:
            backend = load_backend_by_name(name, self.settings, self.db)
            backend.start()
        except QClusterError as e:
            log.warning("cannot reach the %s backend: %s", name, e)
            with self._backends_lock:
                self._connect_failed[name] = (time.monotonic(), str(e))
                self._connecting.pop(name, None)
            if not quiet:
                raise
            return
        with self._backends_lock:
            if name in self.backends or self._stop.is_set():
                backend.stop()
            else:
                self.backends[name] = backend
            self._connect_failed.pop(name, None)
            self._connecting.pop(name, None)

    def _backend_for(self, names: tuple[str, ...]) -> CoordinationBackend:
        """The backend for a phase (joint for two names); never waits for a connection."""
        if len(names) == 1:
            return self._backend(names[0], wait=False)
        parts = [self._backend(n, wait=False) for n in names]
        with self._backends_lock:  # one object per phase: the leadership loop compares them
            return self._joints.setdefault(names, JointBackend(parts))

    def _started_backends(self) -> list[CoordinationBackend]:
        with self._backends_lock:
            return list(self.backends.values())

    def database_members(self) -> list[MemberInfo]:
        """The live members as the shared database lists them (``qc_members``, heartbeats
        on the database's clock), whatever the cluster's backend: the workers a leader
        may send runs to, since a worker that cannot reach the database cannot claim
        them (docs/DESIGN.md invariant 7)."""
        return self._backend("dblock").live_members()

    def live_members(self) -> list[MemberInfo]:
        """Live members, as every backend this node uses lists them (the database first:
        every node registers there, whatever the cluster's backend)."""
        listings: list[list[MemberInfo]] = []
        for backend in self._started_backends():
            try:
                listings.append(backend.live_members())
            except QClusterError as e:
                if backend.name == "dblock":
                    raise
                log.debug("the %s backend did not list members: %s", backend.name, e)
        return merge_members(listings)
