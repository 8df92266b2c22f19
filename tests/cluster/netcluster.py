"""A :class:`~tests.cluster.harness.Cluster` whose nodes each run in a network namespace of
a :class:`~tests.cluster.netns.Lab`, on servers that listen on lab addresses.

Each node gets its own config: ``[worker] host`` is its lab address and ``[rpc.tls]`` a
certificate for that address, signed by the cluster's CA; the CLI that the test runs (in
the root namespace) has a client certificate of the same CA. The test then cuts links by
role: :meth:`NetCluster.database`, :meth:`NetCluster.coordination` and
:meth:`NetCluster.address` give the addresses to hand to ``Lab.cut``.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tests.cluster.harness import Cluster, upgrade_database
from tests.cluster.netns import Lab, LabPostgres, LabRedis, LabZooKeeper, NetNode, Pki
from tests.helpers import TEST_SETTINGS, NodeProcess, start_node, write_config
from tests.servers import Server, drop_database

#: The backends a lab cluster runs on (dblock on PostgreSQL: SQLite is one host).
LAB_BACKENDS = ["dblock", "zookeeper", "redis"]
REDIS_MASTERS = 3


def _unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


class LabServers:
    """PostgreSQL, ZooKeeper and three Redis masters on lab addresses, each started on
    first use and closed by :meth:`close`. ``start`` is :func:`tests.conftest.start_server`
    (skip, or fail under CI=true, when a server cannot be had)."""

    def __init__(self, lab: Lab, start: Any) -> None:
        self.lab = lab
        self._start = start
        self._pg: LabPostgres | None = None
        self._zk: LabZooKeeper | None = None
        self._redis: list[LabRedis] = []
        self._started: list[Server] = []

    def _up(self, kind: Any, **kwargs: Any) -> Any:
        server = self._start(kind, **kwargs)
        self._started.append(server)
        return server

    @property
    def pg(self) -> LabPostgres:
        if self._pg is None:
            self._pg = self._up(LabPostgres, host=self.lab.server_address(),
                                subnet=f"10.77.{self.lab.subnet}.0/24")
        return self._pg

    @property
    def zk(self) -> LabZooKeeper:
        if self._zk is None:
            self._zk = self._up(LabZooKeeper, host=self.lab.server_address())
        return self._zk

    @property
    def redis(self) -> list[LabRedis]:
        while len(self._redis) < REDIS_MASTERS:
            self._redis.append(self._up(LabRedis, host=self.lab.server_address()))
        return list(self._redis)

    def close(self) -> None:
        for server in reversed(self._started):
            with contextlib.suppress(Exception):
                server.close()
        self._started.clear()


class NetCluster(Cluster):
    """Nodes in namespaces, a fresh database and backend namespace of this cluster alone."""

    def __init__(self, tmp_path: Path, lab: Lab, servers: LabServers, backend: str,
                 **overrides: Any) -> None:
        self.lab, self.servers, self.backend = lab, servers, backend
        self.pki = Pki(tmp_path / "pki")
        self._db_name = _unique("qcn_")
        self.url = url = servers.pg.create_database(self._db_name)
        self.overrides: dict[str, Any] = {"coordination": self._coordination(backend),
                                          **overrides}
        cli = write_config(tmp_path, url, name="cli.toml", rpc={
            "tls": self.pki.tls_section("cli", [lab.gateway])}, **self.overrides)
        super().__init__(tmp_path, cli, url)
        self.hosts: dict[str, NetNode] = {}
        upgrade_database(cli)

    def _coordination(self, backend: str) -> dict[str, Any]:
        if backend == "dblock":
            return {"backend": "dblock", **TEST_SETTINGS["coordination"]}
        if backend == "zookeeper":
            zk = self.servers.zk
            return {"backend": "zookeeper", "zookeeper": {
                "hosts": [f"{zk.host}:{zk.port}"], "chroot": "/" + _unique("qcn-"),
                "session_timeout": 3.0}}
        if backend == "redis":
            return {"backend": "redis", "redis": {
                "urls": [m.url for m in self.servers.redis], "lease_seconds": 2,
                "key_prefix": _unique("qcn-")}}
        raise ValueError(f"no lab backend {backend!r}")

    # -- addresses, for Lab.cut ------------------------------------------------------------

    def address(self, node_id: str) -> str:
        return self.hosts[node_id].ip

    def addresses(self, node_ids: Sequence[str]) -> list[str]:
        return [self.address(n) for n in node_ids]

    def database(self) -> list[str]:
        """The database server's address."""
        return [self.servers.pg.host]

    def waiting_on_a_lock(self, address: str) -> int:
        """Sessions from ``address`` that wait on a lock now (``pg_stat_activity``)."""
        with self.db.read() as conn:
            found = conn.execute(sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE client_addr = CAST(:a AS inet) "
                "AND wait_event_type = 'Lock'"), {"a": address}).scalar_one()
        return int(found)

    def coordination(self) -> list[str]:
        """The coordination servers' addresses (the database's, for dblock)."""
        if self.backend == "zookeeper":
            return [self.servers.zk.host]
        if self.backend == "redis":
            return [m.host for m in self.servers.redis]
        return self.database()

    # -- nodes ------------------------------------------------------------------------------

    def host(self, node_id: str) -> NetNode:
        """The namespace of ``node_id``, made on first use (kept across restarts)."""
        if node_id not in self.hosts:
            self.hosts[node_id] = self.lab.add_node(node_id)
        return self.hosts[node_id]

    def start(self, node_id: str, role: str, *, env: Mapping[str, str] | None = None
              ) -> NodeProcess:
        """(Re)start ``node_id`` in its namespace with a config of its own; ``env`` is
        added to its environment (libfaketime, say)."""
        old = self.nodes.get(node_id)
        if old is not None:
            old.close()
        host = self.host(node_id)
        config = write_config(
            self.tmp_path, self.url, name=f"{node_id}.toml",
            worker={**TEST_SETTINGS["worker"], "host": host.ip},
            rpc={"tls": self.pki.tls_section(node_id, [host.ip])}, **self.overrides)
        log = self.tmp_path / f"{node_id}.{int(time.time() * 1000)}.log"
        node = start_node(config, node_id=node_id, role=role, log_path=log, env=env,
                          prefix=host.exec_prefix)
        self.nodes[node_id] = node
        return node

    def close(self) -> None:
        try:
            super().close()
        finally:
            for host in self.hosts.values():
                with contextlib.suppress(Exception):
                    self.lab.remove_node(host)
            self.hosts.clear()
            with contextlib.suppress(Exception):
                drop_database(self.servers.pg.url, self._db_name)
