"""Each backend's server going away, and a node whose config names another backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.cluster.harness import cluster, run_outage, upgrade_database
from tests.helpers import wait_for, write_config

pytestmark = pytest.mark.cluster


def test_zookeeper_stopped_longer_than_the_session_timeout(
    tmp_path: Path, pg_url: str, private_zk: Any
) -> None:
    coordination = {"backend": "zookeeper", "zookeeper": {
        "hosts": [private_zk.hosts], "session_timeout": 3.0}}
    run_outage(tmp_path, pg_url, {"coordination": coordination}, private_zk.stop,
               private_zk.start, outage=5)


def test_redis_masters_restarted(tmp_path: Path, pg_url: str, server_factory: Any) -> None:
    from tests.servers import RedisServer

    masters = [server_factory.start(RedisServer) for _ in range(3)]
    coordination = {"backend": "redis", "redis": {
        "urls": [m.url for m in masters], "lease_seconds": 2}}

    def stop() -> None:
        for m in masters:
            m.stop()

    def start() -> None:
        for m in masters:
            m.start()

    run_outage(tmp_path, pg_url, {"coordination": coordination}, stop, start, outage=3)


def test_node_whose_config_names_another_backend_campaigns_on_the_clusters(
    tmp_path: Path, pg_url: str, zk: Any
) -> None:
    """Half-way through a rolling restart: a node whose edited config names ZooKeeper
    still campaigns on the cluster's dblock lease (and says so), until every scheduler
    node's config names ZooKeeper."""
    config = write_config(tmp_path, pg_url)
    other = write_config(tmp_path, pg_url, name="zk.toml", coordination={
        "backend": "zookeeper", "zookeeper": {"hosts": list(zk.hosts), "chroot": zk.chroot}})
    upgrade_database(config)
    with cluster(tmp_path, config, pg_url) as c:
        c.start("s1", "scheduler")
        first = c.wait_leader()
        c.config = other
        newer = c.start("s2", "scheduler")
        wait_for(lambda: "qcluster backend migrate --to zookeeper" in newer.log(), timeout=20,
                 what="s2 to say that the cluster runs dblock")
        c.nodes["s1"].kill()
        state = c.wait_leader(other_than="s1", after_epoch=first.epoch)
        assert (state.leader_id, state.leader_backend) == ("s2", "dblock")
        assert (state.backend, state.phase) == ("dblock", "stable")
