"""``redis``: a leader lease on Redis, Redlock across independent masters.

Keys, on every master: ``<prefix>:<cluster>:leader`` (the lease: a random owner value, set
NX PX), ``:token`` (the fencing counter), ``:leader_info`` (a hash: owner, data),
``:member:<node_id>`` (a hash with a TTL) and ``:members`` (the set of member ids).

Promises, on top of :mod:`backends.base`:

* Every write that touches the lease is a Lua script (:mod:`backends.redis_scripts`, the
  backend's atomic operations) that first compares the owner value: renew is
  compare-and-pexpire, release compare-and-del, publish compare-and-set. A holder never
  renews or deletes a lease that is not its own.
* Acquire succeeds on a majority of masters within the validity, else it is undone on
  every master. Validity = TTL - elapsed - drift (drift = 1% of TTL + 2 ms), the elapsed
  time being counted from before the first command; ``Lease.valid_for`` is that validity,
  so it is safe whether the caller starts its deadline before or after the call.
* Token: the acquire script INCRs the counter and raises it above ``min_token`` (a Redis
  that lost its data cannot go below what SQL has seen). The lease's token is the largest
  of the majority's; before the lease is granted, that value is written back to every
  master that holds the lease, so that the next holder's majority, which overlaps ours and
  takes each master only after our key expired there, counts past it. A master that loses
  its data (no persistence) loses its counter: only ``min_token`` guards that case.
* Renewal needs a majority within the validity too. ``renew`` returns ``False`` (and calls
  ``on_lost``) once a majority cannot hold the key any more, and raises
  :class:`BackendUnavailable` when too few masters answer to tell.
* Loss is learnt on renew or publish: Redis has no session to watch. The caller's local
  deadline covers the time between.

Redis is an efficiency lock here (Kleppmann's sense): the SQL epoch fences the writes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import threading
import time
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.retry import Retry

from backends.base import (
    CoordinationBackend,
    LeaderInfo,
    Lease,
    LossCallback,
    LossReport,
    MemberInfo,
    leader_from_dict,
    leader_to_dict,
    member_from_dict,
    member_to_dict,
)
from backends.redis_scripts import SCRIPTS
from qcluster.errors import BackendUnavailable, ConfigError
from qcluster.settings import redact_url

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Held:
    owner: str  # the random value that this acquire set the lease key to
    loss: LossReport


class RedisBackend(CoordinationBackend):
    """A Redlock lease, leader info and members on one or more independent Redis masters."""

    name = "redis"

    def __init__(
        self,
        urls: list[str],
        *,
        cluster: str,
        lease_seconds: float = 10.0,
        key_prefix: str = "qcluster",
        member_timeout: float = 10.0,
    ) -> None:
        if not urls:
            raise ConfigError("the redis backend needs at least one URL")
        self._urls = list(urls)  # secrets: they may carry passwords
        self.display_urls = [redact_url(u) for u in urls]
        self.lease_seconds = lease_seconds
        self.member_timeout = member_timeout
        self._ttl_ms = int(lease_seconds * 1000)
        self._drift = 0.01 * lease_seconds + 0.002
        # Small next to the TTL (Redlock): a dead master must not eat the validity.
        self._socket_timeout = min(max(lease_seconds / 20, 0.1), 0.5)
        self.quorum = len(urls) // 2 + 1
        base = f"{key_prefix}:{cluster}"
        self._lease_key, self._token_key = f"{base}:leader", f"{base}:token"
        self._info_key, self._index_key = f"{base}:leader_info", f"{base}:members"
        self._member_prefix = f"{base}:member:"
        self._client_name = f"qcluster-{cluster}"
        self._clients: list[redis.Redis[bytes]] = []
        self._scripts: dict[str, Any] = {}
        self._held: dict[tuple[str, int], _Held] = {}
        self._members: dict[str, MemberInfo] = {}  # removed on stop
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<RedisBackend urls={self.display_urls}>"

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._clients:
                return
            clients = []
            for url, shown in zip(self._urls, self.display_urls, strict=True):
                try:
                    clients.append(redis.Redis.from_url(
                        url,
                        socket_timeout=self._socket_timeout,
                        socket_connect_timeout=self._socket_timeout,
                        # One immediate retry on a dropped connection (a killed client, a
                        # restarted server); a timeout is not retried: the master is slow.
                        retry=Retry(NoBackoff(), 1, (RedisConnectionError,)),
                        client_name=self._client_name,
                    ))  # fmt: skip
                except ValueError as e:
                    raise ConfigError(f"invalid Redis URL {shown}") from e
            # Scripts are registered once; each call runs EVALSHA on the master it is given
            # (loading the script there first if that master does not know it).
            for name, source in SCRIPTS.items():
                self._scripts[name] = clients[0].register_script(source)
            self._clients = clients

    def stop(self) -> None:
        with self._lock:
            held, self._held = dict(self._held), {}
            members, self._members = list(self._members.values()), {}
            clients, self._clients = self._clients, []
        # Leave now rather than after the TTLs: the lease is free at once for another node.
        for (holder, token), h in held.items():
            self._run_all(clients, "release", [self._lease_key, self._info_key], [h.owner])
            log.info("released the Redis lease of %s (token %s) on stop", holder, token)
        for m in members:
            keys = [self._member_prefix + m.node_id, self._index_key]
            self._run_all(clients, "remove_member", keys, [m.session, m.node_id])
        for client in clients:
            client.close()

    # -- leadership -------------------------------------------------------------------

    def try_acquire(self, holder: str, on_lost: LossCallback, min_token: int = 0) -> Lease | None:
        clients = self._started()
        owner = secrets.token_hex(16)
        keys = [self._lease_key, self._token_key]
        t0 = time.monotonic()
        results = self._run_all(clients, "acquire", keys, [owner, self._ttl_ms, min_token])
        won = [(c, int(r)) for c, r in zip(clients, results, strict=True) if _ok(r) and int(r)]
        token = max((t for _, t in won), default=0)
        if len(won) >= self.quorum and len(clients) > 1:
            # Write the token back where we hold the lease (see the module docstring);
            # a master where that fails is given up, and the rest must still be a majority.
            raised = self._run_all([c for c, _ in won], "raise", keys, [owner, token])
            won = [w for w, r in zip(won, raised, strict=True) if _ok(r) and int(r) == 1]
        validity = self.lease_seconds - (time.monotonic() - t0) - self._drift
        if len(won) >= self.quorum and validity > 0:
            if len(won) < len(clients):  # drop our key where it no longer counts
                held = {id(c) for c, _ in won}
                rest = [c for c in clients if id(c) not in held]
                self._run_all(rest, "release", [self._lease_key, self._info_key], [owner])
            with self._lock:
                self._held[(holder, token)] = _Held(owner, LossReport(on_lost))
            return Lease(self.name, holder, token, validity)
        # Failed: undo on every master, including those that did not answer in time.
        self._run_all(clients, "release", [self._lease_key, self._info_key], [owner])
        answered = sum(1 for r in results if _ok(r))
        if answered < self.quorum:
            raise BackendUnavailable(
                f"only {answered} of {len(clients)} Redis masters answered; need {self.quorum}"
            )
        return None

    def renew(self, lease: Lease) -> bool:
        held = self._held_of(lease)
        if held is None or held.loss.done:
            return False
        clients = self._started()
        t0 = time.monotonic()
        results = self._run_all(
            clients, "renew", [self._lease_key, self._info_key], [held.owner, self._ttl_ms]
        )
        validity = self.lease_seconds - (time.monotonic() - t0) - self._drift
        ours = sum(1 for r in results if _ok(r) and int(r) == 1)
        unknown = sum(1 for r in results if not _ok(r))
        if ours >= self.quorum and validity > 0:
            return True
        if ours + unknown >= self.quorum and validity > 0:
            raise BackendUnavailable(
                f"only {len(clients) - unknown} of {len(clients)} Redis masters answered; "
                "cannot tell whether the lease is held"
            )
        self._lost(lease, "the Redis lease expired or was taken")
        # Best effort: free our keys on the masters that still hold them.
        self._run_all(clients, "release", [self._lease_key, self._info_key], [held.owner])
        return False

    def release(self, lease: Lease) -> None:
        with self._lock:
            held = self._held.pop((lease.holder, lease.token), None)
        if held is None:
            return  # not ours: the owner value of another holder's lease is unknown here
        held.loss.cancel()
        # Compare-and-del on every master: a lease taken over meanwhile stays untouched.
        self._run_all(self._started(), "release", [self._lease_key, self._info_key], [held.owner])

    def _held_of(self, lease: Lease) -> _Held | None:
        with self._lock:
            return self._held.get((lease.holder, lease.token))

    def _lost(self, lease: Lease, reason: str) -> None:
        if (held := self._held_of(lease)) is not None:
            held.loss.report(reason)

    # -- leader publication ----------------------------------------------------------

    def publish_leader(self, lease: Lease, info: LeaderInfo) -> None:
        held = self._held_of(lease)
        if held is None or held.loss.done:
            return
        data = json.dumps(leader_to_dict(info))
        clients = self._started()
        results = self._run_all(
            clients, "publish", [self._lease_key, self._info_key], [held.owner, data]
        )
        ours = sum(1 for r in results if _ok(r) and int(r) == 1)
        gone = sum(1 for r in results if _ok(r) and int(r) == 0)
        if gone > len(clients) - self.quorum:
            self._lost(lease, "the Redis lease expired or was taken")
        elif ours < self.quorum:
            raise BackendUnavailable("too few Redis masters answered to publish the leader")

    def read_leader(self) -> LeaderInfo | None:
        clients = self._started()
        results = self._run_all(clients, "read_leader", [self._lease_key, self._info_key], [])
        answers = [r for r in results if _ok(r)]
        if len(answers) < self.quorum:
            raise BackendUnavailable("too few Redis masters answered to read the leader")
        # The leader is the owner that holds the lease key on a majority; its info is
        # valid only if that same owner wrote it.
        for lease_owner, *_ in answers:
            if not lease_owner:
                continue
            holds = sum(1 for a in answers if a[0] == lease_owner)
            if holds < self.quorum:
                continue
            for _, info_owner, data in answers:
                if info_owner == lease_owner and data:
                    return leader_from_dict(json.loads(data))
            return None
        return None

    # -- membership ------------------------------------------------------------------

    def heartbeat_member(self, member: MemberInfo) -> None:
        keys = [self._member_prefix + member.node_id, self._index_key]
        args = [json.dumps(member_to_dict(member)), member.session, int(self.member_timeout * 1000),
                member.node_id]  # fmt: skip
        with self._lock:
            self._members[member.node_id] = member
        results = self._run_all(self._started(), "heartbeat", keys, args)
        if not any(_ok(r) for r in results):
            raise BackendUnavailable("no Redis master answered the member heartbeat")

    def remove_member(self, member: MemberInfo) -> None:
        with self._lock:
            if getattr(self._members.get(member.node_id), "session", None) == member.session:
                del self._members[member.node_id]
        keys = [self._member_prefix + member.node_id, self._index_key]
        results = self._run_all(
            self._started(), "remove_member", keys, [member.session, member.node_id]
        )
        if not any(_ok(r) for r in results):
            raise BackendUnavailable("no Redis master answered the member removal")

    def live_members(self) -> list[MemberInfo]:
        results = self._run_all(
            self._started(), "list_members", [self._index_key], [self._member_prefix]
        )
        answers = [r for r in results if _ok(r)]
        if not answers:
            raise BackendUnavailable("no Redis master answered the member listing")
        # A heartbeat goes to every master but may miss one: take the union, and for each
        # member the freshest entry.
        found: dict[str, MemberInfo] = {}
        for flat in answers:
            for data, seen in zip(flat[0::2], flat[1::2], strict=True):
                m = member_from_dict(json.loads(data), float(seen))
                old = found.get(m.node_id)
                if old is None or (old.last_seen or 0.0) < (m.last_seen or 0.0):
                    found[m.node_id] = m
        return sorted(found.values(), key=lambda m: m.node_id)

    # -- helpers ---------------------------------------------------------------------

    def _started(self) -> list[redis.Redis[bytes]]:
        clients = self._clients
        if not clients:
            raise BackendUnavailable("the Redis backend is not started")
        return clients

    def _run_all(
        self, clients: list[redis.Redis[bytes]], script: str, keys: list[str], args: list[Any]
    ) -> list[Any]:
        """Run a script on each master in turn; a master's error is its result, not raised:
        Redlock counts answers, and one dead master must not stop the others."""
        results: list[Any] = []
        for client in clients:
            try:
                results.append(self._scripts[script](keys=keys, args=args, client=client))
            except RedisError as e:
                log.debug("Redis master failed on %s: %s", script, type(e).__name__)
                results.append(_Failed(e))
        return results


class _Failed:
    """A master's failed answer (its error, for the debug log)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _ok(result: object) -> bool:
    return not isinstance(result, _Failed)
