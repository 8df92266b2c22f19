"""``backends.loader``: the backend named in config, built from the settings, imported lazily."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from backends.dblock import DBLockBackend
from backends.loader import load_backend, load_backend_by_name
from qcluster.errors import BackendUnavailable, ConfigError
from qcluster.settings import Settings, load_settings_from_mapping
from qcluster.store.db import Database
from tests.conftest import DatabaseFactory

ZK_SECRET = "zk-Secret-1"
REDIS_SECRET = "redis-Secret-2"


def _settings(backend: str = "dblock") -> Settings:
    data: dict[str, Any] = {
        "cluster": {"name": "prod", "member_timeout_seconds": 7.5},
        "coordination": {
            "backend": backend,
            "dblock": {"lease_seconds": 4},
            "zookeeper": {
                "hosts": ["127.0.0.1:2181", "127.0.0.1:2182"],
                "chroot": "/apps",
                "session_timeout": 6,
                "auth": f"qc:{ZK_SECRET}",
            },
            "redis": {
                "urls": [f"redis://:{REDIS_SECRET}@127.0.0.1:6379/0"],
                "lease_seconds": 3,
                "key_prefix": "qc",
            },
        },
    }
    return load_settings_from_mapping(data, "test.toml", env={})


@pytest.fixture
def db(sqlite_url: str, make_db: DatabaseFactory) -> Database:
    """SQLite alone, and no schema: loading a backend makes no connection."""
    return make_db(sqlite_url, upgrade=False, cluster=None)


def test_configured_backend_is_loaded(db: Database) -> None:
    backend = load_backend(_settings("dblock"), db)
    assert isinstance(backend, DBLockBackend)
    assert backend.lease_seconds == 4
    assert backend.member_timeout == 7.5


def test_zookeeper_backend_gets_its_settings_and_keeps_the_auth_secret(db: Database) -> None:
    from backends.zookeeper import ZooKeeperBackend

    backend = load_backend(_settings("zookeeper"), db)
    assert isinstance(backend, ZooKeeperBackend)
    assert backend.hosts == ["127.0.0.1:2181", "127.0.0.1:2182"]
    assert backend.chroot == "/apps"
    assert backend.session_timeout == 6
    assert backend.member_timeout == 7.5
    assert ZK_SECRET not in repr(backend)


def test_redis_backend_gets_its_settings_and_keeps_the_url_secret(db: Database) -> None:
    from backends.redis import RedisBackend

    backend = load_backend(_settings("redis"), db)
    assert isinstance(backend, RedisBackend)
    assert backend.lease_seconds == 3
    assert backend.member_timeout == 7.5
    assert backend.display_urls == ["redis://:***@127.0.0.1:6379/0"]
    assert REDIS_SECRET not in repr(backend)


def test_a_backend_other_than_the_configured_one_can_be_loaded(db: Database) -> None:
    from backends.zookeeper import ZooKeeperBackend

    backend = load_backend_by_name("zookeeper", _settings("dblock"), db)
    assert isinstance(backend, ZooKeeperBackend)


def test_missing_kazoo_names_the_extra_to_install(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(sys.modules, "backends.zookeeper", raising=False)
    for name in [m for m in sys.modules if m == "kazoo" or m.startswith("kazoo.")]:
        monkeypatch.setitem(sys.modules, name, None)  # None: "import kazoo" fails
    monkeypatch.setitem(sys.modules, "kazoo", None)
    with pytest.raises(BackendUnavailable, match=r"pip install 'qcluster\[zookeeper\]'"):
        load_backend(_settings("zookeeper"), db)


def test_missing_redis_driver_names_the_extra_to_install(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(sys.modules, "backends.redis", raising=False)
    for name in [m for m in sys.modules if m == "redis" or m.startswith("redis.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(BackendUnavailable, match=r"pip install 'qcluster\[redis\]'"):
        load_backend(_settings("redis"), db)


def test_unknown_backend_name_is_a_config_error(db: Database) -> None:
    with pytest.raises(ConfigError, match="unknown coordination backend 'etcd'"):
        load_backend_by_name("etcd", _settings(), db)


def test_the_memory_backend_cannot_be_chosen_by_name(db: Database) -> None:
    with pytest.raises(ConfigError, match="memory backend is for tests inside one process"):
        load_backend_by_name("memory", _settings(), db)
    with pytest.raises(ConfigError, match=r"must be 'dblock', 'zookeeper' or 'redis'"):
        _settings("memory")


def test_every_list_of_backend_names_is_the_one_in_backends_names() -> None:
    from typing import get_args

    from backends import loader
    from backends.names import BACKENDS
    from qcluster.cli.admin_commands import BackendName

    assert BACKENDS == ("dblock", "zookeeper", "redis")
    assert loader.BACKENDS is BACKENDS
    assert tuple(BackendName) == BACKENDS
    field = Settings.model_fields["coordination"].annotation
    assert field is not None
    assert get_args(field.model_fields["backend"].annotation) == BACKENDS


def test_backend_without_servers_is_a_config_error(db: Database) -> None:
    with pytest.raises(ConfigError, match=r"coordination\.redis\.urls"):
        load_backend_by_name("redis", load_settings_from_mapping({}, "empty", env={}), db)
