"""Membership of the ``zookeeper`` backend (:mod:`backends.zookeeper`): members are
ephemeral nodes (a dead process drops out when its session expires); one that stops
heartbeating drops out once its node's mtime is older than ``member_timeout``, compared
with a fresh mtime of the clock node: both are server times.
"""

from __future__ import annotations

import json
import threading
from contextlib import suppress

from kazoo.exceptions import BadVersionError, NodeExistsError, NoNodeError

from backends.base import MemberInfo, member_from_dict, member_to_dict
from backends.zookeeper_client import ZooKeeperConnection
from qcluster.errors import BackendUnavailable, InputError


class ZooKeeperMembers(ZooKeeperConnection):
    """The membership half of :class:`backends.zookeeper.ZooKeeperBackend`, on the nodes
    under ``_members_path`` (the backend sets these attributes)."""

    member_timeout: float
    _members_path: str
    _clock: str
    _lock: threading.RLock
    _members: dict[str, MemberInfo]  # re-created after a session loss

    def heartbeat_member(self, member: MemberInfo) -> None:
        path = self._member_path(member.node_id)
        data = json.dumps(member_to_dict(member)).encode()
        with self._lock:
            self._members[member.node_id] = member
        with self._errors("registering a member"):
            client = self._connected()
            for _ in range(3):
                stat = self._wait(client.exists_async(path))
                try:
                    if stat is None:
                        self._wait(client.create_async(path, data, ephemeral=True))
                    elif stat.ephemeralOwner == self._session(client):
                        self._wait(client.set_async(path, data, stat.version))
                    else:
                        # An earlier incarnation's node, its session not yet expired: the
                        # running process owns its node id, so replace it.
                        self._wait(client.delete_async(path, stat.version))
                        continue
                    return
                except (NoNodeError, NodeExistsError, BadVersionError):
                    continue  # raced with an expiry or another writer: look again
            raise BackendUnavailable(f"member node {member.node_id} kept changing; try again")

    def remove_member(self, member: MemberInfo) -> None:
        path = self._member_path(member.node_id)
        with self._lock:
            if getattr(self._members.get(member.node_id), "session", None) == member.session:
                del self._members[member.node_id]
        with self._errors("removing a member"), suppress(NoNodeError, BadVersionError):
            # Gone already, or another incarnation's: then not ours to delete.
            data, stat = self._wait(self._connected().get_async(path))
            if json.loads(data).get("session") == member.session:
                self._wait(self._connected().delete_async(path, stat.version))

    def live_members(self) -> list[MemberInfo]:
        with self._errors("listing members"):
            client = self._connected()
            # The server's clock, as the mtime of a write: compared only with other mtimes,
            # which the same ensemble stamped.
            now = self._wait(client.set_async(self._clock, b"")).mtime / 1000.0
            names = self._wait(client.get_children_async(self._members_path))
            pending = [client.get_async(f"{self._members_path}/{n}") for n in names]
            members: list[MemberInfo] = []
            for result in pending:
                with suppress(NoNodeError):
                    data, stat = self._wait(result)
                    if stat.mtime / 1000.0 >= now - self.member_timeout:
                        members.append(member_from_dict(json.loads(data), stat.mtime / 1000.0))
        return sorted(members, key=lambda m: m.node_id)

    def _member_path(self, node_id: str) -> str:
        if not node_id or "/" in node_id or node_id in (".", "..") or "\0" in node_id:
            raise InputError(f"node id {node_id!r} cannot be a ZooKeeper node name")
        return f"{self._members_path}/{node_id}"
