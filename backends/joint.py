"""``joint``: leadership on two backends at once, for the joint phase of a migration.

While a cluster moves from one backend to another, a leader must hold a claim on both
(docs/DESIGN.md invariant 9). Then any two nodes that could lead contend on
at least one common lock: a node that still campaigns on the old backend alone meets the
joint leader there, and so does a node that already campaigns on the new one alone.

A joint lease is taken part by part, in a fixed order (the cluster's current backend
first), and given back entirely if one part cannot be had: nobody sits on the new
backend's lock without the old one. Each part's token is raised above the tokens before
it, so the joint token (the last part's) exceeds every earlier leader's. The joint lease
is valid for as long as its shortest part; losing any part loses the whole.

The parts are backends the node owns and has started; this object only combines them
and neither starts nor stops them. Membership goes to every part and is read as their
union, freshest entry first.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from backends.base import CoordinationBackend, LeaderInfo, Lease, LossCallback, MemberInfo
from qcluster.errors import QClusterError

log = logging.getLogger(__name__)


class JointBackend(CoordinationBackend):
    """Two (or more) backends taken together."""

    name = "joint"

    def __init__(self, parts: Sequence[CoordinationBackend]) -> None:
        if len(parts) < 2 or len({p.name for p in parts}) != len(parts):
            raise ValueError("a joint backend needs two or more different backends")
        self.parts = tuple(parts)
        self.label = "+".join(p.name for p in parts)

    def __repr__(self) -> str:
        return f"JointBackend({self.label})"

    # -- leadership -------------------------------------------------------------------

    def try_acquire(self, holder: str, on_lost: LossCallback, min_token: int = 0) -> Lease | None:
        taken: list[Lease] = []
        try:
            for part in self.parts:
                lease = part.try_acquire(holder, on_lost, min_token)
                if lease is None:
                    self._give_back(taken)
                    return None
                taken.append(lease)
                min_token = max(min_token, lease.token)
        except BaseException:
            self._give_back(taken)
            raise
        return combine(taken)

    def renew(self, lease: Lease) -> bool:
        ok = True
        for part, claim in self._claims(lease):
            # Every part is renewed even when one is gone: the caller steps down on False,
            # and the others are released then, not left to expire.
            ok = part.renew(claim) and ok
        return ok

    def release(self, lease: Lease) -> None:
        self._give_back([claim for _part, claim in self._claims(lease)])

    def _give_back(self, claims: list[Lease]) -> None:
        error: QClusterError | None = None
        for claim in reversed(claims):
            try:
                self._part(claim.backend).release(claim)
            except QClusterError as e:  # release the others anyway; they expire otherwise
                log.info("could not release the %s lease: %s", claim.backend, e)
                error = e
        if error is not None:
            raise error

    def _claims(self, lease: Lease) -> list[tuple[CoordinationBackend, Lease]]:
        claims = lease.parts or (lease,)
        return [(self._part(c.backend), c) for c in claims]

    def _part(self, name: str) -> CoordinationBackend:
        for part in self.parts:
            if part.name == name:
                return part
        raise QClusterError(f"this joint backend ({self.label}) has no {name!r} part")

    # -- leader publication ----------------------------------------------------------

    def publish_leader(self, lease: Lease, info: LeaderInfo) -> None:
        for part, claim in self._claims(lease):
            part.publish_leader(claim, info)

    def read_leader(self) -> LeaderInfo | None:
        for part in self.parts:
            info = part.read_leader()
            if info is not None:
                return info
        return None

    # -- membership ------------------------------------------------------------------

    def heartbeat_member(self, member: MemberInfo) -> None:
        for part in self.parts:
            part.heartbeat_member(member)

    def remove_member(self, member: MemberInfo) -> None:
        for part in self.parts:
            part.remove_member(member)

    def live_members(self) -> list[MemberInfo]:
        return merge_members(part.live_members() for part in self.parts)


def combine(claims: Sequence[Lease]) -> Lease:
    """One lease from per-backend claims (a single claim stays itself)."""
    if len(claims) == 1:
        return claims[0]
    return Lease(
        backend="+".join(c.backend for c in claims),
        holder=claims[0].holder,
        token=claims[-1].token,
        valid_for=min(c.valid_for for c in claims),
        parts=tuple(claims),
    )


def merge_members(listings: Iterable[Iterable[MemberInfo]]) -> list[MemberInfo]:
    """The union of several member listings, one entry per incarnation (node id and
    session), the first listing's entry first. Two incarnations of one node may both be
    listed for a while (a restart, one backend slower to forget the old one): each is
    live as long as some backend says so. Their ``last_seen`` come from different clocks
    and are never compared."""
    found: dict[tuple[str, str], MemberInfo] = {}
    for listing in listings:
        for m in listing:
            found.setdefault((m.node_id, m.session), m)
    return sorted(found.values(), key=lambda m: (m.node_id, m.session))
