"""A node: one ``qcluster start`` process, with the roles ``scheduler``, ``worker`` or both.

A scheduler node campaigns through the coordination backend and, while it leads, runs
the :class:`~qcluster.leader.role.LeaderRole`. A worker node serves runs over Pyro5. Every
node keeps its membership alive with a heartbeat. One authenticated Pyro5 daemon per node
hosts the worker object and the control object.

``start()``/``stop()``, or use it as a context manager; ``stop()`` is idempotent and
hands leadership over at once (the lease is released, not left to expire).

The backends it connects to (on first use, or on a thread of their own) and the members
they list are managed by :class:`~qcluster.node.coordination.NodeCoordination`.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from types import TracebackType

from backends.base import CoordinationBackend, Lease, MemberInfo
from backends.joint import JointBackend
from qcluster.definitions.imports import extend_import_path
from qcluster.definitions.policy import defaults_from
from qcluster.errors import ConfigError, Fenced, MemberReplaced, QClusterError
from qcluster.leader import migration
from qcluster.leader.control import ControlService
from qcluster.leader.election import Leadership
from qcluster.leader.role import LeaderRole
from qcluster.metrics import MetricsServer
from qcluster.node.coordination import NodeCoordination
from qcluster.node.preflight import open_metrics
from qcluster.rpc.pyro import AuthDaemon, DaemonThread, configure_pyro
from qcluster.rpc.secret_file import embedded_secret
from qcluster.rpc.server import loopback
from qcluster.settings import Settings
from qcluster.store.cluster import (
    ClusterState,
    Phase,
    ensure_cluster,
    read_cluster,
    record_lease,
)
from qcluster.store.db import Database
from qcluster.worker.lease import ClaimLease, SelfFence, lease_seconds
from qcluster.worker.runner import Worker, WorkerService

log = logging.getLogger(__name__)

#: The exit status of a node whose id another process took (EX_CONFIG).
EXIT_REPLACED = 78


#: The values config.example.toml shows (now and before); the settings refuse a secret
#: shorter than 32 bytes, this the example itself.
EXAMPLE_SECRETS = frozenset({"change-me", "change-me-to-32-or-more-random-characters"})


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


class Node(NodeCoordination):
    """One process of the cluster."""

    def __init__(
        self,
        settings: Settings,
        *,
        node_id: str | None = None,
        roles: tuple[str, ...] | None = None,
    ) -> None:
        self.settings = settings
        # Job modules in [jobs] paths are found before anything imports one (the worker, a
        # demo's job check), whatever the current directory.
        extend_import_path(settings.jobs.paths)
        self.node_id = node_id or settings.node.id or default_node_id()
        self.roles = tuple(roles or settings.node.roles)
        self.session = secrets.token_hex(8)
        self.db: Database | None = None
        # Every backend this node has connected to, by name: "dblock" always (members are
        # always listed in the shared database, so every node sees every other), the
        # others when the cluster's phase needs them.
        self.backends: dict[str, CoordinationBackend] = {}
        self.capabilities = settings.coordination.capabilities()
        self._backends_lock = threading.Lock()
        self._connecting: dict[str, threading.Thread] = {}
        self._connect_failed: dict[str, tuple[float, str]] = {}  # when, why
        self._joints: dict[tuple[str, ...], JointBackend] = {}
        self._state: ClusterState | None = None  # the cluster row as last read
        self._honoured = 0  # the config version this node honours (0: it cannot)
        self._started_version = 0
        self._preference_noted = False
        self.worker: Worker | None = None
        self._self_fence: SelfFence | None = None
        self.leader: LeaderRole | None = None
        self.leadership: Leadership | None = None
        self.uri: str | None = None
        self._daemon: DaemonThread | None = None
        self._metrics: MetricsServer | None = None
        self._heartbeats: list[threading.Thread] = []
        self._stop = threading.Event()
        self._stopped = False
        self._started = False
        self._up = False  # every part started

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
        """Start every part; if one fails, stop what was started (a lease released, the
        member records removed, the port and the connections closed) and raise."""
        s = self.settings
        secret = cluster_secret(s)
        self._started = True
        try:
            self._start(s, secret)
        except BaseException:
            self.stop()
            raise

    def _start(self, s: Settings, secret: str) -> None:
        configure_pyro(serializer=s.rpc.serializer, timeout=s.rpc.timeout_seconds,
                       max_message_bytes=s.rpc.max_message_bytes, tls=s.rpc.tls,
                       threads=max(16, s.worker.concurrency + 8))
        # Listen first: a port in use, or an address this machine does not have, is an
        # error (ConfigError) before the node touches the database or a backend.
        daemon = AuthDaemon(secret, host=s.worker.host, port=s.worker.port)
        self._daemon = DaemonThread(daemon, "qc-rpc")
        self._metrics = open_metrics(s)
        if self._metrics is not None:
            log.info("serving Prometheus metrics on %s", self._metrics.url)
            if s.metrics.host != "localhost" and not loopback(s.metrics.host):
                log.warning("the metrics endpoint listens on %s, beyond this host, with no "
                            "login: make sure only your Prometheus can reach it",
                            s.metrics.host)
        self.db = db = Database.from_settings(s)
        if not db.is_current():
            log.info("creating or upgrading the schema of %s", db.display_url)
            db.upgrade()
        state = ensure_cluster(db, s.cluster.name, s.coordination.backend)
        self._state, self._started_version = state, state.config_version
        self._backend("dblock")
        if s.coordination.backend in state.required or not self.is_scheduler:
            # The backend the config names is connected at start (a wrong address is a
            # startup error), unless the cluster does not use it and this node campaigns.
            self._backend(s.coordination.backend)
        if self.is_worker:
            lease = ClaimLease(lease_seconds(s.cluster.member_timeout_seconds))
            self.worker = Worker(db, node_id=self.node_id, session=self.session,
                                 concurrency=s.worker.concurrency, allow=list(s.jobs.allow),
                                 lease=lease,
                                 database_silent_after=2 * s.worker.heartbeat_seconds + 1,
                                 job_paths=[str(p) for p in s.jobs.paths],
                                 cancel_check_seconds=s.worker.heartbeat_seconds,
                                 output_max_bytes=s.runs.output_max_bytes)
            self.worker.start()
            self._self_fence = SelfFence(lease, self.worker.recovering,
                                         before_exit=self.worker.fence_exit)
            self._self_fence.start()
            self.uri = str(daemon.register(WorkerService(self.worker), "qcluster.worker.runner"))
        if self.is_scheduler:
            control_uri = str(daemon.uriFor("qcluster.leader.control"))
            self.leader = LeaderRole(s, db, members=self.live_members,
                                     workers=self.database_members, node_id=self.node_id,
                                     control_uri=control_uri, secret=secret,
                                     revoke=self._revoke, drive=self._drive,
                                     lease_deadline=self._lease_deadline)
            daemon.register(ControlService(db, self.leader, list(s.jobs.allow), self.node_id,
                                           defaults_from(s.scheduler)),
                            "qcluster.leader.control")
        self._daemon.start()
        self._beat()  # be a member before anything depends on it
        # The database's heartbeat on a thread of its own: a backend that hangs must not
        # make this worker look cut off from the database (it refuses runs then).
        for name, database in (("qc-heartbeat-db", True), ("qc-heartbeat", False)):
            thread = threading.Thread(target=self._heartbeat_loop, args=(database,),
                                      name=name, daemon=True)
            thread.start()
            self._heartbeats.append(thread)
        if self.is_scheduler:
            self.leadership = Leadership(
                self.node_id, plan=self._plan, on_elected=self._elected,
                on_revoked=self._revoked, halt=self._halt, min_token=self._min_token,
                on_reshaped=self._reshaped,
            )
            self.leadership.start()
        self._up = True
        log.info("node %s started (roles: %s, rpc: %s)", self.node_id, ",".join(self.roles),
                 daemon.locationStr)

    # -- leadership hooks -----------------------------------------------------------------------

    def _elected(self, lease: Lease) -> None:
        assert self.leader is not None and self.leadership is not None
        assert self.leadership.backend is not None
        self.leader.start(lease, self.leadership.backend, self.leadership.deadline)

    def _lease_deadline(self) -> float:
        return self.leadership.deadline if self.leadership is not None else 0.0

    def _halt(self) -> None:
        if self.leader is not None:
            self.leader.halt()

    def _revoked(self, reason: str) -> None:
        if self.leader is not None:
            self.leader.stop()

    def _revoke(self, reason: str) -> None:
        if self.leadership is not None:
            self.leadership.revoke(reason)

    def _plan(self) -> CoordinationBackend | str:
        """What to campaign on in the cluster's current phase, or why not to campaign."""
        assert self.db is not None
        try:
            state = read_cluster(self.db)
        except QClusterError as e:
            return f"cannot read the cluster row: {e}"
        if state is None:
            return "the cluster row is missing; run `qcluster db upgrade`"
        self._state = state
        why = migration.cannot_use(state, self.capabilities)
        if why is None:
            try:
                backend = self._backend_for(state.required)
            except QClusterError as e:
                why = (f"the cluster's phase needs {'+'.join(state.required)} and this node "
                       f"cannot reach it: {e}")
        if why is not None:
            self._honoured = 0
            return why
        self._honoured = state.config_version
        self._note_preference(state)
        return backend

    def _note_preference(self, state: ClusterState) -> None:
        wanted = self.settings.coordination.backend
        if state.phase == Phase.STABLE and state.backend != wanted and not self._preference_noted:
            self._preference_noted = True
            log.warning(
                "this node's config names the %s backend and the cluster runs %s: the "
                "cluster moves once every scheduler node's config names %s (or run "
                "`qcluster backend migrate --to %s`); until then this node campaigns on %s",
                wanted, state.backend, wanted, wanted, state.backend,
            )

    def _min_token(self) -> int:
        # The row _plan() (or _drive) has just read: a floor a moment old is still a floor
        # (tokens only grow, and take_epoch checks the fresh row under its lock).
        state = self._state
        return 0 if state is None else state.min_token

    def _reshaped(self, lease: Lease) -> None:
        """The leadership loop now holds ``lease`` (widened or narrowed by a migration)."""
        assert self.db is not None and self.leader is not None
        epoch = self.leader.epoch
        if epoch is None:
            raise Fenced("not leading any more")
        record_lease(self.db, node_id=self.node_id, epoch=epoch, lease=lease)
        if self.leadership is not None and self.leadership.backend is not None:
            # Published on the backend it now holds, in every phase (issue 14, point 1).
            self.leader.republish(lease, self.leadership.backend)

    def _drive(self, epoch: int, members: list[MemberInfo]) -> None:
        """The leader's part of a migration, once a second (see :mod:`qcluster.leader.migration`),
        with the live members its recovery pass has just read."""
        assert self.db is not None
        leadership = self.leadership
        lease = leadership.lease if leadership is not None else None
        if leadership is None or lease is None:
            return
        state = read_cluster(self.db)
        if state is None or state.epoch != epoch:
            return  # fenced: the next write steps this leader down
        self._state = state
        why = migration.cannot_use(state, self.capabilities)
        if why is not None:
            self._revoke(why)
            return
        if set(lease.backends) != set(state.required):
            try:
                leadership.reshape(self._backend_for(state.required))
            except QClusterError as e:
                self._honoured = 0
                log.warning("cannot take part in the %s phase yet: %s", state.phase, e)
            return
        self._honoured = state.config_version
        if state.phase == Phase.JOINT:
            others = [m for m in members if m.node_id != self.node_id]
            waiting = migration.progress(state, others).waiting
            if not waiting:
                done = migration.complete_move(self.db, epoch=epoch,
                                               version=state.config_version)
                if done is not None:
                    log.warning("every scheduler node honours the joint phase: the cluster "
                                "now runs %s alone (config version %d)", done.backend,
                                done.config_version)
            return
        to = migration.config_vote(state, members)
        if to is not None:
            log.warning("every scheduler node's config names %s: moving the cluster from %s "
                        "to %s", to, state.backend, to)
            migration.request_move(self.db, to, epoch=epoch)

    # -- membership -------------------------------------------------------------------------

    def member_info(self) -> MemberInfo:
        s = self.settings
        status = (self.leadership.status if self.leadership is not None
                  else "starting" if self.is_scheduler else "worker")
        state = self._state
        if (self.is_scheduler and state is not None and state.phase == Phase.STABLE
                and state.backend != s.coordination.backend and self._honoured):
            status += f" (its config names {s.coordination.backend}; the cluster runs " \
                      f"{state.backend})"
        return MemberInfo(
            node_id=self.node_id, session=self.session, roles=self.roles, uri=self.uri,
            capacity=s.worker.concurrency if self.is_worker else 0, tags=tuple(s.worker.tags),
            backends=self.capabilities,
            config_version=self._honoured if self.is_scheduler else 0,
            started_version=self._started_version, status=status,
        )

    def _beat(self, database: bool | None = None) -> None:
        """One heartbeat to every started backend (``database``: only to the database's,
        or only to the others)."""
        info = self.member_info()
        for backend in self._started_backends():
            if database is not None and (backend.name == "dblock") != database:
                continue
            sent = time.monotonic()
            try:
                backend.heartbeat_member(info)
            except MemberReplaced as e:
                self._replaced(str(e))
            except QClusterError as e:
                log.warning("membership heartbeat to %s failed: %s", backend.name, e)
                ok = False
            else:
                ok = True
            if backend.name == "dblock" and self.worker is not None:
                self.worker.database_heard(ok, sent)

    def _replaced(self, why: str) -> None:
        """Another process took this node's id: it may run this node's claimed runs'
        next attempts, so this one ends now, running nothing more (docs/DESIGN.md
        invariant 7: a leader counts a replaced session out a claim lease later)."""
        log.critical("stopping at once: %s (another process took it; give each node its "
                     "own [node] id or --node-id); exit status %d", why, EXIT_REPLACED)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(EXIT_REPLACED)

    def _heartbeat_loop(self, database: bool) -> None:
        while not self._stop.wait(self.settings.worker.heartbeat_seconds):
            self._beat(database)

    # -- stop -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Hand over leadership, finish running jobs (within the grace), leave. Idempotent."""
        if self._stopped or not self._started:
            return
        self._stopped = True
        self._stop.set()
        if self.leadership is not None:
            self.leadership.stop()
        if self._self_fence is not None:
            self._self_fence.stop()
        if self.worker is not None:
            self.worker.stop(self.settings.worker.shutdown_grace_seconds)
        info = self.member_info()
        for backend in self._started_backends():
            try:
                backend.remove_member(info)
            except QClusterError as e:
                log.info("could not leave the %s member list: %s", backend.name, e)
        if self._daemon is not None:
            self._daemon.stop()
        for backend in self._started_backends():
            backend.stop()
        if self.db is not None:
            self.db.dispose()
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._up:
            log.info("node %s stopped", self.node_id)

    def request_stop(self) -> None:
        """Ask the node to stop: :meth:`wait` returns, and the caller runs :meth:`stop`.
        Safe from a signal handler (it only sets an event)."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until :meth:`request_stop` or :meth:`stop` is called (from a signal
        handler, say), or ``timeout`` seconds pass; True if a stop was asked for."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:  # in slices of a second, so that the main thread sees its signals
            left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if left <= 0:
                return False
            if self._stop.wait(left):
                return True
