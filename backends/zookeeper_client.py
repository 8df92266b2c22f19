"""The kazoo client of the ``zookeeper`` backend (:mod:`backends.zookeeper`): how it is
made, started and waited on, and how its errors become one-line BackendUnavailable.

* A chroot that does not exist yet is created at start (with the parents it lacks, and the
  ACL of our nodes), as Curator creates its namespace.
* Every wait is bounded by ``valid_for``; kazoo's log records that carry a secret (the
  digest ``user:password``, the session password) are dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from kazoo.client import KazooClient
from kazoo.exceptions import KazooException, NoAuthError
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.protocol.serialization import Auth, Connect
from kazoo.protocol.states import KazooState
from kazoo.retry import KazooRetry
from kazoo.security import CREATOR_ALL_ACL

from qcluster.errors import BackendUnavailable, ConfigError

log = logging.getLogger("backends.zookeeper")  # the backend's one logger


class _HideSecrets(logging.Filter):
    """kazoo logs each request at DEBUG, the digest ``user:password`` and the session
    password included (which would let a reader take over the session): drop those."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        secret = any(isinstance(a, Auth | Connect) for a in args)
        return not (secret or "passwd" in str(record.msg))


# Under the backend's logger (backends.zookeeper), by name: cli/main._DRIVER_LOGGERS quiets it.
_kazoo_log = logging.getLogger("backends.zookeeper.kazoo")
_kazoo_log.addFilter(_HideSecrets())


def check_address(hosts: list[str], cluster: str, chroot: str) -> None:
    """ConfigError unless ``hosts``, ``cluster`` and ``chroot`` make one kazoo address and
    node names."""
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


class ZooKeeperConnection:
    """The connection half of :class:`backends.zookeeper.ZooKeeperBackend`: its client,
    made from these attributes (which the backend sets)."""

    hosts: list[str]
    chroot: str
    session_timeout: float
    valid_for: float
    _auth: str | None  # "user:password", a secret: never logged, never in repr
    _client: KazooClient | None

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
