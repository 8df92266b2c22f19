"""``[coordination.zookeeper] hosts`` in kazoo's one-string form, "zk1:2181,zk2:2181/chroot":
a backend built from it through the loader connects to a real ZooKeeper and keeps every
node of the cluster under the chroot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from backends.base import MemberInfo
from backends.loader import load_backend
from backends.zookeeper import ZooKeeperBackend
from qcluster.config import Settings, load_settings_from_text
from qcluster.db import Database


def _settings(hosts: str) -> Settings:
    text = (
        "[cluster]\nname = 'strung'\nmember_timeout_seconds = 5.0\n"
        "[coordination]\nbackend = 'zookeeper'\n"
        f"[coordination.zookeeper]\nhosts = {json.dumps(hosts)}\nsession_timeout = 3.0\n"
    )
    return load_settings_from_text(text, "test.toml", env={})


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
