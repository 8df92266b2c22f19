"""Fixtures of the fault lab (tests/cluster/netns.py): one lab and one set of servers on
lab addresses per test process, and clusters whose nodes each run in a namespace."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.netcluster import LabServers, NetCluster
from tests.cluster.netns import Lab, LabError, lab_problem
from tests.conftest import start_server, unavailable


@pytest.fixture(scope="session")
def net_lab() -> Iterator[Lab]:
    """The lab of this test process: skipped without root or ``ip`` (a failure under
    CI=true)."""
    problem = lab_problem()
    if problem is not None:
        unavailable(problem)
    try:
        made = Lab.create()
    except LabError as e:
        unavailable(f"cannot build a network namespace lab: {e}")
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(scope="session")
def lab_servers(net_lab: Lab) -> Iterator[LabServers]:
    servers = LabServers(net_lab, start_server)
    try:
        yield servers
    finally:
        servers.close()


@pytest.fixture
def make_net_cluster(tmp_path: Path, net_lab: Lab, lab_servers: LabServers
                     ) -> Iterator[Callable[..., NetCluster]]:
    """``make_net_cluster("zookeeper", scheduler={...})``: a :class:`NetCluster`; every
    node, namespace, cut and database it made is gone after the test, whatever happened."""
    made: list[NetCluster] = []

    def make(backend: str, **overrides: Any) -> NetCluster:
        c = NetCluster(tmp_path, net_lab, lab_servers, backend, **overrides)
        made.append(c)
        return c

    try:
        yield make
    finally:
        for c in reversed(made):
            c.close()
        net_lab.heal()
