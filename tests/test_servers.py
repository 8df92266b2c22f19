"""The test servers work: each shared one answers, and private ones can be stopped, killed,
paused and started again with their data where the server keeps data."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import sqlalchemy as sa
from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import NoAuthError
from kazoo.security import make_digest_acl

from tests import servers
from tests.conftest import ServerFactory, ZkEndpoint, ZkNamespace, unavailable
from tests.servers import (
    PostgresServer,
    RedisServer,
    ServerStartError,
    ZooKeeperServer,
    create_database,
    drop_database,
)

REPO = Path(__file__).resolve().parent.parent


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


# -- shared servers


def test_db_url_round_trips_a_row(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT)"))
            conn.execute(sa.text("INSERT INTO t VALUES (1, 'one')"))
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT name FROM t")).scalar_one() == "one"
    finally:
        engine.dispose()


def test_pg_url_is_a_fresh_database_of_its_own(pg_url: str) -> None:
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as conn:
            name = conn.execute(sa.text("SELECT current_database()")).scalar_one()
            tables = conn.execute(
                sa.text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
            ).scalar_one()
    finally:
        engine.dispose()
    assert name.startswith("qct_")
    assert pg_url.endswith(f"/{name}")
    assert tables == 0


def test_drop_database_ends_open_sessions(pg_admin_url: str) -> None:
    url = create_database(pg_admin_url, "qct_drop_me")
    libpq = url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(libpq) as held:
        drop_database(pg_admin_url, "qct_drop_me")
        with pytest.raises(psycopg.OperationalError):
            held.execute("SELECT 1")
    with psycopg.connect(libpq.rsplit("/", 1)[0] + "/postgres") as conn:
        row = conn.execute("SELECT 1 FROM pg_database WHERE datname = 'qct_drop_me'").fetchone()
    assert row is None


def test_zk_chroot_holds_the_test_nodes(zk: ZkNamespace, zk_admin: Any) -> None:
    client = KazooClient(hosts=zk.connect_string, timeout=5.0)
    client.start(timeout=10)
    try:
        client.create("/leader", b"node-1")
        assert client.get("/leader")[0] == b"node-1"
    finally:
        client.stop()
        client.close()
    assert zk.chroot.startswith("/qct-")
    assert zk_admin.get(f"{zk.chroot}/leader")[0] == b"node-1"


def test_zk_admin_removes_nodes_whatever_their_acl(
    zk: ZkNamespace, zk_admin: Any, zk_endpoint: ZkEndpoint
) -> None:
    if not zk_endpoint.admin_auth:
        unavailable("QCLUSTER_TEST_ZK_HOSTS names a server whose super user we do not know")
    owner = KazooClient(hosts=zk.connect_string, timeout=5.0, auth_data=[("digest", "owner:pw")])
    owner.start(timeout=10)
    try:
        owner.create("/locked", acl=[make_digest_acl("owner", "pw", all=True)])
        owner.create("/locked/child", acl=[make_digest_acl("owner", "pw", all=True)])
    finally:
        owner.stop()
        owner.close()
    stranger = KazooClient(hosts=zk.connect_string, timeout=5.0)
    stranger.start(timeout=10)
    try:
        with pytest.raises(NoAuthError):
            stranger.delete("/locked/child")
    finally:
        stranger.stop()
        stranger.close()
    zk_admin.delete(f"{zk.chroot}/locked", recursive=True)
    assert zk_admin.exists(f"{zk.chroot}/locked") is None


def test_redis_masters_are_three_independent_servers(
    redis_urls: list[str], redis_prefix: str
) -> None:
    assert len(redis_urls) == 3
    run_ids = set()
    for i, url in enumerate(redis_urls):
        with redis.Redis.from_url(url) as client:
            client.set(f"{redis_prefix}:k", i)
            run_ids.add(client.info("server")["run_id"])
    for i, url in enumerate(redis_urls):
        with redis.Redis.from_url(url) as client:
            assert client.get(f"{redis_prefix}:k") == str(i).encode()
    assert len(run_ids) == 3


# -- private servers


def test_stopped_postgres_refuses_connections_and_restarts_with_its_data(
    private_pg: PostgresServer,
) -> None:
    with psycopg.connect(private_pg.conninfo, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (v TEXT)")
        conn.execute("INSERT INTO kept VALUES ('before stop')")
    port = private_pg.port
    private_pg.stop()
    assert not private_pg.running
    with pytest.raises(psycopg.OperationalError, match="refused"):
        psycopg.connect(private_pg.conninfo, connect_timeout=2)
    private_pg.start()
    assert private_pg.port == port
    with psycopg.connect(private_pg.conninfo) as conn:
        assert conn.execute("SELECT v FROM kept").fetchall() == [("before stop",)]


def test_killed_postgres_recovers_committed_data(private_pg: PostgresServer) -> None:
    held = psycopg.connect(private_pg.conninfo, autocommit=True)
    held.execute("CREATE TABLE kept (v TEXT)")
    held.execute("INSERT INTO kept VALUES ('committed')")
    old_pid = private_pg.pid
    private_pg.kill()
    with pytest.raises(psycopg.OperationalError):
        held.execute("SELECT 1")
    held.close()
    private_pg.start()
    assert private_pg.pid != old_pid
    with psycopg.connect(private_pg.conninfo) as conn:
        assert conn.execute("SELECT v FROM kept").fetchall() == [("committed",)]


def test_paused_postgres_hangs_open_sessions_until_resumed(private_pg: PostgresServer) -> None:
    with psycopg.connect(private_pg.conninfo, autocommit=True) as held:
        private_pg.pause()
        finished = threading.Event()

        def query() -> None:
            held.execute("SELECT 1")
            finished.set()

        worker = threading.Thread(target=query, daemon=True)
        try:
            worker.start()
            assert not finished.wait(0.5), "a paused server answered"
        finally:
            private_pg.resume()
        assert finished.wait(5)
        worker.join()


def test_killed_zookeeper_suspends_clients_and_keeps_znodes(private_zk: ZooKeeperServer) -> None:
    states: list[str] = []
    lost = threading.Event()

    def listener(state: str) -> None:
        states.append(state)
        if state != KazooState.CONNECTED:
            lost.set()

    client = KazooClient(hosts=private_zk.hosts, timeout=1.0)
    client.add_listener(listener)
    client.start(timeout=10)
    try:
        # The server grants the short session the tests ask for (minSessionTimeout=1000).
        assert "to=1000" in private_zk.four_letter_word("cons")
        client.create("/kept", b"v")
        private_zk.kill()
        assert lost.wait(5), f"client states: {states}"
        private_zk.start()
        assert wait_until(lambda: client.state == KazooState.CONNECTED, timeout=10)
        assert client.get("/kept")[0] == b"v"
    finally:
        client.stop()
        client.close()


def test_killed_redis_restarts_empty_without_persistence(private_redis: RedisServer) -> None:
    with redis.Redis.from_url(private_redis.url) as client:
        client.set("k", "v")
    private_redis.kill()
    with (
        pytest.raises(redis.ConnectionError),
        redis.Redis.from_url(private_redis.url, socket_connect_timeout=1) as client,
    ):
        client.ping()
    private_redis.start()
    with redis.Redis.from_url(private_redis.url) as client:
        assert client.get("k") is None


def test_persistent_redis_keeps_data_across_kill(server_factory: ServerFactory) -> None:
    server = server_factory.start(RedisServer, persist=True)
    with redis.Redis.from_url(server.url) as client:
        client.set("k", "v")
    server.kill()
    server.start()
    with redis.Redis.from_url(server.url) as client:
        assert client.get("k") == b"v"


def test_paused_redis_hangs_until_resumed(private_redis: RedisServer) -> None:
    with redis.Redis.from_url(private_redis.url, socket_timeout=0.5) as client:
        client.ping()
        private_redis.pause()
        try:
            with pytest.raises(redis.TimeoutError):
                client.ping()
        finally:
            private_redis.resume()
        assert wait_until(lambda: _pings(private_redis.url))


def _pings(url: str) -> bool:
    try:
        with redis.Redis.from_url(url, socket_timeout=0.5) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


def test_start_on_a_taken_port_raises_with_the_server_log(free_port: Callable[[], int]) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        server = RedisServer(port=port)
        try:
            with pytest.raises(ServerStartError, match="exited with code") as info:
                server.start()
        finally:
            server.close()
    assert "Address already in use" in str(info.value)
    assert not server.dir.exists()


@pytest.mark.parametrize("ending", ["exit", "sigkill"])
def test_servers_do_not_outlive_the_test_process(ending: str) -> None:
    if ending == "sigkill" and servers.base._setpriv() is None:
        unavailable("no setpriv with --pdeathsig here")
    script = textwrap.dedent(f"""
        import os, signal
        from tests.servers import RedisServer
        server = RedisServer().start()
        print(server.port, server.dir, flush=True)
        if {ending!r} == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    expected = -signal.SIGKILL if ending == "sigkill" else 0
    assert done.returncode == expected, done.stderr
    port_text, directory = done.stdout.split()
    port = int(port_text)
    assert wait_until(lambda: not servers.port_open("127.0.0.1", port))
    if ending == "exit":
        assert not Path(directory).exists()
    else:  # nothing ran the atexit hook
        shutil.rmtree(directory, ignore_errors=True)
