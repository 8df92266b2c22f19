"""A soak under a nemesis (issue 14): 3 scheduler nodes and 2 workers, each in its own
network namespace (tests/cluster/netns.py), one-second jobs, and every few seconds the
leader is killed (SIGKILL, restarted after a moment), paused (SIGSTOP past its lease,
then SIGCONT) or partitioned (from everything, from the database, from its backend or from
its workers, with silent drops, then healed), at random.

    python -m bench.soak --minutes 30                  # dblock on PostgreSQL
    python -m bench.soak --minutes 5 --backend redis --seed 7 --json soak.json

Needs root and iproute2 (network namespaces) and the servers of ``scripts/test.sh``
(private PostgreSQL, ZooKeeper, Redis on lab addresses). At the end it heals every cut,
resumes and restarts every node, waits for the runs to settle, and prints the count of
nemesis events, fires, duplicates (fire times that ran more than once) and unaccounted
fires (no row; a row neither succeeded nor missed; succeeded but never ran; missed but
ran). Exit status 0 only when there are no duplicates and nothing unaccounted.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qcluster.store.cluster import ClusterState
from tests.cluster.harness import records_of
from tests.cluster.netcluster import LAB_BACKENDS, LabServers, NetCluster
from tests.cluster.netns import Lab, lab_problem
from tests.helpers import wait_for

SCHEDULERS = ("s1", "s2", "s3")
WORKERS = ("w1", "w2")
ACTIONS = ("kill", "pause", "isolate", "cut-database", "cut-backend", "cut-workers")


def _start_server(kind: Any, **kwargs: Any) -> Any:
    server = kind(**kwargs)
    return server.start()


def _leader(c: NetCluster, timeout: float = 15.0) -> ClusterState | None:
    """The current leader, if a live node of ours leads (waits up to ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            s = c.state()
            node = c.nodes.get(s.leader_id or "")
            if node is not None and node.running() and s.leader_uri:
                return s
        time.sleep(0.2)
    return None


class Nemesis:
    """One fault at a time on the leader, then its repair."""

    def __init__(self, c: NetCluster, rng: random.Random, hold: tuple[float, float]) -> None:
        self.c, self.rng, self.hold = c, rng, hold
        self.events: collections.Counter[str] = collections.Counter()
        self.no_leader = 0

    def strike(self) -> str | None:
        state = _leader(self.c)
        if state is None or state.leader_id is None:
            self.no_leader += 1
            return None
        victim = state.leader_id
        action = self.rng.choice(ACTIONS)
        if action == "cut-backend" and self.c.backend == "dblock":
            action = "cut-database"  # the dblock lease is in the database
        hold = self.rng.uniform(*self.hold)
        node = self.c.nodes[victim]
        if action == "kill":
            node.kill()
            node.wait()
            time.sleep(self.rng.uniform(0.5, 2.0))
            self.c.start(victim, "scheduler")
        elif action == "pause":
            node.pause()
            time.sleep(hold)
            node.resume()
        else:
            if action == "isolate":
                peers = self.c.lab.everyone_but(self.c.address(victim))
            elif action == "cut-database":
                peers = self.c.database()
            elif action == "cut-backend":
                peers = self.c.coordination()
            else:
                peers = self.c.addresses(list(WORKERS))
            self.c.lab.cut(self.c.address(victim), peers)
            time.sleep(hold)
            self.c.lab.heal()
        self.events[action] += 1
        return f"{action} {victim} (epoch {state.epoch}, {hold:.1f}s)"

    def repair_all(self) -> None:
        self.c.lab.heal()
        for node_id in SCHEDULERS:
            node = self.c.nodes[node_id]
            node.resume()
            if not node.running():
                self.c.start(node_id, "scheduler")


def account(rows: list[Any], records: list[dict[str, Any]], job_ids: list[str],
            start: float, end: float) -> dict[str, Any]:
    """The exactly-once figures over every (job, second) in [start, end]."""
    executed = collections.Counter((r["job_id"], r["scheduled_at"]) for r in records)
    by_key = {(r.job_id, r.scheduled_at): r for r in rows}
    statuses: collections.Counter[str] = collections.Counter()
    fires = duplicates = 0
    unaccounted: list[str] = []
    for job_id in job_ids:
        t = float(int(start))
        while t <= end:
            fires += 1
            ran = executed.get((job_id, t), 0)
            duplicates += ran > 1
            row = by_key.get((job_id, t))
            if row is None:
                unaccounted.append(f"{job_id}@{t}: no row")
            else:
                statuses[row.status] += 1
                if row.status == "succeeded" and ran != 1:
                    unaccounted.append(f"{job_id}@{t}: succeeded, ran {ran} times")
                elif row.status == "missed" and ran:
                    unaccounted.append(f"{job_id}@{t}: missed but ran")
                elif row.status not in ("succeeded", "missed"):
                    unaccounted.append(f"{job_id}@{t}: {row.status}: {row.error}")
            t += 1.0
    return {"fires": fires, "duplicates": duplicates, "unaccounted": len(unaccounted),
            "unaccounted_examples": unaccounted[:10], "statuses": dict(statuses)}


def soak(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qc-soak-")))
        lab = Lab.create()
        stack.callback(lab.close)
        servers = LabServers(lab, _start_server)
        stack.callback(servers.close)
        c = NetCluster(tmp, lab, servers, args.backend)
        stack.callback(c.close)
        for s in SCHEDULERS:
            c.start(s, "scheduler")
        for w in WORKERS:
            c.start(w, "worker")
        c.wait_leader(timeout=60)
        jobs = c.add_second_jobs(args.jobs)
        first = wait_for(lambda: min((r.scheduled_at for r in c.runs()), default=None),
                         timeout=30, what="the first fire")
        assert isinstance(first, float)
        nemesis = Nemesis(c, rng, (args.min_hold, args.max_hold))
        began = time.monotonic()
        deadline = began + args.minutes * 60
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(args.min_gap, args.max_gap))
            done = nemesis.strike()
            if done and args.verbose:
                print(f"{time.monotonic() - began:7.1f}s {done}", flush=True)
        nemesis.repair_all()
        c.wait_leader(timeout=60)
        time.sleep(10)
        end = time.time() - 3
        rows = c.wait_settled(end, timeout=180)
        result = account(rows, records_of(c), jobs, first, end)
        state = c.state()
        return {"backend": args.backend, "minutes": args.minutes, "seed": args.seed,
                "jobs": args.jobs, "events": sum(nemesis.events.values()),
                "by_kind": dict(nemesis.events), "no_leader_to_strike": nemesis.no_leader,
                "final_epoch": state.epoch, "seconds": round(end - first), **result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--backend", choices=LAB_BACKENDS, default="dblock")
    parser.add_argument("--jobs", type=int, default=5, help="one-second jobs")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--min-gap", type=float, default=1.0,
                        help="seconds between a repair and the next fault, at least")
    parser.add_argument("--max-gap", type=float, default=3.0)
    parser.add_argument("--min-hold", type=float, default=2.0,
                        help="seconds a pause or a cut lasts, at least")
    parser.add_argument("--max-hold", type=float, default=5.0)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per event")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(2**31)
    if (problem := lab_problem()) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    result = soak(args)
    print(f"soak {result['minutes']:g} min on {result['backend']} (seed {result['seed']}): "
          f"{result['events']} nemesis events {result['by_kind']}, {result['fires']} fires "
          f"over {result['seconds']}s, {result['duplicates']} duplicates, "
          f"{result['unaccounted']} unaccounted; statuses {result['statuses']}; "
          f"final epoch {result['final_epoch']}")
    for example in result["unaccounted_examples"]:
        print(f"  unaccounted: {example}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["duplicates"] == 0 and result["unaccounted"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
