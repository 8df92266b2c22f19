"""A scheduler node whose wall clock runs 5 s ahead or behind (libfaketime) leads, hands
over to a node with a true clock, and takes the lead back (issue 14, "Clock skew"): no
duplicate, no fire lost, no job started before its time by the workers' clocks.

The workers and the other scheduler keep the true clock; only the skewed node's process
runs under ``LD_PRELOAD=libfaketime.so.1`` with ``FAKETIME=+5s`` (or ``-5s``) and
``FAKETIME_DONT_FAKE_MONOTONIC=1``: its leases, deadlines and waits, which use the
monotonic clock, are real, as on a machine whose NTP is off.

The leader judges what is due, late, missed and coalesced on the database's clock
(``qcluster/leader/clock.py``, docs/DESIGN.md invariant 8), so the skewed leader fires as
the true one does: no fire is recorded missed outside a hand-over, none starts late, and it
warns once that its wall clock is off.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qcluster.store.cluster import ClusterState
from tests.cluster.harness import check_exactly_once, records_of
from tests.cluster.netcluster import NetCluster
from tests.conftest import unavailable
from tests.helpers import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

MakeCluster = Callable[..., NetCluster]

#: Debian's libfaketime (package faketime); $QCLUSTER_LIBFAKETIME names another.
LIBFAKETIME_GLOB = "/usr/lib/*/faketime/libfaketime.so.1"
SKEW = 5.0
#: How long each leader leads before it hands over: longer than the skew, so that what a
#: leader that judged on its own clock would get wrong (the fires of ``SKEW`` seconds
#: after or before a hand-over, coalesced) falls inside a checked term.
TERM_SECONDS = 6.0
#: A fire recorded missed within this much of a hand-over's gap is the gap's own
#: (coalesced by design); any other missed fire is a lost one.
GAP_SLACK = 1.0
#: Runs outside a gap start at most this late (worker clock against scheduled time): below
#: SKEW, so a leader that fired on its own clock is caught, with room for a loaded machine
#: (2.0 s was passed by 0.08 s with four test processes on two cores).
MAX_LATENESS = 3.0


def faketime_env(offset: str) -> dict[str, str]:
    """The environment that shifts a process's wall clock by ``offset`` ("+5s")."""
    env = os.environ.get("QCLUSTER_LIBFAKETIME")
    found = [Path(env)] if env else sorted(Path("/").glob(LIBFAKETIME_GLOB.lstrip("/")))
    lib = found[0] if found else Path(LIBFAKETIME_GLOB)
    if not lib.is_file():
        unavailable(f"libfaketime not found at {lib}: install the 'faketime' package")
    return {"LD_PRELOAD": str(lib), "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


_PROBE = """
import threading, time
seen = []
t = threading.Thread(target=lambda: seen.append(time.time())); t.start(); t.join()
t0 = time.monotonic(); threading.Event().wait(0.3)
print(time.time(), seen[0], time.monotonic() - t0)
"""


@pytest.mark.parametrize("offset", [SKEW, -SKEW], ids=["ahead", "behind"])
def test_libfaketime_shifts_wall_time_in_every_thread_not_the_monotonic_clock(
    offset: float
) -> None:
    env = {**os.environ, **faketime_env(f"{offset:+g}s")}
    before = time.time()
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                         text=True, check=True, timeout=30).stdout.split()
    after = time.time()
    main, thread, waited = (float(x) for x in out)
    for shown in (main, thread):
        assert before + offset - 0.5 <= shown <= after + offset + 0.5, (shown, before, after)
    assert 0.25 <= waited <= 1.0, f"a 0.3 s wait on the monotonic clock took {waited}s"


def _leader_now(c: NetCluster, node_id: str, after_epoch: int) -> tuple[ClusterState, float]:
    """Wait for ``node_id`` to lead at an epoch above ``after_epoch``; (state, when seen)."""
    def ready() -> ClusterState | None:
        s = c.state()
        return s if s.leader_id == node_id and s.epoch > after_epoch else None

    found = wait_for(ready, timeout=30, what=f"{node_id} to lead", details=c.leader_logs)
    assert isinstance(found, ClusterState)
    return found, time.time()


def _hand_over(c: NetCluster, leader: str, to: str, state: ClusterState,
               restart: Callable[[], Any]) -> tuple[ClusterState, tuple[float, float]]:
    """SIGTERM ``leader`` (it steps down and releases its lease), wait for ``to`` to lead,
    restart ``leader`` as a follower: (the new state, the gap's window on the true clock)."""
    stopped_at = time.time()
    c.nodes[leader].terminate()
    new, seen = _leader_now(c, to, state.epoch)
    c.nodes[leader].wait()
    restart()
    return new, (stopped_at - GAP_SLACK, seen + GAP_SLACK)


@pytest.mark.parametrize("offset", [SKEW, -SKEW], ids=["ahead", "behind"])
@pytest.mark.parametrize("backend", ["dblock"])
def test_skewed_scheduler_leads_hands_over_and_back_without_duplicate_loss_or_early_run(
    make_net_cluster: MakeCluster, backend: str, offset: float
) -> None:
    c = make_net_cluster(backend)
    skewed = faketime_env(f"{offset:+g}s")

    def start_skewed() -> Any:
        return c.start("skewed", "scheduler", env=skewed)

    start_skewed()
    first_state, _ = _leader_now(c, "skewed", 0)
    c.start("true", "scheduler")
    for w in ("w1", "w2"):
        c.start(w, "worker")
    jobs = c.add_second_jobs(3)
    first = wait_for(lambda: min((r.scheduled_at for r in c.runs()), default=None),
                     timeout=30, what="the first fire")
    assert isinstance(first, float)
    time.sleep(TERM_SECONDS)
    state, gap1 = _hand_over(c, "skewed", "true", first_state, start_skewed)
    time.sleep(TERM_SECONDS)
    state, gap2 = _hand_over(c, "true", "skewed", state,
                             lambda: c.start("true", "scheduler"))
    # Long enough that the checked window (which ends 2 s ago) covers a whole term of the
    # skewed leader after it took the lead back.
    time.sleep(TERM_SECONDS + 2)
    # Every leader, skewed or not, has recorded the fires due by the database's clock.
    end = time.time() - 2
    rows = c.wait_settled(end)
    records = records_of(c)
    statuses = check_exactly_once(rows, records, jobs, first, end)

    gaps = (gap1, gap2)

    def in_gap(t: float) -> bool:
        return any(lo <= t <= hi for lo, hi in gaps)

    lost = sorted((r.job_id, r.scheduled_at, r.error) for r in rows
                  if r.status == "missed" and r.scheduled_at <= end
                  and not in_gap(r.scheduled_at))
    early = [r for r in records if r["started"] < r["scheduled_at"] - 0.005]
    late = sorted((round(r["started"] - r["scheduled_at"], 2), r["job_id"], r["scheduled_at"])
                  for r in records if r["scheduled_at"] <= end and not in_gap(r["scheduled_at"])
                  and r["started"] - r["scheduled_at"] > MAX_LATENESS)
    print(f"skew {offset:+g}s on {backend}: {statuses}; first fire {first}, gaps {gaps}, "
          f"end {end}; lost {len(lost)} "
          f"{lost[:6]}; early {len(early)}; late {len(late)} {late[:6]}")
    assert early == [], f"runs started before their time by the worker's clock: {early[:3]}"
    assert lost == [], f"fires recorded missed outside a hand-over: {lost[:6]}"
    assert late == [], f"runs started more than {MAX_LATENESS}s late: {late[:6]}"
    log = c.nodes["skewed"].log()
    assert "wall clock is" in log and ("ahead of" if offset > 0 else "behind") in log, \
        "the skewed leader did not warn that its wall clock is off the database's"
