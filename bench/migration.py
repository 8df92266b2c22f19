"""A live backend migration under load: how long the move takes, and how it shows in the
schedule (the longest gap between two starts of a one-second job, the latest start).

    python -m bench.migration --to zookeeper --trials 3
    python -m bench.migration --to redis --jobs 50

Three scheduler nodes and two workers run as real ``qcluster start`` processes on a
private PostgreSQL (and ZooKeeper or Redis) started with the test harness
(``tests/servers``), or on the servers given. ``--jobs`` one-second jobs record each
start. Each trial runs ``qcluster backend migrate --to TARGET`` and then ``--to dblock``,
and measures each move from the command's start to its end ("move"), the longest gap
between two starts of one job in the seconds around the move, and the largest lateness
(start minus scheduled time). At the end every (job, second) is checked: ran once, or
recorded missed. Prints one line per move and a JSON summary (``--json PATH`` writes it).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qcluster.store.cluster import read_cluster
from qcluster.store.db import Database
from tests.cluster.harness import Cluster, check_exactly_once, records_of
from tests.helpers import run_cli, wait_for, write_config


def _servers(args: argparse.Namespace, stack: contextlib.ExitStack) -> tuple[str, dict[str, Any]]:
    from tests.servers import PostgresServer, RedisServer, ZooKeeperServer

    db_url = args.db_url
    if db_url is None:
        db_url = stack.enter_context(PostgresServer()).create_database("bench")
    coordination: dict[str, Any] = {"backend": "dblock", "dblock": {"lease_seconds": 2.0}}
    if args.to == "zookeeper":
        hosts = args.zk_hosts.split(",") if args.zk_hosts else [
            stack.enter_context(ZooKeeperServer()).hosts]
        coordination["zookeeper"] = {"hosts": hosts, "session_timeout": 3.0,
                                     "chroot": f"/bench-{int(time.time())}"}
    else:
        urls = args.redis_urls.split(",") if args.redis_urls else [
            stack.enter_context(RedisServer()).url for _ in range(3)]
        coordination["redis"] = {"urls": urls, "lease_seconds": 2.0,
                                 "key_prefix": f"bench{int(time.time())}"}
    return db_url, coordination


def _move(config: Path, to: str) -> float:
    began = time.time()
    run_cli("backend", "migrate", "--to", to, "--timeout", "120", config=config, timeout=180)
    return time.time() - began


def _window(records: list[dict[str, Any]], start: float, end: float) -> tuple[float, float]:
    """(longest gap between two starts of one job, largest lateness) for starts in
    [start, end]."""
    starts: dict[str, list[float]] = collections.defaultdict(list)
    late = 0.0
    for r in records:
        if start <= r["started"] <= end:
            starts[r["job_id"]].append(r["started"])
            late = max(late, r["started"] - r["scheduled_at"])
    gaps = [b - a for s in starts.values() for a, b in zip(sorted(s), sorted(s)[1:],
                                                            strict=False)]
    return max(gaps, default=0.0), late


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.migration", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--to", choices=["zookeeper", "redis"], default="zookeeper")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--jobs", type=int, default=20)
    p.add_argument("--db-url")
    p.add_argument("--zk-hosts")
    p.add_argument("--redis-urls")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    moves: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qc-bench-")))
        db_url, coordination = _servers(args, stack)
        config = write_config(tmp, db_url, coordination=coordination)
        run_cli("db", "upgrade", config=config)
        c = Cluster(tmp, config, db_url)
        stack.callback(c.close)
        for node_id in ("s1", "s2", "s3"):
            c.start(node_id, "scheduler")
        for node_id in ("w1", "w2"):
            c.start(node_id, "worker")
        c.wait_leader(timeout=60)
        jobs = c.add_second_jobs(args.jobs)
        first = wait_for(lambda: min((r.scheduled_at for r in c.runs()), default=None),
                         timeout=60, what="the first fire")
        assert isinstance(first, float)
        time.sleep(5)
        for trial in range(args.trials):
            for to in (args.to, "dblock"):
                began = time.time()
                seconds = _move(config, to)
                time.sleep(3)
                gap, late = _window(records_of(c), began - 2, time.time())
                moves.append({"to": to, "seconds": seconds, "gap": gap, "late": late})
                print(f"trial {trial + 1}: to {to} in {seconds:.2f}s; longest gap between two "
                      f"starts of a 1 s job {gap:.2f}s, latest start {late * 1000:.0f} ms",
                      flush=True)
        time.sleep(3)
        end = time.time() - 3
        rows = c.wait_settled(end, timeout=120)
        statuses = check_exactly_once(rows, records_of(c), jobs, first, end)
        db = Database(db_url)
        state = read_cluster(db)
        db.dispose()
    summary = {
        "to": args.to, "trials": args.trials, "jobs": args.jobs,
        "move_median_s": round(statistics.median(m["seconds"] for m in moves), 2),
        "move_max_s": round(max(m["seconds"] for m in moves), 2),
        "longest_gap_s": round(max(m["gap"] for m in moves), 2),
        "latest_start_ms": round(max(m["late"] for m in moves) * 1000),
        "statuses": dict(statuses),
        "final_epoch": state.epoch if state else None,
    }
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
