"""``zookeeper``: leadership as a small election on ephemeral sequential znodes (kazoo).

Layout, inside the client's chroot::

    /qcluster/<cluster>/election/<prefix>__cand__<seq>  ephemeral+sequential: contenders
    /qcluster/<cluster>/leader                          JSON leader info (persistent)
    /qcluster/<cluster>/members/<node_id>               ephemeral, JSON MemberInfo
    /qcluster/<cluster>/token_base                      persistent integer, see tokens
    /qcluster/<cluster>/clock                           touched to read the server's clock

The kazoo client (its making, waits, error translation, the chroot's creation) is in
:mod:`backends.zookeeper_client`, membership in :mod:`backends.zookeeper_members`.

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
from contextlib import suppress
from typing import Any

from kazoo.client import KazooClient
from kazoo.exceptions import (
    ConnectionLoss,
    KazooException,
    NodeExistsError,
    NoNodeError,
    SessionExpiredError,
)
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.protocol.states import EventType, KazooState, WatchedEvent
from kazoo.retry import KazooRetry

from backends.base import (
    CoordinationBackend,
    LeaderInfo,
    Lease,
    LossCallback,
    LossReport,
    MemberInfo,
    leader_from_dict,
    leader_to_dict,
)
from backends.zookeeper_client import check_address
from backends.zookeeper_members import ZooKeeperMembers
from qcluster.errors import BackendUnavailable

log = logging.getLogger(__name__)

_CANDIDATE = "__cand__"


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


class ZooKeeperBackend(ZooKeeperMembers, CoordinationBackend):
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
        check_address(hosts, cluster, chroot)
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
