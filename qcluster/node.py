"""A node: one ``qcluster start`` process, with the roles ``scheduler``, ``worker`` or both.

A scheduler node campaigns through the coordination backend and, while it leads, runs
the :class:`~qcluster.leader.LeaderRole`. A worker node serves runs over Pyro5. Every
node keeps its membership alive with a heartbeat. One authenticated Pyro5 daemon per node
hosts the worker object and the control object.

``start()``/``stop()``, or use it as a context manager; ``stop()`` is idempotent and
hands leadership over at once (the lease is released, not left to expire).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from pathlib import Path
from types import TracebackType

from backends.base import CoordinationBackend, Lease, MemberInfo
from backends.loader import load_backend
from qcluster.cluster import WrongBackend, ensure_cluster, read_cluster
from qcluster.config import Settings
from qcluster.control import ControlService
from qcluster.db import Database
from qcluster.errors import ConfigError, QClusterError
from qcluster.leader import LeaderRole
from qcluster.leadership import Leadership
from qcluster.rpc import AuthDaemon, DaemonThread, configure_pyro, embedded_secret
from qcluster.worker import Worker, WorkerService

log = logging.getLogger(__name__)


EXAMPLE_SECRETS = frozenset({"change-me"})  # the value config.example.toml shows


def default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def cluster_secret(settings: Settings) -> str:
    """The RPC secret: from config, or for an embedded cluster a file beside its database."""
    secret = settings.rpc_secret()
    if secret in EXAMPLE_SECRETS:
        raise ConfigError(
            f"{settings.source}: [rpc] secret is the example value; set a secret of your own"
        )
    if secret:
        return secret
    if settings.is_embedded:
        path = sqlite_path(settings.database_url())
        if path is not None:
            return embedded_secret(path)
    raise ConfigError(
        f"{settings.source}: [rpc] secret is required for a cluster on a shared database "
        "(set secret, secret_file or QCLUSTER_RPC_SECRET)"
    )


def sqlite_path(url: str) -> Path | None:
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    if not database or database == ":memory:":
        return None
    return Path(database).resolve()


class Node:
    """One process of the cluster."""

    def __init__(
        self,
        settings: Settings,
        *,
        node_id: str | None = None,
        roles: tuple[str, ...] | None = None,
    ) -> None:
        self.settings = settings
        self.node_id = node_id or settings.node.id or default_node_id()
        self.roles = tuple(roles or settings.node.roles)
        self.session = secrets.token_hex(8)
        self.db: Database | None = None
        self.backend: CoordinationBackend | None = None
        self.worker: Worker | None = None
        self.leader: LeaderRole | None = None
        self.leadership: Leadership | None = None
        self.uri: str | None = None
        self._daemon: DaemonThread | None = None
        self._heartbeat: threading.Thread | None = None
        self._stop = threading.Event()
        self._stopped = False
        self._started = False

    @property
    def is_scheduler(self) -> bool:
        return "scheduler" in self.roles

    @property
    def is_worker(self) -> bool:
        return "worker" in self.roles

    def __enter__(self) -> Node:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- start ----------------------------------------------------------------------------

    def start(self) -> None:
        s = self.settings
        secret = cluster_secret(s)
        self._started = True
        configure_pyro(serializer=s.rpc.serializer, timeout=s.rpc.timeout_seconds,
                       max_message_bytes=s.rpc.max_message_bytes, tls=s.rpc.tls,
                       threads=max(16, s.worker.concurrency + 8))
        self.db = db = Database(s.database_url())
        if not db.is_current():
            log.info("creating or upgrading the schema of %s", db.display_url)
            db.upgrade()
        ensure_cluster(db, s.cluster.name, s.coordination.backend)
        self.backend = backend = load_backend(s, db)
        backend.start()
        daemon = AuthDaemon(secret, host=s.worker.host, port=s.worker.port)
        self._daemon = DaemonThread(daemon, "qc-rpc")
        if self.is_worker:
            self.worker = Worker(db, node_id=self.node_id, session=self.session,
                                 concurrency=s.worker.concurrency, allow=list(s.jobs.allow))
            self.worker.start()
            self.uri = str(daemon.register(WorkerService(self.worker), "qcluster.worker"))
        if self.is_scheduler:
            control_uri = str(daemon.uriFor("qcluster.control"))
            self.leader = LeaderRole(s, db, backend, node_id=self.node_id,
                                     control_uri=control_uri, secret=secret,
                                     revoke=self._revoke)
            daemon.register(ControlService(db, self.leader, list(s.jobs.allow), self.node_id),
                            "qcluster.control")
        self._daemon.start()
        self._beat()  # be a member before anything depends on it
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="qc-heartbeat",
                                           daemon=True)
        self._heartbeat.start()
        if self.is_scheduler:
            self.leadership = Leadership(
                backend, self.node_id, on_elected=self._elected, on_revoked=self._revoked,
                halt=self._halt, may_campaign=self._may_campaign, min_token=self._min_token,
            )
            self.leadership.start()
        log.info("node %s started (roles: %s, rpc: %s)", self.node_id, ",".join(self.roles),
                 daemon.locationStr)

    # -- leadership hooks -----------------------------------------------------------------------

    def _elected(self, lease: Lease) -> None:
        assert self.leader is not None
        self.leader.start(lease)

    def _halt(self) -> None:
        if self.leader is not None:
            self.leader.halt()

    def _revoked(self, reason: str) -> None:
        if self.leader is not None:
            self.leader.stop()

    def _revoke(self, reason: str) -> None:
        if self.leadership is not None:
            self.leadership.revoke(reason)

    def _may_campaign(self) -> str | None:
        assert self.db is not None
        try:
            state = read_cluster(self.db)
        except QClusterError as e:
            return f"cannot read the cluster row: {e}"
        wanted = self.settings.coordination.backend
        if state is not None and state.backend != wanted:
            return str(WrongBackend(
                f"the cluster runs the {state.backend!r} backend but this node's config says "
                f"{wanted!r}; run `qcluster backend migrate --to {wanted}` (or fix the config)"
            ))
        return None

    def _min_token(self) -> int:
        assert self.db is not None
        state = read_cluster(self.db)
        if state is None or state.leader_backend != self.settings.coordination.backend:
            return 0
        return state.leader_token

    # -- membership -------------------------------------------------------------------------

    def member_info(self) -> MemberInfo:
        s = self.settings
        status = self.leadership.status if self.leadership is not None else "worker"
        return MemberInfo(
            node_id=self.node_id, session=self.session, roles=self.roles, uri=self.uri,
            capacity=s.worker.concurrency if self.is_worker else 0, tags=tuple(s.worker.tags),
            backends=(s.coordination.backend,), config_version=0, status=status,
        )

    def _beat(self) -> None:
        assert self.backend is not None
        try:
            self.backend.heartbeat_member(self.member_info())
        except QClusterError as e:
            log.warning("membership heartbeat failed: %s", e)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.settings.worker.heartbeat_seconds):
            self._beat()

    # -- stop -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Hand over leadership, finish running jobs (within the grace), leave. Idempotent."""
        if self._stopped or not self._started:
            return
        self._stopped = True
        self._stop.set()
        if self.leadership is not None:
            self.leadership.stop()
        if self.worker is not None:
            self.worker.stop(self.settings.worker.shutdown_grace_seconds)
        if self.backend is not None:
            try:
                self.backend.remove_member(self.member_info())
            except QClusterError as e:
                log.info("could not leave the member list: %s", e)
        if self._daemon is not None:
            self._daemon.stop()
        if self.backend is not None:
            self.backend.stop()
        if self.db is not None:
            self.db.dispose()
        if self._daemon is not None:
            log.info("node %s stopped", self.node_id)

    def wait(self) -> None:
        """Block until :meth:`stop` is called (from a signal handler, say)."""
        while not self._stop.wait(1.0):
            pass
