"""Partitions with real processes, each node in its own network namespace, links cut with
silent drops (tests/cluster/netns.py), on dblock, ZooKeeper and Redis. Each scenario
checks exactly-once: every fire time of every job ran once, or is a ``missed`` row (issue
14, "Partitions, in our own tests").

Every cut here is held 15 s, longer than any lease (2 s), ZooKeeper session (3 s),
database silence (3 s) and member timeout (3 s) of the test settings.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from qcluster.store.cluster import ClusterState
from tests.cluster.harness import check_exactly_once, records_of
from tests.cluster.netcluster import LAB_BACKENDS, NetCluster
from tests.helpers import run_cli, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

MakeCluster = Callable[..., NetCluster]

CUT_SECONDS = 15.0
#: The leader must have resigned, and another node taken over, this long after a cut:
#: within the cut, not after the heal (the issue measured 2-12 s).
TAKEOVER_SECONDS = 14.0
#: A worker cut from the database: longer than the member timeout (3 s) and a recovery
#: pass (1 s), shorter than CUT_SECONDS to keep the suite short.
WORKER_CUT_SECONDS = 8.0


def _start(c: NetCluster, jobs: int = 3, workers: tuple[str, ...] = ("w1", "w2")
           ) -> tuple[ClusterState, list[str], float]:
    """Two scheduler nodes and ``workers``, ``jobs`` one-second jobs, three seconds into
    their runs: (the leader's state, the job ids, the first fire time)."""
    for s in ("s1", "s2"):
        c.start(s, "scheduler")
    for w in workers:
        c.start(w, "worker")
    leader = c.wait_leader()
    ids = c.add_second_jobs(jobs)
    first = wait_for(lambda: min((r.scheduled_at for r in c.runs()), default=None),
                     timeout=30, what="the first fire")
    assert isinstance(first, float)
    wait_for(lambda: len(records_of(c)) >= jobs, timeout=20, what="the first runs",
             details=c.leader_logs)
    time.sleep(2)
    assert leader.leader_id is not None
    return leader, ids, first


def _newer_leader(c: NetCluster, old: ClusterState) -> ClusterState | None:
    """The cluster row if another live node leads at a newer epoch now, else None."""
    try:
        s = c.state()
    except Exception:
        return None
    node = c.nodes.get(s.leader_id or "")
    if (s.epoch > old.epoch and s.leader_id not in (None, old.leader_id)
            and node is not None and node.running()):
        return s
    return None


def _watch_takeover(c: NetCluster, old: ClusterState, cut_at: float,
                    until: float) -> tuple[ClusterState | None, float | None]:
    """Poll until ``until`` (time.time()) for a newer leader: (its state, seconds after
    the cut), or (None, None)."""
    while time.time() < until:
        found = _newer_leader(c, old)
        if found is not None:
            return found, time.time() - cut_at
        time.sleep(0.2)
    return None, None


def _resigned_after(c: NetCluster, node_id: str, offset: int) -> bool:
    return "stepping down" in c.nodes[node_id].log()[offset:]


def _finish(c: NetCluster, jobs: list[str], first: float, old: ClusterState,
            new: ClusterState | None) -> dict[str, int]:
    """Exactly-once of ``jobs`` up to two seconds ago, and no row committed at the old
    epoch after the new leader took its epoch."""
    time.sleep(4)
    end = time.time() - 2
    rows = c.wait_settled(end)
    ticks = [r for r in records_of(c) if r["job_id"] in jobs]
    statuses = check_exactly_once(rows, ticks, jobs, first, end)
    assert statuses["succeeded"] > 0
    if new is not None and new.leader_since is not None:
        late = [(r.job_id, r.scheduled_at, r.created_at) for r in rows
                if r.epoch == old.epoch and r.created_at > new.leader_since]
        assert late == [], f"rows committed at the stale epoch {old.epoch}: {late[:5]}"
    return dict(statuses)


def _leader_cut(c: NetCluster, peers: Callable[[str], list[str]], what: str
                ) -> dict[str, Any]:
    """The leader cut from ``peers(leader)`` for CUT_SECONDS: it must resign and another
    node take over within TAKEOVER_SECONDS; then heal and check exactly-once."""
    old, jobs, first = _start(c)
    assert old.leader_id is not None
    offset = len(c.nodes[old.leader_id].log())
    cut_at = time.time()
    c.lab.cut(c.address(old.leader_id), peers(old.leader_id))
    new, took = _watch_takeover(c, old, cut_at, cut_at + CUT_SECONDS)
    resigned = _resigned_after(c, old.leader_id, offset)
    time.sleep(max(0.0, cut_at + CUT_SECONDS - time.time()))
    c.lab.heal()
    if new is None:  # for the report: when did anyone take over after the heal?
        new, _ = _watch_takeover(c, old, cut_at, time.time() + 30)
    statuses = _finish(c, jobs, first, old, new)
    print(f"{what} on {c.backend}: resigned={resigned}, takeover after {took}s, "
          f"statuses {statuses}")
    assert resigned, (f"the leader {old.leader_id} did not step down while cut off\n"
                      f"{c.nodes[old.leader_id].log_tail()}")
    assert took is not None and took <= TAKEOVER_SECONDS, (
        f"no other node took over within {TAKEOVER_SECONDS}s of the cut (took {took})\n"
        f"{c.leader_logs()}")
    return {"took": took, **statuses}


@pytest.mark.parametrize("backend", LAB_BACKENDS)
def test_leader_cut_from_the_database_resigns_and_another_node_leads(
    make_net_cluster: MakeCluster, backend: str
) -> None:
    """The original design: "a leader that cannot reach the database steps down". On
    dblock the lease is in the database too; on ZooKeeper and Redis the leader still holds
    its lease and must give it up."""
    c = make_net_cluster(backend)
    _leader_cut(c, lambda leader: c.database(), "leader cut from the database")


@pytest.mark.parametrize("backend", ["zookeeper", "redis"])
def test_leader_cut_from_its_coordination_backend_resigns(
    make_net_cluster: MakeCluster, backend: str
) -> None:
    """The leader still reaches the database and its workers, not ZooKeeper (or any Redis
    master). dblock has no separate backend: the database test covers it."""
    c = make_net_cluster(backend)
    _leader_cut(c, lambda leader: c.coordination(), "leader cut from its backend")


@pytest.mark.parametrize("backend", LAB_BACKENDS)
def test_isolated_leader_healed_after_15s_never_commits_at_its_old_epoch(
    make_net_cluster: MakeCluster, backend: str
) -> None:
    c = make_net_cluster(backend)
    _leader_cut(c, lambda leader: c.lab.everyone_but(c.address(leader)), "isolated leader")


@pytest.mark.parametrize("backend", LAB_BACKENDS)
def test_leader_cut_from_its_workers_loses_no_fire_and_runs_none_twice(
    make_net_cluster: MakeCluster, backend: str
) -> None:
    """Runs recorded while no worker answers are sent after the heal (they are within the
    misfire grace) or recorded missed; a submit whose reply was lost is not run again."""
    c = make_net_cluster(backend)
    old, jobs, first = _start(c)
    assert old.leader_id is not None
    c.lab.cut(c.address(old.leader_id), c.addresses(["w1", "w2"]))
    time.sleep(CUT_SECONDS)
    c.lab.heal()
    new = _newer_leader(c, old)
    statuses = _finish(c, jobs, first, old, new)
    late = [r for r in c.runs() if r.status == "succeeded"
            and r.started_at is not None and r.started_at - r.scheduled_at > 2]
    print(f"leader cut from its workers on {backend}: statuses {statuses}, "
          f"{len(late)} runs started more than 2 s late, "
          f"leader {c.state().leader_id} at epoch {c.state().epoch} (was {old.epoch})")


def _long_run(c: NetCluster, sleep: float, recover: bool) -> str:
    """Add and run now a ``long`` job (``sleep`` s, ``--recover`` if asked); wait for its
    run to start: the worker running it."""
    flags = ["--recover"] if recover else []
    run_cli("jobs", "add", "long", "--func", "jobs.examples:record_run", "--every", "1h",
            "--kwarg", f"path={c.records}", "--kwarg", f"sleep={sleep:g}", *flags,
            config=c.config)
    run_cli("jobs", "run", "long", config=c.config)
    started = wait_for(lambda: [r for r in records_of(c) if r["job_id"] == "long"],
                       timeout=30, what="the long run to start")
    return str(started[0]["worker"])


def _long_run_row(c: NetCluster) -> Any:
    rows = [r for r in c.runs() if r.job_id == "long"]
    return rows[0] if rows else None


#: Ticks scheduled this long after a worker's database cut starts must start on time
#: (issue 14 point 12): the member timeout (3 s) and a recovery pass.
SETTLE_SECONDS = 4.0
#: How late a tick may start during a worker's cut (the issue saw 10-25 s).
TICK_LATENESS = 2.0


@pytest.mark.parametrize("backend,recover", [
    ("zookeeper", True), ("redis", False),
    *([("dblock", True), ("dblock", False), ("zookeeper", False), ("redis", True)]
      if os.environ.get("QCLUSTER_LAB_ALL_BACKENDS") else []),
])
def test_worker_cut_from_the_database_mid_run_runs_it_once_and_records_it(
    make_net_cluster: MakeCluster, backend: str, recover: bool
) -> None:
    """A worker loses the database (only) while it runs a 4 s job, for 8 s: it finishes
    the run but cannot write the outcome. The run must end ``succeeded`` at attempt 1,
    and run once, with ``--recover`` or without (issue 14 point 10: "a run is re-attempted
    only when its worker is known to have stopped running it"): the leader, which can
    still reach the worker, asks it and records the outcome it reports. Meanwhile the
    one-second jobs stay exactly-once, and start on time on the other worker (point 12:
    a worker cut from the database is not sent runs, on ZooKeeper and Redis too, where
    the backend still lists it). The suite runs one backend per variant (the worker's cut
    is the same on every backend: its database session); QCLUSTER_LAB_ALL_BACKENDS=1
    runs all six."""
    c = make_net_cluster(backend)
    old, jobs, first = _start(c, jobs=2)
    victim = _long_run(c, 4, recover)
    cut_at = time.time()
    c.lab.cut(c.address(victim), c.database())
    time.sleep(WORKER_CUT_SECONDS)
    during = _long_run_row(c)
    healed_at = time.time()
    c.lab.heal()
    wait_for(lambda: (r := _long_run_row(c)) is not None
             and r.status in ("succeeded", "failed", "lost") and r,
             timeout=30, what="the long run to end", details=c.leader_logs)
    time.sleep(5)  # a second attempt, if any, has had time to run
    row = _long_run_row(c)
    ran = [(r["attempt"], r["worker"]) for r in records_of(c) if r["job_id"] == "long"]
    ticks = [r for r in records_of(c) if r["job_id"] != "long"
             and cut_at + SETTLE_SECONDS <= r["scheduled_at"] <= healed_at]
    late = sorted((round(r["started"] - r["scheduled_at"], 2), r["worker"]) for r in ticks
                  if r["started"] - r["scheduled_at"] > TICK_LATENESS)
    print(f"{backend} recover={recover}: during the cut {during.status}/{during.attempt}, "
          f"final {row.status}/{row.attempt} ({row.error}), ran {ran}; {len(ticks)} ticks "
          f"in the cut, {len(late)} late {late[:5]}, on {sorted({r['worker'] for r in ticks})}")
    assert len(ran) == 1, (f"the long run ran {len(ran)} times: {ran} (row {row.status}, "
                           f"attempt {row.attempt}: {row.error})")
    assert (row.status, row.attempt) == ("succeeded", 1), (
        f"the long run ran once on {victim} but ended {row.status} at attempt "
        f"{row.attempt}: {row.error}")
    assert len(ticks) >= len(jobs) * (WORKER_CUT_SECONDS - SETTLE_SECONDS - 1), ticks
    assert late == [], f"ticks started more than {TICK_LATENESS}s late during the cut: {late}"
    assert victim not in {r["worker"] for r in ticks}, "the cut-off worker was sent runs"
    statuses = _finish(c, jobs, first, old, _newer_leader(c, old))
    print(f"ticks: {statuses}")


def test_worker_cut_off_from_everything_with_a_recover_run_ends_itself_before_a_retry(
    make_net_cluster: MakeCluster
) -> None:
    """A worker isolated from the database and every leader while a ``--recover`` job
    runs: no one can tell whether it still runs it. It must end its own process when its
    claim lease runs out (exit status 75, the self-fence of docs/DESIGN.md invariant 7),
    and only then may the leader make attempt 2, on the other worker: the two attempts
    never run at once. On dblock (the worker's side is the same on every backend)."""
    c = make_net_cluster("dblock")
    old, jobs, first = _start(c, jobs=1)
    victim = _long_run(c, 30, recover=True)
    cut_at = time.time()
    c.lab.isolate(c.address(victim))
    node = c.nodes[victim]
    ended = wait_for(lambda: not node.running() and time.time(), timeout=30, interval=0.05,
                     what=f"{victim} to end itself", details=lambda: node.log_tail())
    assert isinstance(ended, float)
    status = node.wait()
    again = wait_for(lambda: [r for r in records_of(c)
                              if r["job_id"] == "long" and r["attempt"] == 2],
                     timeout=40, what="attempt 2", details=c.leader_logs)
    c.lab.heal()
    print(f"self-fence: {victim} ended {ended - cut_at:.1f}s after the cut (status {status}); "
          f"attempt 2 started {again[0]['started'] - cut_at:.1f}s after, on "
          f"{again[0]['worker']}")
    assert status == 75, f"{victim} exited {status}, not the self-fence's 75"
    assert "self-fencing" in node.log()
    assert again[0]["worker"] != victim
    assert again[0]["started"] > ended, "attempt 2 started before attempt 1's worker ended"
    statuses = _finish(c, jobs, first, old, _newer_leader(c, old))
    print(f"ticks: {statuses}")




@pytest.mark.parametrize("backend", LAB_BACKENDS)
def test_leader_cut_while_its_transaction_waits_on_a_lock_is_replaced_within_the_cut(
    make_net_cluster: MakeCluster, backend: str
) -> None:
    """A cut that lands while the leader's transaction is open and waiting on a lock: the
    test holds the cluster row FOR UPDATE until the leader's fenced pass waits for it,
    cuts the leader from the database, then commits, so that the leader's dead session
    gets the lock with its transaction open. Another node must still lead within
    TAKEOVER_SECONDS, and every fire stay exactly-once. (Issue 14, point 9: before the
    session timeouts of settings/timeouts.py, the next leader came 13 s after the heal of a
    15 s cut on ZooKeeper and Redis, and on dblock none led within 55 s.)"""
    c = make_net_cluster(backend)
    old, jobs, first = _start(c)
    assert old.leader_id is not None
    leader_ip = c.address(old.leader_id)
    engine = sa.create_engine(c.url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as blocker:
            blocker.execute(sa.text("SELECT epoch FROM qc_cluster WHERE id = 1 FOR UPDATE"))
            wait_for(lambda: c.waiting_on_a_lock(leader_ip), timeout=5, interval=0.05,
                     what="a session of the leader to wait on the cluster row's lock")
            cut_at = time.time()
            c.lab.cut(leader_ip, c.database())
            time.sleep(0.3)
            blocker.commit()
    finally:
        engine.dispose()
    new, took = _watch_takeover(c, old, cut_at, cut_at + CUT_SECONDS)
    time.sleep(max(0.0, cut_at + CUT_SECONDS - time.time()))
    c.lab.heal()
    after, took_after = (new, took) if new is not None else _watch_takeover(
        c, old, cut_at, time.time() + 40)
    statuses = _finish(c, jobs, first, old, after)
    print(f"{backend}: takeover after {took}s during the cut, {took_after}s in all; "
          f"statuses {statuses}")
    assert took is not None and took <= TAKEOVER_SECONDS, (
        f"no other node took over within {TAKEOVER_SECONDS}s of the cut (first leader "
        f"{took_after}s after the cut, {CUT_SECONDS}s cut)")


@pytest.mark.parametrize("backend,recover", [("dblock", True), ("zookeeper", False)])
def test_worker_cut_while_its_outcome_write_waits_on_a_lock_records_the_run_once(
    make_net_cluster: MakeCluster, backend: str, recover: bool
) -> None:
    """A cut that lands while a worker's transaction is open and waiting on a lock: the
    test holds the long run's row FOR UPDATE when its job ends, so that the worker's
    outcome write waits; then it cuts the worker from the database and lets go, so that
    the worker's dead session takes the row lock with its transaction open (until the
    server's idle-in-transaction timeout ends it). The run must still run once and end
    ``succeeded`` at attempt 1 (the worker reports the outcome whose write hung), the
    leader must keep leading (its recovery pass waits on that lock at most its lock
    timeout), and the ticks stay exactly-once. With and without ``--recover``."""
    c = make_net_cluster(backend)
    old, jobs, first = _start(c, jobs=2)
    victim = _long_run(c, 3, recover)
    worker_ip = c.address(victim)
    engine = sa.create_engine(c.url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as blocker:
            blocker.execute(sa.text("SELECT id FROM qc_runs WHERE job_id = 'long' FOR UPDATE"))
            wait_for(lambda: c.waiting_on_a_lock(worker_ip), timeout=15, interval=0.05,
                     what="the worker's outcome write to wait on the run's lock")
            c.lab.cut(worker_ip, c.database())
            time.sleep(0.3)
            blocker.commit()
    finally:
        engine.dispose()
    time.sleep(WORKER_CUT_SECONDS)
    c.lab.heal()
    wait_for(lambda: (r := _long_run_row(c)) is not None
             and r.status in ("succeeded", "failed", "lost") and r,
             timeout=30, what="the long run to end", details=c.leader_logs)
    time.sleep(5)  # a second attempt, if any, has had time to run
    row = _long_run_row(c)
    ran = [(r["attempt"], r["worker"]) for r in records_of(c) if r["job_id"] == "long"]
    now = c.state()
    print(f"{backend} recover={recover}: final {row.status}/{row.attempt} ({row.error}), "
          f"ran {ran}; leader {old.leader_id}@{old.epoch} -> {now.leader_id}@{now.epoch}")
    assert len(ran) == 1, f"the long run ran {len(ran)} times: {ran} ({row.error})"
    assert (row.status, row.attempt) == ("succeeded", 1), (
        f"the long run ended {row.status} at attempt {row.attempt}: {row.error}")
    assert (now.leader_id, now.epoch) == (old.leader_id, old.epoch), (
        "the leader stepped down over a dead worker session's lock\n" + c.leader_logs())
    statuses = _finish(c, jobs, first, old, None)
    print(f"ticks: {statuses}")
