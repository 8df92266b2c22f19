"""``[coordination.zookeeper] hosts`` in kazoo's one-string form, "zk1:2181,zk2:2181/chroot":
a backend built from it through the loader connects to a real ZooKeeper and keeps every
node of the cluster under the chroot."""

from __future__ import annotations

import json
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from backends.base import MemberInfo
from backends.loader import load_backend
from backends.zookeeper import ZooKeeperBackend
from qcluster.errors import BackendUnavailable
from qcluster.settings import Settings, load_settings_from_text
from qcluster.store.db import Database
from tests.helpers import describe_result, run_cli, run_json, start_node, wait_for, write_config


def _settings(hosts: str, extra: str = "") -> Settings:
    text = (
        "[cluster]\nname = 'strung'\nmember_timeout_seconds = 5.0\n"
        "[coordination]\nbackend = 'zookeeper'\n"
        f"[coordination.zookeeper]\nhosts = {json.dumps(hosts)}\nsession_timeout = 3.0\n"
        f"{extra}"
    )
    return load_settings_from_text(text, "test.toml", env={})


@contextmanager
def _no_warnings() -> Iterator[None]:
    """Fail if the block emits any warning (kazoo's "No chroot path exists" above all),
    whatever filters are in force around it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []


def test_a_backend_from_the_one_string_form_connects_under_its_chroot(
    zk: Any, zk_admin: Any, tmp_path: Path
) -> None:
    # The same server twice: the string's "," is taken apart too.
    servers = [*zk.hosts, *zk.hosts]
    settings = _settings(",".join(servers) + zk.chroot)
    assert settings.coordination.zookeeper.hosts == tuple(servers)
    assert settings.coordination.zookeeper.chroot == zk.chroot
    db = Database(f"sqlite:///{tmp_path / 'unused.db'}")  # the loader wants one; unused
    backend = load_backend(settings, db)
    assert isinstance(backend, ZooKeeperBackend)
    backend.start()
    try:
        lease = backend.try_acquire("n1", lambda reason: None)
        assert lease is not None
        backend.heartbeat_member(MemberInfo(node_id="n1", session="s1", roles=("scheduler",)))
        assert [m.node_id for m in backend.live_members()] == ["n1"]
        # Seen from the server's root: everything is under the chroot, nothing outside it.
        base = f"{zk.chroot}/qcluster/strung"
        assert len(zk_admin.get_children(f"{base}/election")) == 1
        assert zk_admin.exists(f"{base}/members/n1") is not None
        assert zk_admin.exists("/qcluster/strung") is None
        backend.release(lease)
    finally:
        backend.stop()
        db.dispose()


def test_a_chroot_that_does_not_exist_yet_is_created_on_first_start(
    zk: Any, zk_admin: Any, tmp_path: Path
) -> None:
    # Two levels that do not exist yet, under the test's own (cleaned up) namespace.
    chroot = f"{zk.chroot}/qc/prod"
    assert zk_admin.exists(f"{zk.chroot}/qc") is None
    settings = _settings(",".join(zk.hosts) + chroot)
    assert settings.coordination.zookeeper.chroot == chroot
    db = Database(f"sqlite:///{tmp_path / 'unused.db'}")
    backend = load_backend(settings, db)
    try:
        with _no_warnings():
            backend.start()
            lease = backend.try_acquire("n1", lambda reason: None)
        assert lease is not None
        assert zk_admin.exists(chroot) is not None
        assert len(zk_admin.get_children(f"{chroot}/qcluster/strung/election")) == 1
        assert backend.read_leader() is None  # a plain call through the chrooted client
        backend.release(lease)
    finally:
        backend.stop()
    # Started again on the chroot that now exists: nothing to create, still no warning.
    again = load_backend(settings, db)
    try:
        with _no_warnings():
            again.start()
            assert again.try_acquire("n2", lambda reason: None) is not None
    finally:
        again.stop()
        db.dispose()


def test_nodes_starting_together_on_a_new_chroot_all_start(zk: Any, zk_admin: Any) -> None:
    # Each one sees the chroot missing and creates it: the others' NodeExistsError is fine.
    chroot = f"{zk.chroot}/qc/together"
    backends = [ZooKeeperBackend(zk.hosts, cluster="c", chroot=chroot, session_timeout=3.0)
                for _ in range(4)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(backends))

    def start(backend: ZooKeeperBackend) -> None:
        barrier.wait()
        try:
            backend.start()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=start, args=(b,)) for b in backends]
    try:
        with _no_warnings():
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
        assert errors == []
        leases = [b.try_acquire(f"n{i}", lambda reason: None) for i, b in enumerate(backends)]
        assert sum(lease is not None for lease in leases) == 1
        assert zk_admin.exists(f"{chroot}/qcluster/c/election") is not None
    finally:
        for b in backends:
            b.stop()


def test_a_new_chroot_gets_the_acl_of_the_backends_nodes(zk: Any, zk_admin: Any) -> None:
    chroot = f"{zk.chroot}/qc/private"
    backend = ZooKeeperBackend(zk.hosts, cluster="c", chroot=chroot, session_timeout=3.0,
                               auth="qc:secret")
    try:
        with _no_warnings():
            backend.start()
        assert backend.try_acquire("n1", lambda reason: None) is not None
        for path in (f"{zk.chroot}/qc", chroot, f"{chroot}/qcluster/c/election"):
            acls, _ = zk_admin.get_acls(path)
            assert [(a.id.scheme, a.perms) for a in acls] == [("digest", 31)], path
    finally:
        backend.stop()


def test_a_chroot_that_cannot_be_created_is_one_clear_error(zk: Any, zk_admin: Any) -> None:
    from kazoo.security import OPEN_ACL_UNSAFE, make_acl

    chroot = f"{zk.chroot}/qc/prod"
    zk_admin.set_acls(zk.chroot, [make_acl("world", "anyone", read=True)])
    try:
        backend = ZooKeeperBackend(zk.hosts, cluster="c", chroot=chroot, session_timeout=3.0)
        with _no_warnings(), pytest.raises(BackendUnavailable) as raised:
            backend.start()
        message = str(raised.value)
        assert f"refused to create the chroot {chroot}" in message
        assert "\n" not in message
        assert backend._client is None  # stopped: no session left open
    finally:
        zk_admin.set_acls(zk.chroot, OPEN_ACL_UNSAFE)
    assert zk_admin.exists(chroot) is None


@pytest.mark.parametrize("form", ["string", "list"])
def test_the_cli_on_a_new_chroot_prints_no_warning(
    zk: Any, zk_admin: Any, tmp_path: Path, sqlite_url: str, form: str
) -> None:
    chroot = f"{zk.chroot}/qc/{form}"
    zookeeper: dict[str, Any] = (
        {"hosts": ",".join(zk.hosts) + chroot} if form == "string"
        else {"hosts": list(zk.hosts), "chroot": chroot}
    )
    config = write_config(tmp_path, sqlite_url,
                          coordination={"backend": "dblock", "zookeeper": zookeeper})
    check = run_cli("config", "check", config=config)
    assert check.stdout.startswith("ok: "), describe_result(check)
    assert check.stderr == "", describe_result(check)
    dry = run_cli("backend", "migrate", "--to", "zookeeper", "--dry-run", config=config)
    assert "plan (dry run, nothing changed): the cluster runs dblock" in dry.stdout
    assert dry.stderr == "", describe_result(dry)  # no UserWarning, no NoNodeError
    assert zk_admin.exists(chroot) is not None  # reaching ZooKeeper created it


@pytest.mark.cluster
def test_a_node_starts_and_leads_on_a_new_chroot(
    zk: Any, zk_admin: Any, tmp_path: Path, sqlite_url: str
) -> None:
    chroot = f"{zk.chroot}/qc/node"
    config = write_config(tmp_path, sqlite_url, coordination={
        "backend": "zookeeper",
        "zookeeper": {"hosts": ",".join(zk.hosts) + chroot, "session_timeout": 3.0}})
    with start_node(config, node_id="n1", log_path=tmp_path / "n1.log") as node:

        def leads() -> bool:
            assert node.running(), node.log_tail()
            leader = run_json("cluster", "status", "--json", config=config)["leader"]
            return leader is not None and leader["node_id"] == "n1"

        wait_for(leads, 30, interval=0.3, what="n1 leading", details=node.log_tail)
        assert zk_admin.exists(f"{chroot}/qcluster") is not None
        node.terminate()
        assert node.wait() == 0
    log = node.log()
    for bad in ("Warning", "NoNodeError", "Traceback", "cannot reach"):
        assert bad not in log, node.log_tail()
