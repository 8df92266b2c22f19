"""``qcluster start`` that cannot listen on its ``[worker]`` address: one ``error:`` line
(never "internal error"), a non-zero exit, and nothing left held, so that another node
leads at once. A host that is no host name at all is a config error, caught by
``qcluster config check`` already.

The leases here last 30 s: a lease that a failed start left behind would keep the next
node from leading for that long, well past the time these tests give it.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qcluster.errors import ConfigError, QClusterError
from qcluster.leader.election import Leadership
from qcluster.node import Node
from qcluster.settings import load_settings
from tests.cluster.harness import upgrade_database
from tests.helpers import (
    assert_cli_error,
    run_cli,
    run_json,
    start_node,
    wait_for,
    write_config,
)

LEASE = {"dblock": {"lease_seconds": 30}}
CLUSTER = {"member_timeout_seconds": 30}
PROMPTLY = 20.0  # seconds for a fresh node to start and lead; less than LEASE
#: TEST-NET-1 (RFC 5737): assigned to no machine, so binding it fails here. No traffic is
#: ever sent to it.
NOT_HERE = "192.0.2.1"


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that this test listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _can_bind(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _assert_another_node_leads_promptly(tmp_path: Path, db_url: str) -> None:
    """A node with a free port starts and leads within PROMPTLY, alone in the member list:
    the failed start left neither a lease nor a member record."""
    config = write_config(tmp_path, db_url, name="good.toml", coordination=LEASE,
                          cluster=CLUSTER)
    with start_node(config, node_id="good", log_path=tmp_path / "good.log") as node:

        def leads() -> dict[str, Any] | None:
            assert node.running(), node.log_tail()
            status: dict[str, Any] = run_json("cluster", "status", "--json", config=config)
            leader = status["leader"]
            return status if leader is not None and leader["node_id"] == "good" else None

        status = wait_for(leads, PROMPTLY, interval=0.3, what="the good node leading",
                          details=node.log_tail)
        assert status is not None
        assert [m["node_id"] for m in status["members"]] == ["good"]
        node.terminate()
        assert node.wait() == 0
        assert "Traceback" not in node.log()


CASES: dict[str, Callable[[int], tuple[dict[str, Any], tuple[str, ...]]]] = {
    "port-in-use": lambda busy: (
        {"host": "127.0.0.1", "port": busy},
        (f"cannot listen on 127.0.0.1:{busy}", "[worker] host/port", "Address already in use"),
    ),
    "address-not-here": lambda busy: (
        {"host": NOT_HERE},
        (f"cannot listen on {NOT_HERE}:0", "[worker] host/port",
         "Cannot assign requested address"),
    ),
}


@pytest.mark.cluster
@pytest.mark.parametrize("case", list(CASES))
def test_a_start_that_cannot_listen_is_one_error_and_holds_nothing(
    tmp_path: Path, db_url: str, busy_port: int, case: str
) -> None:
    worker, fragments = CASES[case](busy_port)
    config = write_config(tmp_path, db_url, coordination=LEASE, cluster=CLUSTER, worker=worker)
    upgrade_database(config)  # the start below meets a ready database
    result = run_cli("start", "--node-id", "bad", config=config, check=False, timeout=60)
    line = assert_cli_error(result, *fragments)
    assert "internal error" not in line
    _assert_another_node_leads_promptly(tmp_path, db_url)


def test_a_host_that_is_no_host_name_is_caught_by_config_check(
    tmp_path: Path, sqlite_url: str
) -> None:
    config = write_config(tmp_path, sqlite_url, worker={"host": "not a host!"})
    for command in (("config", "check"), ("start",)):
        result = run_cli(*command, config=config, check=False, timeout=60)
        line = assert_cli_error(result, "worker.host", "'not a host!'",
                                "must be an IP address or a host name")
        assert "internal error" not in line


# -- in one process: Node.start() that fails stops what it started --------------------------


def test_node_start_that_cannot_listen_raises_a_config_error(
    tmp_path: Path, sqlite_url: str, busy_port: int
) -> None:
    settings = load_settings(write_config(tmp_path, sqlite_url, worker={"port": busy_port}))
    node = Node(settings, node_id="n1")
    with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{busy_port}"):
        node.start()
    assert node.backends == {} and node.db is None  # listening is the first step
    node.stop()  # as the CLI does after a failed start: nothing more to do


def test_node_start_that_fails_after_listening_frees_the_port(tmp_path: Path) -> None:
    port, closed = _free_port(), _free_port()
    # A PostgreSQL that does not answer (nothing listens on that port): fails after the bind.
    url = f"postgresql+psycopg://qc@127.0.0.1:{closed}/qc?connect_timeout=2"
    settings = load_settings(write_config(tmp_path, url, worker={"port": port}))
    node = Node(settings, node_id="n1")
    with pytest.raises(QClusterError):
        node.start()
    assert _can_bind(port), "the failed start kept its RPC port"


def test_node_start_that_fails_after_taking_the_lease_releases_it(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings(write_config(tmp_path, sqlite_url, coordination=LEASE,
                                          cluster=CLUSTER))
    real_start = Leadership.start

    def start_then_fail(self: Leadership) -> None:
        real_start(self)
        wait_for(lambda: self.leading, PROMPTLY, what="n1 leading")
        raise RuntimeError("a failure after the lease was taken")

    monkeypatch.setattr(Leadership, "start", start_then_fail)
    first = Node(settings, node_id="n1")
    with pytest.raises(RuntimeError, match="after the lease"):
        first.start()
    monkeypatch.undo()
    assert first.leadership is not None and not first.leadership.leading
    with Node(settings, node_id="n2") as second:
        assert second.leadership is not None
        wait_for(lambda: second.leadership is not None and second.leadership.leading,
                 PROMPTLY, what="n2 leading")
        assert [m.node_id for m in second.live_members()] == ["n2"]
