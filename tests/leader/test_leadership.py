"""The leadership loop (``qcluster.leader.election.Leadership``) on the in-process memory
backend: no server, no database, each test in about a second.

Campaign, win, renew; step down first (``halt`` before ``on_revoked``, then the lease is
given back) when the lease is lost, the session expires or renewals keep failing; no
leadership while the backend fails every call; ``stop()``; a lease reshaped into a joint
one and back. The same loop on real servers is exercised by the cluster tests.

The last test drives a real ``LeaderRole`` (on SQLite) from the loop: a quick re-election
never runs two ``qc-maintenance`` threads at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from backends.base import CoordinationBackend, Lease, MemberInfo
from backends.joint import JointBackend
from backends.memory import MemoryBackend, MemoryServer
from qcluster.leader import role
from qcluster.leader.election import Leadership
from qcluster.settings import load_settings_from_mapping
from tests.backends.helpers import LossRecorder
from tests.conftest import DatabaseFactory
from tests.helpers import TEST_SECRET, wait_for

LEASE = 1.0  # renewed every third of it; the deadline is 5% + 50 ms before it ends
WAIT = 5.0  # generous: the machine may be busy


class _Other(MemoryBackend):
    """A second kind of memory backend: a joint lease needs two different names."""

    name = "memory-b"


class _Node:
    """A Leadership and a record of what it called, in order."""

    def __init__(
        self,
        node_id: str,
        backend: MemoryBackend,
        *,
        min_token: int = 0,
        plan: Callable[[], CoordinationBackend | str] | None = None,
    ) -> None:
        self.node_id = node_id
        self.backend = backend
        self.events: list[tuple[str, object]] = []
        self._lock = threading.Lock()
        self.leadership = Leadership(
            node_id,
            plan=plan or (lambda: backend),
            on_elected=lambda lease: self._record("elected", lease),
            on_revoked=lambda reason: self._record("revoked", reason),
            halt=lambda: self._record("halt", None),
            min_token=lambda: min_token,
            on_reshaped=lambda lease: self._record("reshaped", lease),
            campaign_interval=0.02,
        )

    def _record(self, kind: str, value: object) -> None:
        with self._lock:
            self.events.append((kind, value))

    def kinds(self) -> list[str]:
        with self._lock:
            return [kind for kind, _ in self.events]

    def values(self, kind: str) -> list[object]:
        with self._lock:
            return [value for k, value in self.events if k == kind]

    def leases(self, kind: str = "elected") -> list[Lease]:
        return [v for v in self.values(kind) if isinstance(v, Lease)]

    def wait_elected(self, times: int = 1) -> Lease:
        wait_for(lambda: len(self.leases()) >= times, WAIT, 0.01, f"{self.node_id} to win")
        wait_for(lambda: self.leadership.status == "leader", WAIT, 0.01, "status leader")
        return self.leases()[times - 1]

    def wait_revoked(self) -> str:
        reasons = wait_for(lambda: self.values("revoked"), WAIT, 0.01, "a step-down")
        return str(reasons[0])


@contextmanager
def _cluster(
    *node_ids: str, lease_seconds: float = LEASE, min_token: int = 0
) -> Iterator[tuple[MemoryServer, list[_Node]]]:
    """Nodes on one memory server, each with its own started backend; stopped after."""
    server = MemoryServer()
    made: list[_Node] = []
    try:
        for node_id in node_ids:
            backend = MemoryBackend(server, lease_seconds=lease_seconds, member_timeout=LEASE)
            backend.start()
            made.append(_Node(node_id, backend, min_token=min_token))
        yield server, made
    finally:
        for node in made:
            node.leadership.stop()
            node.backend.stop()


def _probe(server: MemoryServer) -> MemoryBackend:
    backend = MemoryBackend(server, lease_seconds=LEASE)
    backend.start()
    return backend


def test_a_node_campaigns_and_wins_a_free_lease_above_min_token() -> None:
    with _cluster("n1", min_token=41) as (server, (node,)):
        assert not node.leadership.leading
        node.leadership.start()
        lease = node.wait_elected()
        assert node.leadership.leading
        assert (lease.backend, lease.holder) == ("memory", "n1")
        assert lease.token >= 42
        assert _probe(server).try_acquire("intruder", LossRecorder()) is None


def test_one_of_two_nodes_leads_and_keeps_its_lease_by_renewing_it() -> None:
    with _cluster("a", "b", lease_seconds=0.6) as (_server, (a, b)):
        a.leadership.start()
        lease = a.wait_elected()
        b.leadership.start()
        time.sleep(1.5)  # two and a half lease lengths: held only if it was renewed
        assert a.leadership.leading and a.leadership.lease == lease
        assert a.kinds() == ["elected"]
        assert b.kinds() == [] and b.leadership.status == "follower"


def test_a_lost_lease_halts_at_once_then_steps_down_and_campaigns_again() -> None:
    with _cluster("n1") as (_server, (node,)):
        node.leadership.start()
        first = node.wait_elected()
        assert node.backend.lose_lease("taken away by the test")
        # halt() ran inside on_lost, on this thread, before lose_lease returned.
        assert node.kinds()[:2] == ["elected", "halt"]
        assert node.wait_revoked() == "taken away by the test"
        kinds = node.kinds()
        assert kinds.index("halt") < kinds.index("revoked")  # step down first
        again = node.wait_elected(times=2)  # the lease is free: it wins it back
        assert again.token > first.token


def _slow_start(node: _Node, gate: threading.Event) -> threading.Event:
    """Make ``node``'s ``on_elected`` record itself, then wait for ``gate`` (at most WAIT);
    the event returned is set once it has returned."""
    done = threading.Event()

    def on_elected(lease: Lease) -> None:
        node._record("elected", lease)
        gate.wait(WAIT)
        node._record("started", None)
        done.set()

    node.leadership.on_elected = on_elected
    return done


def test_a_term_start_longer_than_the_lease_keeps_it_renewed() -> None:
    """on_elected runs on its own thread: the loop renews meanwhile (before, a first
    recovery pass that asked a silent worker for 2 s lost a 2 s lease, again and again)."""
    with _cluster("n1") as (server, (node,)):
        gate = threading.Event()
        done = _slow_start(node, gate)
        node.leadership.start()
        wait_for(lambda: node.leases(), WAIT, 0.01, "the win")
        assert node.leadership.status == "starting to lead"
        time.sleep(LEASE * 2.5)  # the lease ends unless it is renewed while the start waits
        assert node.kinds() == ["elected"] and node.leadership.leading
        assert _probe(server).try_acquire("intruder", LossRecorder()) is None
        gate.set()
        assert done.wait(WAIT)
        wait_for(lambda: node.leadership.status == "leader", WAIT, 0.01, "status leader")
        assert node.kinds() == ["elected", "started"]


def test_a_lease_lost_while_the_term_starts_waits_for_the_start_then_steps_down() -> None:
    with _cluster("n1") as (_server, (node,)):
        gate = threading.Event()
        done = _slow_start(node, gate)
        node.leadership.start()
        wait_for(lambda: node.leases(), WAIT, 0.01, "the win")
        assert node.backend.lose_lease("taken away by the test")
        time.sleep(0.3)
        assert node.kinds() == ["elected", "halt", "halt"]  # on_lost's, then the step-down's
        gate.set()  # the halted start returns: only then is the term torn down
        assert node.wait_revoked() == "taken away by the test"
        assert done.is_set()
        kinds = node.kinds()
        assert kinds.index("started") < kinds.index("revoked")


def test_an_expired_session_steps_the_leader_down_and_another_node_takes_over() -> None:
    campaigning = threading.Event()
    campaigning.set()
    with _cluster("a", "b") as (_server, (a, b)):
        a.leadership.plan = lambda: a.backend if campaigning.is_set() else "paused by the test"
        for node in (a, b):
            node.backend.heartbeat_member(MemberInfo(node.node_id, "s", ("scheduler",)))
        a.leadership.start()
        old = a.wait_elected()
        b.leadership.start()
        campaigning.clear()
        a.backend.expire_session()
        assert "session expired" in a.wait_revoked()
        new = b.wait_elected()
        assert new.token > old.token
        assert [m.node_id for m in b.backend.live_members()] == ["b"]  # a's entry died
        assert not a.leadership.leading


def test_a_backend_that_fails_every_call_gives_no_leadership() -> None:
    with _cluster("n1") as (_server, (node,)):
        node.backend.fail_next(10**9)
        node.leadership.start()
        wait_for(lambda: node.leadership.status.startswith("cannot campaign"), WAIT, 0.01,
                 "a failed campaign")
        time.sleep(0.3)
        assert node.kinds() == [] and not node.leadership.leading
        node.backend.fail_next(0)  # the backend comes back
        node.wait_elected()


def test_renewals_that_keep_failing_step_the_leader_down_by_its_deadline() -> None:
    with _cluster("n1") as (_server, (node,)):
        node.leadership.start()
        node.wait_elected()
        node.backend.fail_next(10**9)  # every renew raises BackendUnavailable from now on
        failing_since = time.monotonic()
        reason = node.wait_revoked()
        assert time.monotonic() - failing_since <= LEASE + 1.0
        assert "deadline" in reason, reason
        kinds = node.kinds()
        assert kinds.index("halt") < kinds.index("revoked")
        assert not node.leadership.leading
        time.sleep(0.3)
        assert node.kinds().count("elected") == 1  # no campaign can succeed meanwhile


def test_stop_steps_down_and_frees_the_lease_for_another_node() -> None:
    with _cluster("n1") as (server, (node,)):
        node.leadership.start()
        lease = node.wait_elected()
        node.leadership.stop()
        node.leadership.stop()  # idempotent
        assert node.values("revoked") == ["stopping"]
        assert not node.leadership.leading
        taken = _probe(server).try_acquire("next", LossRecorder())
        assert taken is not None and taken.token > lease.token


def test_a_reshaped_lease_takes_the_new_claim_first_and_gives_the_old_one_back() -> None:
    first, second = MemoryServer(), MemoryServer()
    old, new = MemoryBackend(first, lease_seconds=LEASE), _Other(second, lease_seconds=LEASE)
    old.start()
    new.start()
    node = _Node("n1", old)
    try:
        node.leadership.start()
        lease = node.wait_elected()
        node.leadership.reshape(JointBackend([old, new]))
        joint = wait_for(lambda: node.leases("reshaped"), WAIT, 0.01, "the joint lease")[0]
        assert joint.backends == ("memory", "memory-b")
        assert joint.part("memory") == lease  # the claim it held is kept, not taken again
        assert joint.tokens["memory-b"] > lease.token  # each part above the one before
        assert _probe(second).try_acquire("intruder", LossRecorder()) is None

        node.leadership.reshape(new)
        narrowed = wait_for(lambda: node.leases("reshaped")[1:], WAIT, 0.01, "narrowed")[0]
        assert narrowed.backends == ("memory-b",)
        assert _probe(first).try_acquire("next", LossRecorder()) is not None  # given back
        assert node.leadership.leading and "revoked" not in node.kinds()

        assert new.lose_lease()  # the one claim left is lost: the leader steps down
        node.wait_revoked()
    finally:
        node.leadership.stop()
        old.stop()
        new.stop()


def _maintenance_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in threading.enumerate()
            if t.name == "qc-maintenance" and t.is_alive() and t not in before]


def test_a_quick_re_election_never_runs_two_maintenance_threads(
    sqlite_url: str, make_db: DatabaseFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lease is lost while the term's maintenance pass hangs in a backend call, and the
    node wins again at once: the next term waits until that pass has ended, then runs
    one maintenance thread of its own, and the old one never steps it down."""
    monkeypatch.setattr(role, "RECOVERY_INTERVAL", 0.02)
    monkeypatch.setattr(role, "MAINTENANCE_JOIN_SECONDS", 0.2, raising=False)
    db = make_db(sqlite_url, backend="memory")
    gate = threading.Event()  # cleared: a maintenance pass hangs in members() until set
    gate.set()
    hung = threading.Event()

    def members() -> list[MemberInfo]:
        if threading.current_thread().name == "qc-maintenance" and not gate.is_set():
            hung.set()
            gate.wait(WAIT)
        return []

    backend = MemoryBackend(MemoryServer(), lease_seconds=LEASE)
    backend.start()
    leader = role.LeaderRole(
        load_settings_from_mapping({}, "test"), db, members=members, node_id="n1",
        control_uri="PYRO:qcluster.leader.control@127.0.0.1:1", secret=TEST_SECRET,
        revoke=lambda reason: leadership.revoke(reason),
    )
    revoked: list[str] = []

    def on_revoked(reason: str) -> None:
        revoked.append(reason)
        leader.stop()

    leadership = Leadership(
        "n1", plan=lambda: backend, min_token=lambda: 0, halt=leader.halt,
        on_elected=lambda lease: leader.start(lease, backend), on_revoked=on_revoked,
        campaign_interval=0.02,
    )
    before = set(threading.enumerate())
    most = 0
    sampling = threading.Event()

    def sample() -> None:  # the most maintenance threads alive at once, every 2 ms
        nonlocal most
        while not sampling.wait(0.002):
            most = max(most, len(_maintenance_threads(before)))

    sampler = threading.Thread(target=sample, name="test-sampler", daemon=True)
    sampler.start()
    try:
        leadership.start()
        wait_for(lambda: leader.active and _maintenance_threads(before), WAIT, 0.01, "a term")
        first_epoch = leader.epoch
        assert first_epoch is not None
        (old,) = _maintenance_threads(before)
        gate.clear()
        assert hung.wait(WAIT), "the maintenance pass never reached members()"

        assert backend.lose_lease("taken away by the test")
        wait_for(lambda: revoked, WAIT, 0.01, "the step-down")
        time.sleep(0.6)  # campaigns win the free lease again and again meanwhile
        assert _maintenance_threads(before) == [old], "a term started beside the hung pass"
        assert not leader.active  # the next term waits until the old pass has ended

        gate.set()  # the old pass ends: it writes nothing and steps nobody down
        old.join(WAIT)
        assert not old.is_alive()
        wait_for(lambda: leader.active and (leader.epoch or 0) > first_epoch, WAIT, 0.01,
                 "the next term")
        new = wait_for(lambda: _maintenance_threads(before), WAIT, 0.01, "its thread")
        settled = len(revoked)
        time.sleep(0.3)  # a dozen maintenance passes
        assert _maintenance_threads(before) == new and len(new) == 1
        assert len(revoked) == settled and leadership.status == "leader"

        for _ in range(3):  # quick lose/re-win cycles without a hung pass
            epoch = leader.epoch or 0
            assert backend.lose_lease("again")
            wait_for(lambda e=epoch: leader.active and (leader.epoch or 0) > e, WAIT, 0.01,
                     "a re-election")
        time.sleep(0.1)
        assert len(_maintenance_threads(before)) == 1
    finally:
        gate.set()
        leadership.stop()
        backend.stop()
        sampling.set()
        sampler.join(WAIT)
    assert most == 1, f"{most} qc-maintenance threads were alive at once"
    assert _maintenance_threads(before) == []


def test_a_new_term_prunes_at_its_first_maintenance_pass(
    sqlite_url: str, make_db: DatabaseFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pruning old runs does not wait for PRUNE_INTERVAL to pass on the monotonic clock
    (which counts from the host's boot: a leader on a host up for less than the interval
    had pruned nothing)."""
    monkeypatch.setattr(role, "RECOVERY_INTERVAL", 0.02)
    monkeypatch.setattr(role, "PRUNE_INTERVAL", time.monotonic() + 3600.0)
    pruned: list[float] = []
    monkeypatch.setattr(role, "prune_runs",
                        lambda db, epoch, *, older_than: pruned.append(older_than) or 0)
    db = make_db(sqlite_url, backend="memory")
    backend = MemoryBackend(MemoryServer(), lease_seconds=LEASE)
    backend.start()
    leader = role.LeaderRole(
        load_settings_from_mapping({}, "test"), db, members=list, node_id="n1",
        control_uri="PYRO:qcluster.leader.control@127.0.0.1:1", secret=TEST_SECRET,
        revoke=lambda reason: None,
    )
    lease = backend.try_acquire("n1", lambda report: None, 0)
    assert lease is not None
    leader.start(lease, backend)
    try:
        wait_for(lambda: pruned, WAIT, 0.01, "the first prune")
        assert len(pruned) == 1  # then not again within the interval
        time.sleep(0.2)
        assert len(pruned) == 1
    finally:
        leader.stop()
        backend.stop()
