"""Failover time: from SIGKILL (or SIGTERM) of the leader to the moment the next leader
takes its epoch, and to the first fire it records, on each backend.

The fire time includes waiting for the next whole second of the 1 s job when nothing
was missed; the leader time does not.

    python -m bench.failover --backend dblock --trials 5
    python -m bench.failover --backend zookeeper --signal TERM --db-url postgresql://...

Without ``--db-url`` / ``--zk-hosts`` / ``--redis-urls`` it starts private servers on
loopback with the test harness (``tests/servers``), so it needs the Debian packages that
``scripts/test.sh`` installs. Two scheduler nodes and one worker run as real
``qcluster start`` processes; a job fires every second. Each trial kills the leader and
waits for the first run row written at a newer epoch; the killed node is restarted as a
follower before the next trial. Prints one line per trial and a summary, and writes JSON
with ``--json PATH``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from qcluster.store import schema
from qcluster.store.cluster import read_cluster
from qcluster.store.db import Database
from tests.helpers import run_cli, start_node, wait_for, write_config


def _servers(args: argparse.Namespace, stack: contextlib.ExitStack, tmp: Path) -> dict[str, Any]:
    from tests.servers import PostgresServer, RedisServer, ZooKeeperServer

    coordination: dict[str, Any] = {"backend": args.backend}
    db_url = args.db_url
    if db_url is None:
        pg = stack.enter_context(PostgresServer())
        db_url = pg.create_database("bench")
    if args.backend == "zookeeper":
        hosts = args.zk_hosts.split(",") if args.zk_hosts else None
        if hosts is None:
            zk = stack.enter_context(ZooKeeperServer())
            hosts = [zk.hosts]
        coordination["zookeeper"] = {"hosts": hosts, "session_timeout": args.session_timeout,
                                     "chroot": f"/bench-{int(time.time())}"}
    if args.backend == "redis":
        urls = args.redis_urls.split(",") if args.redis_urls else None
        if urls is None:
            urls = []
            for _ in range(3):
                r = stack.enter_context(RedisServer())
                urls.append(r.url)
        coordination["redis"] = {"urls": urls, "lease_seconds": args.lease,
                                 "key_prefix": f"bench{int(time.time())}"}
    if args.backend == "dblock":
        coordination["dblock"] = {"lease_seconds": args.lease}
    return {"db_url": db_url, "coordination": coordination}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.failover", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["dblock", "zookeeper", "redis"], default="dblock")
    p.add_argument("--signal", choices=["KILL", "TERM"], default="KILL")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--lease", type=float, default=2.0, help="dblock/redis lease seconds")
    p.add_argument("--session-timeout", type=float, default=3.0, help="ZooKeeper session")
    p.add_argument("--db-url")
    p.add_argument("--zk-hosts")
    p.add_argument("--redis-urls")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    sig = signal.SIGKILL if args.signal == "KILL" else signal.SIGTERM

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qc-bench-")))
        env = _servers(args, stack, tmp)
        config = write_config(tmp, env["db_url"], coordination=env["coordination"])
        run_cli("db", "upgrade", config=config)
        db = Database(env["db_url"])
        stack.callback(db.dispose)
        nodes = {}
        for node_id, role in (("s1", "scheduler"), ("s2", "scheduler"), ("w1", "worker")):
            nodes[node_id] = stack.enter_context(
                start_node(config, node_id=node_id, role=role, log_path=tmp / f"{node_id}.log"))
        run_cli("jobs", "add", "tick", "--func", "jobs.builtin:noop", "--every", "1s",
                config=config)
        results: list[float] = []
        leads: list[float] = []
        for trial in range(args.trials):
            state = wait_for(lambda: _leading(db, nodes), timeout=60, what="a leader")
            time.sleep(3)  # let the leader settle into its steady state
            killed_at = time.time()
            nodes[state.leader_id].send_signal(sig)
            found = wait_for(functools.partial(_first_fire_after, db, state.epoch),
                             timeout=60, what="the next leader's first fire")
            assert isinstance(found, float)
            first = found
            new = read_cluster(db)
            assert new is not None and new.leader_since is not None
            took = first - killed_at
            results.append(took)
            leads.append(new.leader_since - killed_at)
            print(f"trial {trial + 1}: {args.signal} {state.leader_id} -> {new.leader_id} leads "
                  f"after {leads[-1] * 1000:.0f} ms, fires after {took * 1000:.0f} ms",
                  flush=True)
            nodes[state.leader_id].wait()
            nodes[state.leader_id] = stack.enter_context(start_node(
                config, node_id=state.leader_id, role="scheduler",
                log_path=tmp / f"{state.leader_id}.{trial}.log"))
        summary = {
            "backend": args.backend, "signal": args.signal, "trials": len(results),
            "lease_seconds": args.lease, "session_timeout": args.session_timeout,
            "leader_median_ms": round(statistics.median(leads) * 1000),
            "leader_max_ms": round(max(leads) * 1000),
            "fire_median_ms": round(statistics.median(results) * 1000),
            "fire_max_ms": round(max(results) * 1000), "fire_min_ms": round(min(results) * 1000),
        }
        print(json.dumps(summary))
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2))
    return 0


def _leading(db: Database, nodes: dict[str, Any]) -> Any:
    state = read_cluster(db)
    if state and state.leader_id in nodes and nodes[state.leader_id].running() \
            and state.leader_uri:
        return state
    return None


def _first_fire_after(db: Database, epoch: int) -> float | None:
    r = schema.runs
    with db.read() as conn:
        value = conn.execute(sa.select(sa.func.min(r.c.created_at)).where(r.c.epoch > epoch))
        return value.scalar()


if __name__ == "__main__":
    sys.exit(main())
