"""Choose a coordination backend by name, importing it (and its driver) lazily.

``dblock`` needs nothing beyond the core. ``zookeeper`` needs kazoo and ``redis`` needs
redis-py, both optional extras: a missing one raises
:class:`~qcluster.errors.BackendUnavailable` with a message that names the extra to install.
Settings are read here, once; the backends take plain values (secrets unwrapped only at
this edge, straight into the constructor).

The names a config may choose are :data:`backends.names.BACKENDS` (re-exported here).
``memory`` is not one of them: it lives in one process (:mod:`backends.memory`), and a
config cannot promise that no other process shares its database.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from backends.base import CoordinationBackend
from backends.names import BACKENDS as BACKENDS
from qcluster.errors import BackendUnavailable, ConfigError

if TYPE_CHECKING:
    from qcluster.settings import Settings
    from qcluster.store.db import Database


def load_backend(settings: Settings, db: Database) -> CoordinationBackend:
    """The backend that ``coordination.backend`` names, configured from ``settings``."""
    return load_backend_by_name(settings.coordination.backend, settings, db)


def load_backend_by_name(name: str, settings: Settings, db: Database) -> CoordinationBackend:
    """The backend ``name``, configured from ``settings`` (which may name another one: a
    migration needs the backend it moves to while the config still names the old one)."""
    cluster = settings.cluster.name
    member_timeout = settings.cluster.member_timeout_seconds
    coordination = settings.coordination
    if name == "dblock":
        from backends.dblock import DBLockBackend

        return DBLockBackend(
            db, lease_seconds=coordination.dblock.lease_seconds, member_timeout=member_timeout
        )
    if name == "zookeeper":
        zk = coordination.zookeeper
        if not zk.hosts:
            raise ConfigError("coordination.zookeeper.hosts: must list at least one server")
        try:
            from backends.zookeeper import ZooKeeperBackend
        except ModuleNotFoundError as e:
            raise _missing(e, "kazoo", "zookeeper") from e
        return ZooKeeperBackend(
            list(zk.hosts),
            cluster=cluster,
            chroot=zk.chroot,
            session_timeout=zk.session_timeout,
            auth=zk.auth.get_secret_value() if zk.auth is not None else None,
            member_timeout=member_timeout,
        )
    if name == "redis":
        rs = coordination.redis
        if not rs.urls:
            raise ConfigError("coordination.redis.urls: must list at least one server")
        try:
            from backends.redis import RedisBackend
        except ModuleNotFoundError as e:
            raise _missing(e, "redis", "redis") from e
        return RedisBackend(
            [url.get_secret_value() for url in rs.urls],
            cluster=cluster,
            lease_seconds=rs.lease_seconds,
            key_prefix=rs.key_prefix,
            member_timeout=member_timeout,
        )
    if name == "memory":
        raise ConfigError(
            "the memory backend is for tests inside one process and cannot be chosen by "
            f"name (another process would see another, empty one); choose one of "
            f"{', '.join(BACKENDS)}"
        )
    raise ConfigError(f"unknown coordination backend {name!r}; choose one of {', '.join(BACKENDS)}")


def _missing(error: ModuleNotFoundError, driver: str, extra: str) -> Exception:
    """The error to raise for a failed import: the install hint if the driver is what is
    missing, else the original error (a bug must not pass for a missing extra)."""
    if (error.name or "").split(".")[0] != driver:
        return error
    name = "redis-py" if driver == "redis" else driver
    return BackendUnavailable(f"the {extra} backend needs {name}: pip install 'qcluster[{extra}]'")
