"""``zookeeper``: leadership as a small election on ephemeral sequential znodes (kazoo).

Layout, inside the client's chroot::

    /qcluster/<cluster>/election/<prefix>__cand__<seq>  ephemeral+sequential: contenders
    /qcluster/<cluster>/leader                          JSON leader info (persistent)
    /qcluster/<cluster>/members/<node_id>               ephemeral, JSON MemberInfo
    /qcluster/<cluster>/token_base                      persistent integer, see tokens
    /qcluster/<cluster>/clock                           touched to read the server's clock

A chroot that does not exist yet is created at start (with the parents it lacks, and the
ACL of our nodes), as Curator creates its namespace.

Promises, on top of :mod:`backends.base`:

* ``try_acquire`` never waits for another contender. It creates this backend's contender
  node (or reuses its own from the same session), leads if that node is the lowest, and
  otherwise deletes it again before returning ``None``. Node names start with a random
  per-instance prefix, so a node left by a failed attempt (kazoo issue #732: a cleanup
  that failed while SUSPENDED) is found and deleted on the next attempt and on reconnect.
* Token = the election node's czxid + ``token_base``. A czxid is ZooKeeper's global
  transaction id; it only grows, even when the parent is deleted (sequence numbers reset
  then). ``token_base`` stays 0 until a caller passes ``min_token >= czxid`` (after a
  migration the SQL epoch can be far ahead of a young ZooKeeper); the winner then raises
  ``token_base`` in a transaction that also checks that its election node still exists.
  ``token_base`` never goes down and a later leader reads it after that commit, with a
  larger czxid, so tokens still only grow and every token exceeds its ``min_token``.
* Loss (``on_lost``, at once): SUSPENDED, LOST, or the election node deleted. After
  SUSPENDED -> CONNECTED with the same session the node still exists; ``try_acquire`` by
  the same holder reuses it (same token, unless ``min_token`` asks for more). Nobody
  reclaiming it within ``valid_for`` means it is deleted, so that it cannot block others.
* ``valid_for`` = 2/3 of the session timeout: kazoo's read timeout, after which it reports
  SUSPENDED on a dead connection, before the server may expire the session.
* Members are ephemeral nodes (a dead process drops out when its session expires); one
  that stops heartbeating drops out once its node's mtime is older than ``member_timeout``,
  compared with a fresh mtime of the clock node: both are server times.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from kazoo.client import KazooClient
from kazoo.exceptions import (
    BadVersionError,
    ConnectionLoss,
    KazooException,
    NoAuthError,
    NodeExistsError,
    NoNodeError,
    SessionExpiredError,
)
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.protocol.serialization import Auth, Connect
from kazoo.protocol.states import EventType, KazooState, WatchedEvent
from kazoo.retry import KazooRetry
from kazoo.security import CREATOR_ALL_ACL

from backends.base import (
    CoordinationBackend,
    LeaderInfo,
    Lease,
    LossCallback,
    LossReport,
    MemberInfo,
    leader_from_dict,
    leader_to_dict,
    member_from_dict,
    member_to_dict,
)
from qcluster.errors import BackendUnavailable, ConfigError, InputError

log = logging.getLogger(__name__)

_CANDIDATE = "__cand__"


class _HideSecrets(logging.Filter):
    """kazoo logs each request at DEBUG, the digest ``user:password`` and the session
    password included (which would let a reader take over the session): drop those."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        secret = any(isinstance(a, Auth | Connect) for a in args)
        return not (secret or "passwd" in str(record.msg))


_kazoo_log = logging.getLogger(__name__ + ".kazoo")
_kazoo_log.addFilter(_HideSecrets())


@dataclasses.dataclass
class _Claim:
    """Our election node, while it backs a lease or waits to be reclaimed."""

    holder: str
    node: str
    session: int
    token: int
    loss: LossReport  # done once the loss is reported: then it is only kept to reclaim


def _seq(name: str) -> int:
    return int(name.rsplit(_CANDIDATE, 1)[1])


def _lowest(children: list[str]) -> str | None:
    return min((c for c in children if _CANDIDATE in c), key=_seq, default=None)


class ZooKeeperBackend(CoordinationBackend):
    """An election, leader info and members on a ZooKeeper ensemble."""

    name = "zookeeper"

    def __init__(
        self,
        hosts: list[str],
        *,
        cluster: str,
        chroot: str = "",
        session_timeout: float = 10.0,
        auth: str | None = None,
        member_timeout: float = 10.0,
    ) -> None:
        if not hosts:
            raise ConfigError("the zookeeper backend needs at least one host")
        for host in hosts:
            # kazoo gets one string, the servers joined by "," and then the chroot: a
            # host that holds a "," or a "/" would silently add servers or a chroot.
            if not host or any(c in ",/" or c.isspace() for c in host):
                raise ConfigError(
                    f"ZooKeeper server {host!r} must be one 'host' or 'host:port' (the chroot "
                    "is given apart)"
                )
        if not cluster or "/" in cluster or cluster in (".", ".."):
            raise ConfigError(f"cluster name {cluster!r} cannot be a ZooKeeper node name")
        if chroot and not chroot.startswith("/"):
            raise ConfigError(f"ZooKeeper chroot {chroot!r} must start with '/'")
        self.hosts, self.chroot = list(hosts), chroot.rstrip("/")
        self.session_timeout, self.member_timeout = session_timeout, member_timeout
        self._auth = auth  # "user:password", a secret: never logged, never in repr
        # kazoo's read timeout. Also the longest we wait for an answer: kazoo queues calls
        # while it reconnects, and try_acquire must not block for long.
        self.valid_for = session_timeout * 2 / 3
        base = f"/qcluster/{cluster}"
        self._election, self._leader = f"{base}/election", f"{base}/leader"
        self._members_path, self._token_base = f"{base}/members", f"{base}/token_base"
        self._clock = f"{base}/clock"
        self._prefix = uuid.uuid4().hex  # names this instance's contender nodes
        self._client: KazooClient | None = None
        self._stopped = threading.Event()
        self._lock = threading.RLock()  # guards the fields below; never held over a call
        self._campaign = threading.Lock()  # one acquire/renew/release/drop at a time
        self._claim: _Claim | None = None
        self._members: dict[str, MemberInfo] = {}  # re-created after a session loss
        self._known_session = 0

    def __repr__(self) -> str:
        auth = "digest" if self._auth else "none"
        return f"<ZooKeeperBackend hosts={','.join(self.hosts)}{self.chroot} auth={auth}>"

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._client is not None:
                return
            self._stopped.clear()
            self._client = client = self._new_client(
                self.chroot,
                # Reconnect fast: a session survives only if we are back within its timeout.
                KazooRetry(max_tries=-1, delay=0.05, max_delay=1.0),
            )
        client.add_listener(self._on_state)
        try:
            with self._errors(f"connecting to {','.join(self.hosts)}"):
                self._start_client(client)
                if self.chroot and client.exists("/") is None:
                    # kazoo leaves a missing chroot to us; create it, as Curator does its
                    # namespace. Checked once per start: one cheap exists on the way.
                    self._create_chroot()
                client.ensure_path(self._election)
                client.ensure_path(self._members_path)
                for path, value in ((self._leader, b""), (self._token_base, b"0")):
                    with suppress(NodeExistsError):
                        client.create(path, value)
                with suppress(NodeExistsError):
                    client.create(self._clock, b"")
        except BaseException:
            self.stop()
            raise

    def _new_client(self, chroot: str, retry: KazooRetry) -> KazooClient:
        """A client of our servers at ``chroot``, with our auth and our nodes' ACL."""
        return KazooClient(
            hosts=",".join(self.hosts) + chroot,
            timeout=self.session_timeout,
            auth_data=[("digest", self._auth)] if self._auth else None,
            default_acl=CREATOR_ALL_ACL if self._auth else None,
            connection_retry=retry,
            logger=_kazoo_log,
        )

    def _start_client(self, client: KazooClient) -> None:
        """``client.start()``, without its check of the chroot: that one prints a
        UserWarning ("No chroot path exists ...") on stderr, where we create it instead."""
        client.start_async().wait(timeout=max(self.session_timeout, 5.0))
        if not client.connected:
            raise KazooTimeoutError("Connection time-out")  # stop() closes the client

    def _create_chroot(self) -> None:
        """Create the chroot and its missing parents, through a short-lived client on the
        servers' root with the auth and ACL of our own nodes. A concurrent creation (another
        node starting) is fine: ensure_path takes NodeExistsError as success."""
        root = self._new_client("", KazooRetry(max_tries=3, delay=0.05, max_delay=1.0))
        try:
            self._start_client(root)
            try:
                root.ensure_path(self.chroot)
            except NoAuthError:
                raise BackendUnavailable(
                    f"ZooKeeper refused to create the chroot {self.chroot} (no permission "
                    f"on a parent node): create it beforehand, or set "
                    f"[coordination.zookeeper] auth to a user that may"
                ) from None
            log.info("created the ZooKeeper chroot %s", self.chroot)
        finally:
            with suppress(Exception):  # best effort: a short session ends on its own
                root.stop()
                root.close()

    def stop(self) -> None:
        with self._lock:
            client, self._client = self._client, None
            self._members.clear()
        self._stopped.set()
        if client is None:
            return
        # Closing ends the session: ZooKeeper deletes our ephemeral nodes (election node,
        # members) itself. The LOST state that follows reports a held lease as lost.
        try:
            client.stop()
            client.close()
        except Exception:  # best effort: the server drops the session on its own anyway
            log.debug("error while closing the ZooKeeper client", exc_info=True)
        self._report_lost("the ZooKeeper backend was stopped")

    # -- leadership -------------------------------------------------------------------

    def try_acquire(self, holder: str, on_lost: LossCallback, min_token: int = 0) -> Lease | None:
        with self._campaign, self._errors("campaigning"):
            client = self._connected()
            session = self._session(client)
            with self._lock:
                old = self._claim
            if old is not None and not old.loss.done and old.holder != holder:
                return None  # this instance leads for another holder
            keep = old.node if old and (old.holder, old.session) == (holder, session) else None
            self._sweep(keep)
            if keep is not None and keep in self._wait(client.get_children_async(self._election)):
                node = keep  # ours from this session: kept after SUSPENDED, or still leading
            else:
                path = self._wait(client.create_async(
                    f"{self._election}/{self._prefix}{_CANDIDATE}",
                    json.dumps({"holder": holder}).encode(), ephemeral=True, sequence=True,
                ))  # fmt: skip
                node = path.rsplit("/", 1)[1]
            token: int | None = None
            try:
                # Listed after our create: no lower node can appear any more.
                if _lowest(self._wait(client.get_children_async(self._election))) == node:
                    # The watch reports a deletion (an operator, an expiry) at once.
                    path = f"{self._election}/{node}"
                    stat = self._wait(client.exists_async(path, watch=self._watch(node)))
                    if stat is not None:
                        token = self._fence_token(node, int(stat.czxid), min_token)
            finally:
                with self._lock:
                    self._claim = (
                        _Claim(holder, node, session, token, LossReport(on_lost)) if token else None
                    )
                if token is None:
                    self._delete_own(node)  # before returning: no orphan contender may stay
            return Lease(self.name, holder, token, self.valid_for) if token else None

    def _watch(self, node: str) -> Any:
        def watch(event: WatchedEvent) -> None:
            if event.type == EventType.DELETED:
                self._report_lost("the ZooKeeper election node was deleted", node, drop=True)

        return watch

    def _fence_token(self, node: str, czxid: int, min_token: int) -> int | None:
        """czxid + token_base (raised above ``min_token`` if need be), read and committed
        in one transaction with a check that our election node still exists."""
        client = self._connected()
        for _ in range(5):
            data, stat = self._wait(client.get_async(self._token_base))
            base = int(data or b"0")
            tx = client.transaction()
            tx.check(f"{self._election}/{node}", 0)
            if czxid + base <= min_token:
                base = min_token - czxid + 1
                tx.set_data(self._token_base, str(base).encode(), version=stat.version)
            else:
                tx.check(self._token_base, stat.version)
            results = self._wait(tx.commit_async())
            if not any(isinstance(r, Exception) for r in results):
                return czxid + base
            if isinstance(results[0], NoNodeError):
                return None
            # token_base changed under us (another leader's bump): read it again.
        raise BackendUnavailable("the ZooKeeper token base kept changing; try again")

    def renew(self, lease: Lease) -> bool:
        with self._campaign, self._errors("renewing the lease"):
            client = self._require_client()
            claim = self._claim_of(lease)
            if claim is not None and client.state == KazooState.SUSPENDED:
                # Whether the session (and our node) survives is unknown until reconnect.
                raise BackendUnavailable("ZooKeeper connection suspended; cannot renew")
            if claim is None or claim.loss.done:
                return False  # released, replaced, or its loss was already reported
            if (
                client.state == KazooState.CONNECTED
                and claim.session == self._session(client)
                and _lowest(self._wait(client.get_children_async(self._election))) == claim.node
            ):
                return True
            self._report_lost("the ZooKeeper election node is gone", claim.node)
            return False

    def release(self, lease: Lease) -> None:
        with self._campaign:
            claim = self._claim_of(lease)
            if claim is None:
                return  # not ours: another holder's lease is another node, never touched
            with self._lock:
                self._claim = None
            claim.loss.cancel()
            self._delete_own(claim.node)

    def _claim_of(self, lease: Lease) -> _Claim | None:
        with self._lock:
            claim = self._claim
        if claim is None or (claim.holder, claim.token) != (lease.holder, lease.token):
            return None
        return claim

    # -- leader publication ----------------------------------------------------------

    def publish_leader(self, lease: Lease, info: LeaderInfo) -> None:
        with self._errors("publishing the leader"):
            claim = self._claim_of(lease)
            if claim is None or claim.loss.done:
                return
            data = leader_to_dict(info) | {"election_node": claim.node}
            tx = self._connected().transaction()
            tx.check(f"{self._election}/{claim.node}", 0)  # written only while we hold it
            tx.set_data(self._leader, json.dumps(data).encode())
            results = self._wait(tx.commit_async())
            if isinstance(results[0], NoNodeError):
                self._report_lost("the ZooKeeper election node is gone", claim.node)
            elif isinstance(results[1], Exception):
                raise BackendUnavailable(f"cannot write the leader info: {results[1]!r}")

    def read_leader(self) -> LeaderInfo | None:
        with self._errors("reading the leader"):
            client = self._connected()
            try:
                data, _ = self._wait(client.get_async(self._leader))
            except NoNodeError:
                return None
            fields = json.loads(data) if data else {}
            node = fields.get("election_node")
            if not node or self._wait(client.exists_async(f"{self._election}/{node}")) is None:
                return None  # nobody published, or that leader no longer holds the election
            return leader_from_dict(fields)

    # -- membership ------------------------------------------------------------------

    def heartbeat_member(self, member: MemberInfo) -> None:
        path = self._member_path(member.node_id)
        data = json.dumps(member_to_dict(member)).encode()
        with self._lock:
            self._members[member.node_id] = member
        with self._errors("registering a member"):
            client = self._connected()
            for _ in range(3):
                stat = self._wait(client.exists_async(path))
                try:
                    if stat is None:
                        self._wait(client.create_async(path, data, ephemeral=True))
                    elif stat.ephemeralOwner == self._session(client):
                        self._wait(client.set_async(path, data, stat.version))
                    else:
                        # An earlier incarnation's node, its session not yet expired: the
                        # running process owns its node id, so replace it.
                        self._wait(client.delete_async(path, stat.version))
                        continue
                    return
                except (NoNodeError, NodeExistsError, BadVersionError):
                    continue  # raced with an expiry or another writer: look again
            raise BackendUnavailable(f"member node {member.node_id} kept changing; try again")

    def remove_member(self, member: MemberInfo) -> None:
        path = self._member_path(member.node_id)
        with self._lock:
            if getattr(self._members.get(member.node_id), "session", None) == member.session:
                del self._members[member.node_id]
        with self._errors("removing a member"), suppress(NoNodeError, BadVersionError):
            # Gone already, or another incarnation's: then not ours to delete.
            data, stat = self._wait(self._connected().get_async(path))
            if json.loads(data).get("session") == member.session:
                self._wait(self._connected().delete_async(path, stat.version))

    def live_members(self) -> list[MemberInfo]:
        with self._errors("listing members"):
            client = self._connected()
            # The server's clock, as the mtime of a write: compared only with other mtimes,
            # which the same ensemble stamped.
            now = self._wait(client.set_async(self._clock, b"")).mtime / 1000.0
            names = self._wait(client.get_children_async(self._members_path))
            pending = [client.get_async(f"{self._members_path}/{n}") for n in names]
            members: list[MemberInfo] = []
            for result in pending:
                with suppress(NoNodeError):
                    data, stat = self._wait(result)
                    if stat.mtime / 1000.0 >= now - self.member_timeout:
                        members.append(member_from_dict(json.loads(data), stat.mtime / 1000.0))
        return sorted(members, key=lambda m: m.node_id)

    def _member_path(self, node_id: str) -> str:
        if not node_id or "/" in node_id or node_id in (".", "..") or "\0" in node_id:
            raise InputError(f"node id {node_id!r} cannot be a ZooKeeper node name")
        return f"{self._members_path}/{node_id}"

    # -- connection state ------------------------------------------------------------

    def _on_state(self, state: str) -> None:
        """kazoo's state listener. It must not block: ZooKeeper calls go to a new thread."""
        if state == KazooState.SUSPENDED:
            # The session may live on, but another node may lead by now: stop at once.
            self._report_lost("the ZooKeeper connection is suspended")
        elif state == KazooState.LOST:
            # The session is gone, and every ephemeral node of it.
            self._report_lost("the ZooKeeper session is lost", drop=True)
        elif state == KazooState.CONNECTED and (client := self._client) is not None:
            client.handler.spawn(self._after_connect, client)

    def _after_connect(self, client: KazooClient) -> None:
        try:
            session = self._session(client)
            with self._lock:
                new_session, self._known_session = session != self._known_session, session
                members, claim = list(self._members.values()), self._claim
            if new_session:
                for member in members:  # their nodes died with the old session
                    self.heartbeat_member(member)
            self._sweep(claim.node if claim else None)
            if claim is None or not claim.loss.done:
                return
            # A node kept after SUSPENDED: its holder may reclaim it (same token). If it
            # does not in time, delete it, so that it cannot block the election.
            if not self._stopped.wait(self.valid_for):
                with self._campaign, self._lock:
                    if self._claim is not claim:
                        return  # reclaimed (a new claim) or released meanwhile
                    self._claim = None
                self._delete_own(claim.node)
        except (NoNodeError, BackendUnavailable):
            pass  # not set up yet (first connect), or connection gone again: next time
        except Exception:  # a failing step must not kill kazoo's worker thread
            log.warning("ZooKeeper reconnect cleanup failed", exc_info=True)

    def _report_lost(self, reason: str, node: str | None = None, drop: bool = False) -> None:
        """Call the lease's ``on_lost``, once (if ``node`` is given: only if it backs the
        lease). Keep the claim unless ``drop`` (its node is gone for sure): after SUSPENDED
        its holder may reclaim it."""
        with self._lock:
            current = self._claim
            if current is None or (node is not None and current.node != node):
                return
            if drop:
                self._claim = None
        current.loss.report(reason)

    # -- helpers ---------------------------------------------------------------------

    def _sweep(self, keep: str | None) -> None:
        """Delete our contender nodes other than ``keep``: left by a failed attempt, or
        created by a call that kazoo sent on reconnect after we gave up waiting for it."""
        client = self._connected()
        for child in self._wait(client.get_children_async(self._election)):
            if child.startswith(self._prefix) and child != keep:
                self._delete_own(child)

    def _delete_own(self, node: str) -> None:
        """Delete one of our election nodes, retrying on a dropped connection (kazoo's own
        Lock swallows that error and leaks the node: issue #732)."""
        client = self._require_client()
        path = f"{self._election}/{node}"

        def attempt() -> None:
            try:
                client.delete_async(path).get(timeout=self.valid_for / 3)
            except NoNodeError:
                pass
            except KazooTimeoutError as e:
                raise ConnectionLoss() from e  # retryable, as a dropped connection is

        try:
            KazooRetry(max_tries=3, delay=0.05, deadline=self.valid_for, ignore_expire=False)(
                attempt
            )
        except SessionExpiredError:
            pass  # the session, and every ephemeral node of it, is gone
        except KazooException:
            # Still ours on the server: the next attempt or the reconnect sweep deletes it.
            log.info("could not delete election node %s yet; will sweep it", node)

    @staticmethod
    def _session(client: KazooClient) -> int:
        client_id = client.client_id
        return int(client_id[0]) if client_id is not None else -1

    def _require_client(self) -> KazooClient:
        if (client := self._client) is None:
            raise BackendUnavailable("the ZooKeeper backend is not started")
        return client

    def _connected(self) -> KazooClient:
        client = self._require_client()
        if client.state != KazooState.CONNECTED:
            raise BackendUnavailable(f"the ZooKeeper connection is {client.state}")
        return client

    def _wait(self, result: Any) -> Any:
        try:
            return result.get(timeout=self.valid_for)
        except KazooTimeoutError as e:
            raise BackendUnavailable("ZooKeeper did not answer in time") from e

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Driver errors become BackendUnavailable, with a one-line message."""
        try:
            yield
        except NoAuthError as e:
            raise BackendUnavailable(
                f"ZooKeeper refused access while {action}: check the zookeeper auth setting"
            ) from e
        except (KazooException, KazooTimeoutError) as e:
            raise BackendUnavailable(f"ZooKeeper error while {action}: {type(e).__name__}") from e
