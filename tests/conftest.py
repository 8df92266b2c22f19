"""Shared fixtures: real PostgreSQL, ZooKeeper and Redis servers on loopback.

The shared servers start once per session, on first use, unless an environment variable
names servers that already run:

- ``QCLUSTER_TEST_PG_URL``: SQLAlchemy URL of a PostgreSQL database whose user may
  CREATE DATABASE (e.g. ``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``);
- ``QCLUSTER_TEST_ZK_HOSTS``: ``host:port[,host:port...]``;
- ``QCLUSTER_TEST_REDIS_URLS``: comma-separated ``redis://`` URLs, one per Redlock master.

Each test gets a namespace of its own on them (a database, a ZooKeeper chroot, a Redis key
prefix) that is removed after it. A test that must stop, kill or pause a server uses a
private one (``private_pg``, ``private_zk``, ``private_redis``, ``server_factory``).

When a server cannot be had, a test that needs it fails in CI (``CI=true``) and is skipped
elsewhere, so a laptop without ZooKeeper still runs the rest.

Hypothesis runs under one of three profiles, registered here and nowhere else:

- ``ci``: derandomized (the examples follow from the test's code alone, so a red run in CI
  is the same run on any machine), ``print_blob``, no deadline and no too_slow health
  check (a shared, noisy machine), no example database, the counts the tests name;
- ``dev``: randomized as Hypothesis is by default, with ``print_blob``;
- ``fuzz``: randomized, no deadline, every count times ``$QCLUSTER_FUZZ_SCALE`` (20 unless
  set; see ``tests/fuzzing.py``), and the per-test timeout times the same.

``$QCLUSTER_HYPOTHESIS_PROFILE`` chooses one (any other name is a usage error), else
``ci`` when ``CI=true``, else ``dev``; Hypothesis's own ``--hypothesis-profile`` wins over
both. The pytest header names the profile in use.

The one qcluster fixture is the database: ``db`` (a current schema and a "test" cluster on
dblock, on SQLite and on PostgreSQL) and ``make_db``, the factory behind it, for a test
that needs another URL, cluster name or backend, or no schema at all. They import
qcluster when first used, not here: a broken product module fails the tests that use
them, not the collection of every test.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar
from urllib.parse import urlsplit, urlunsplit

import pytest
from hypothesis import HealthCheck, settings

from tests import servers
from tests.fuzzing import example_scale
from tests.servers import (
    PostgresServer,
    RedisServer,
    Server,
    ServerError,
    ZooKeeperServer,
    create_database,
    drop_database,
)

if TYPE_CHECKING:
    from qcluster.store.db import Database

IN_CI = os.environ.get("CI") == "true"
REDIS_MASTERS = 3

S = TypeVar("S", bound=Server)


# -- hypothesis profiles

PROFILE_ENV = "QCLUSTER_HYPOTHESIS_PROFILE"
FUZZ_SCALE_ENV = "QCLUSTER_FUZZ_SCALE"
FUZZ_SCALE = 20
PROFILES = ("ci", "dev", "fuzz")
_PROFILE_REASON = pytest.StashKey[str]()


def _fuzz_scale() -> tuple[int, str | None]:
    """The fuzz profile's scale, and the usage error if ``$QCLUSTER_FUZZ_SCALE`` is bad."""
    raw = os.environ.get(FUZZ_SCALE_ENV, "").strip()
    if not raw:
        return FUZZ_SCALE, None
    if raw.isdigit() and 1 <= int(raw) <= 10_000:
        return int(raw), None
    return FUZZ_SCALE, f"{FUZZ_SCALE_ENV}={raw!r}: must be a whole number from 1 to 10000"


# Registered when this file is imported, before any pytest_configure: Hypothesis's own
# --hypothesis-profile may load one of them. Each names its parent, Hypothesis's default:
# without it a profile would inherit whatever profile is active now (Hypothesis loads its
# built-in "ci" by itself when it sees a CI variable).
_FUZZ_SCALE, _FUZZ_SCALE_ERROR = _fuzz_scale()
_DEFAULT = settings.get_profile("default")
settings.register_profile(
    "ci", _DEFAULT, derandomize=True, print_blob=True, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", _DEFAULT, print_blob=True)
settings.register_profile(
    "fuzz", _DEFAULT, print_blob=True, deadline=None,
    max_examples=_DEFAULT.max_examples * _FUZZ_SCALE,
    suppress_health_check=[HealthCheck.too_slow])


def choose_profile() -> tuple[str, str]:
    """The profile to load and why: ``$QCLUSTER_HYPOTHESIS_PROFILE``, else "ci" under
    ``CI=true``, else "dev". pytest.UsageError if the variable names another profile."""
    name = os.environ.get(PROFILE_ENV, "").strip()
    if name:
        if name not in PROFILES:
            raise pytest.UsageError(f"{PROFILE_ENV}={name!r} names no hypothesis profile; "
                                    f"use one of {', '.join(PROFILES)}")
        return name, f"{PROFILE_ENV}={name}"
    if IN_CI:
        return "ci", "CI=true"
    return "dev", f"outside CI and {PROFILE_ENV} unset"


def pytest_configure(config: pytest.Config) -> None:
    """Load the chosen profile before any test module (and its @settings) is imported."""
    if _FUZZ_SCALE_ERROR:
        raise pytest.UsageError(_FUZZ_SCALE_ERROR)
    name, reason = choose_profile()
    if config.getoption("--hypothesis-profile", default=None):
        reason = "--hypothesis-profile"  # Hypothesis's plugin loads it
    else:
        settings.load_profile(name)
    config.stash[_PROFILE_REASON] = reason


def pytest_report_header(config: pytest.Config) -> list[str]:
    """The profile line in pytest's header (shown unless -q)."""
    return [profile_line(config)]


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under -q (as scripts/test.sh runs) pytest shows no header: print the profile line
    alone, so that every log says which profile ran."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and session.config.get_verbosity() < 0:
        reporter.write_line(profile_line(session.config))


def profile_line(config: pytest.Config) -> str:
    """One line for the log: the profile, why, and what it does differently."""
    name = settings.get_current_profile_name()
    active = settings.get_profile(name)
    traits = ["derandomized: the same examples on every machine" if active.derandomize
              else "randomized"]
    if (scale := example_scale()) != 1:
        traits.append(f"{scale:g}x the examples and the test timeouts")
    if active.deadline is None:
        traits.append("no deadline")
    if active.print_blob:
        traits.append("print_blob")
    reason = config.stash.get(_PROFILE_REASON, "loaded elsewhere")
    return f"hypothesis profile: {name} ({reason}); {', '.join(traits)}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The multi-process tests first (they take 5-60 s each: started first, they end
    before the short ones that fill the gaps, and no long test is left for the end of a
    parallel run; scripts/test.sh also lets idle workers steal queued tests). Under a
    scaled profile a test runs many times the examples: its timeout (the ini's, unless
    the test sets its own or --timeout / $PYTEST_TIMEOUT gives one) grows as much."""
    items.sort(key=lambda item: item.get_closest_marker("cluster") is None)  # stable
    scale = example_scale()
    if (scale <= 1 or not config.pluginmanager.hasplugin("timeout")
            or config.getoption("--timeout", default=None) is not None
            or os.environ.get("PYTEST_TIMEOUT")):
        return
    base = float(config.getini("timeout") or 0)
    if base <= 0:
        return
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(base * scale))


def unavailable(message: str) -> NoReturn:
    """A server the test needs cannot be had: fail in CI, skip elsewhere."""
    if IN_CI:
        pytest.fail(f"{message} (CI=true: a missing server is a failure)", pytrace=False)
    pytest.skip(f"{message} (skipped outside CI; with CI=true this fails)")


def redact(url: str) -> str:
    """``url`` without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def start_server(make: Callable[..., S], **kwargs: Any) -> S:
    """Construct and start a server, or call :func:`unavailable`."""
    # unavailable() is called outside the except blocks: the error text says it all, and a
    # chained traceback would only repeat it.
    try:
        server = make(**kwargs)
    except ServerError as e:
        error = str(e)
    else:
        try:
            return server.start()
        except ServerError as e:
            server.close()
            error = str(e)
    unavailable(error)


def unique(prefix: str, sep: str = "-") -> str:
    return f"{prefix}{sep}{uuid.uuid4().hex[:12]}"


# -- SQL databases


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """SQLAlchemy URL of the shared PostgreSQL server's maintenance database."""
    if env := os.environ.get("QCLUSTER_TEST_PG_URL"):
        yield env
        return
    server = start_server(PostgresServer)
    try:
        yield server.url
    finally:
        server.close()


@contextlib.contextmanager
def fresh_pg_database(admin_url: str) -> Iterator[str]:
    """SQLAlchemy URL of a new database (qct_<random>) on the server of ``admin_url``,
    dropped at the end of the block."""
    name = unique("qct", sep="_")
    try:
        url = create_database(admin_url, name)
    except Exception as e:
        unavailable(f"cannot create a database on {redact(admin_url)}: {e}")
    yield url
    drop_database(admin_url, name)


@pytest.fixture
def pg_url(pg_admin_url: str) -> Iterator[str]:
    """SQLAlchemy URL of a fresh PostgreSQL database (qct_<random>), dropped after the test."""
    with fresh_pg_database(pg_admin_url) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """SQLAlchemy URL of an SQLite file in the test's tmp_path."""
    return f"sqlite:///{tmp_path / 'qcluster.db'}"


@pytest.fixture(params=["sqlite", "postgresql"], ids=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """The test runs twice: on an SQLite file and on a fresh PostgreSQL database."""
    # getfixturevalue: an SQLite-only run never starts PostgreSQL.
    fixture = "sqlite_url" if request.param == "sqlite" else "pg_url"
    url: str = request.getfixturevalue(fixture)
    return url


class DatabaseFactory:
    """Opens qcluster databases for one test; disposes of them all after it."""

    def __init__(self) -> None:
        self._made: list[Database] = []

    def __call__(self, url: str, *, upgrade: bool = True, cluster: str | None = "test",
                 backend: str = "dblock") -> Database:
        """``Database(url)``; with ``upgrade`` the current schema, and unless ``cluster``
        is None a cluster row of that name on ``backend`` (``ensure_cluster``).
        ``make_db(url, upgrade=False, cluster=None)`` makes no connection."""
        from qcluster.store.cluster import ensure_cluster
        from qcluster.store.db import Database

        db = Database(url)
        self._made.append(db)
        if upgrade:
            db.upgrade()
        if cluster is not None:
            ensure_cluster(db, cluster, backend)
        return db

    def close(self) -> None:
        for db in reversed(self._made):
            db.dispose()
        self._made.clear()


@pytest.fixture
def make_db() -> Iterator[DatabaseFactory]:
    """A :class:`DatabaseFactory`: ``make_db(url, cluster="prod")`` and so on."""
    factory = DatabaseFactory()
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def db(db_url: str, make_db: DatabaseFactory) -> Database:
    """A current schema and a new cluster "test" on dblock; the test runs twice, on an
    SQLite file and on a fresh PostgreSQL database (see ``db_url``)."""
    return make_db(db_url)


# -- ZooKeeper


@dataclass(frozen=True)
class ZkNamespace:
    """A ZooKeeper chroot of one test: ``hosts`` plus ``chroot`` (e.g. "/qct-1a2b...")."""

    hosts: list[str]
    chroot: str

    @property
    def connect_string(self) -> str:
        """The kazoo ``hosts`` argument that roots the client at ``chroot``."""
        return ",".join(self.hosts) + self.chroot


@dataclass(frozen=True)
class ZkEndpoint:
    """The shared ZooKeeper: its hosts, and the kazoo auth_data that passes every ACL."""

    hosts: list[str]
    admin_auth: list[tuple[str, str]]


@pytest.fixture(scope="session")
def zk_endpoint() -> Iterator[ZkEndpoint]:
    """The shared ZooKeeper, started on first use unless QCLUSTER_TEST_ZK_HOSTS names one."""
    if env := os.environ.get("QCLUSTER_TEST_ZK_HOSTS"):
        yield ZkEndpoint([host.strip() for host in env.split(",") if host.strip()], [])
        return
    server = start_server(ZooKeeperServer)
    try:
        yield ZkEndpoint([server.hosts], [server.super_auth])
    finally:
        server.close()


@pytest.fixture(scope="session")
def zk_hosts(zk_endpoint: ZkEndpoint) -> list[str]:
    """The shared ZooKeeper's "host:port" entries."""
    return list(zk_endpoint.hosts)


@pytest.fixture(scope="session")
def zk_admin(zk_endpoint: ZkEndpoint) -> Iterator[Any]:
    """A kazoo client at the shared ZooKeeper's root, to make and remove chroots.

    On a server that the tests started it is ZooKeeper's super user, so that it can remove
    nodes whatever their ACLs.
    """
    from kazoo.client import KazooClient

    hosts = ",".join(zk_endpoint.hosts)
    client = KazooClient(hosts=hosts, timeout=10.0, auth_data=zk_endpoint.admin_auth or None)
    try:
        client.start(timeout=15)
    except Exception as e:
        client.close()
        unavailable(f"cannot connect to ZooKeeper at {hosts}: {e}")
    try:
        yield client
    finally:
        client.stop()
        client.close()


@pytest.fixture
def zk(zk_hosts: list[str], zk_admin: Any) -> Iterator[ZkNamespace]:
    """A fresh chroot on the shared ZooKeeper, deleted (recursively) after the test."""
    from kazoo.exceptions import KazooException, NoNodeError, NotEmptyError

    chroot = unique("/qct")
    zk_admin.ensure_path(chroot)
    yield ZkNamespace(hosts=list(zk_hosts), chroot=chroot)
    # A session the test left open may still add ephemeral nodes while we delete.
    problem: Exception | None = None
    for _ in range(5):
        try:
            zk_admin.delete(chroot, recursive=True)
            return
        except NoNodeError:
            return
        except NotEmptyError as e:
            problem = e
            time.sleep(0.2)
        except KazooException as e:  # e.g. NoAuthError on an external server
            problem = e
            break
    warnings.warn(f"could not delete ZooKeeper chroot {chroot}: {problem!r}", stacklevel=1)


# -- Redis


@pytest.fixture(scope="session")
def redis_server_urls() -> Iterator[list[str]]:
    """URLs of the shared Redis servers: three independent masters, for Redlock."""
    if env := os.environ.get("QCLUSTER_TEST_REDIS_URLS"):
        yield [url.strip() for url in env.split(",") if url.strip()]
        return
    started: list[RedisServer] = []
    try:
        for _ in range(REDIS_MASTERS):
            started.append(start_server(RedisServer))
        yield [server.url for server in started]
    finally:
        for server in started:
            server.close()


@pytest.fixture
def redis_urls(redis_server_urls: list[str]) -> list[str]:
    """The shared Redis URLs (three, unless QCLUSTER_TEST_REDIS_URLS says otherwise)."""
    return list(redis_server_urls)


@pytest.fixture
def redis_prefix(redis_urls: list[str]) -> Iterator[str]:
    """A key prefix of this test ("qct-<random>"); its keys are deleted on every server after."""
    import redis

    prefix = unique("qct")
    yield prefix
    for url in redis_urls:
        with redis.Redis.from_url(url, socket_timeout=5) as client:
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            if keys:
                client.delete(*keys)


# -- private servers, which a test may stop, kill or pause


class ServerFactory:
    """Starts private servers for one test; closes them all after it."""

    def __init__(self) -> None:
        self._servers: list[Server] = []

    def start(self, kind: type[S], **kwargs: Any) -> S:
        """Start ``kind(**kwargs)``, e.g. ``start(RedisServer, persist=True)``."""
        server = start_server(kind, **kwargs)
        self._servers.append(server)
        return server

    def close(self) -> None:
        for server in reversed(self._servers):
            server.close()
        self._servers.clear()


@pytest.fixture
def server_factory() -> Iterator[ServerFactory]:
    """A :class:`ServerFactory`: ``server_factory.start(RedisServer)`` and so on."""
    factory = ServerFactory()
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def private_pg(server_factory: ServerFactory) -> PostgresServer:
    """A started PostgreSQL of this test alone (closed after it)."""
    return server_factory.start(PostgresServer)


@pytest.fixture
def private_zk(server_factory: ServerFactory) -> ZooKeeperServer:
    """A started ZooKeeper of this test alone (closed after it)."""
    return server_factory.start(ZooKeeperServer)


@pytest.fixture
def private_redis(server_factory: ServerFactory) -> RedisServer:
    """A started Redis of this test alone, without persistence (closed after it)."""
    return server_factory.start(RedisServer)


@pytest.fixture
def free_port() -> Callable[[], int]:
    """``free_port()`` gives a loopback TCP port that nothing listens on now."""
    return servers.free_port
