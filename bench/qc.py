"""qcluster's side of the benchmark: a real cluster of ``qcluster start`` processes, and
fast direct access to its tables.

The cluster is two scheduler nodes (one leads, the other stands by for the failover
scenarios) and two worker nodes, on a config written here: the product defaults, except
the RPC secret, the allow list (which names ``jobs.examples:record_run``, allowed only by
name), the worker's concurrency and the dblock lease (``--lease``, which bounds how long a
failover takes). Node logs go to ``<out>/logs``.

Jobs are written straight into ``qc_jobs`` with PostgreSQL ``COPY``: the same columns and
values that ``qcluster.store.catalog.upsert_jobs`` writes (a canonical trigger spec from
:func:`qcluster.definitions.triggers.validate_spec`, JSON arguments, version 1), but fast enough to
store a million jobs. The leader re-reads the store at least every ``poll_seconds``, so it
sees them as it sees jobs that the CLI wrote while no leader was alive.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.request
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import sqlalchemy as sa

from bench.common import Options, RssSampler, percentile
from bench.fires import Fire
from qcluster.definitions.triggers import validate_spec
from qcluster.store import schema
from qcluster.store.cluster import ClusterState, read_cluster
from qcluster.store.db import Database
from tests.helpers import NodeProcess, run_cli, start_node, wait_for, write_config
from tests.servers.base import free_port

JOB_COLUMNS = ("id", "func", "trigger", "args", "kwargs", "next_run_time", "paused",
               "misfire_grace_seconds", "coalesce", "recover", "broken", "version",
               "created_at", "updated_at")
WORKERS = ("w1", "w2")
#: The tag of ``--tagged`` jobs, which every worker has.
TAG = "bench"
SCHEDULERS = ("s1", "s2")


def interval_spec(seconds: float, start: float) -> str:
    """The stored text of an interval trigger anchored at ``start`` (epoch seconds)."""
    spec = validate_spec({"type": "interval", "seconds": seconds, "tz": "UTC",
                          "start": datetime.fromtimestamp(start, UTC).isoformat()})
    return json.dumps(spec, sort_keys=True)


def date_spec(at: float) -> str:
    spec = validate_spec({"type": "date", "tz": "UTC",
                          "at": datetime.fromtimestamp(at, UTC).isoformat()})
    return json.dumps(spec, sort_keys=True)


def job_row(job_id: str, func: str, trigger: str, next_run_time: float, *,
            args: Sequence[Any] = (), coalesce: bool | None = None,
            now: float | None = None) -> tuple[Any, ...]:
    """One ``qc_jobs`` row, in :data:`JOB_COLUMNS` order."""
    now = time.time() if now is None else now
    return (job_id, func, trigger, json.dumps(list(args)), "{}", next_run_time, False, None,
            coalesce, False, None, 1, now, now)


def copy_rows(db: Database, table: str, columns: Sequence[str],
              rows: Iterable[tuple[Any, ...]]) -> int:
    """COPY ``rows`` (tuples in ``columns`` order) into ``table`` in one transaction, on
    PostgreSQL; return how many."""
    n = 0
    with db.engine.connect() as conn:
        raw: Any = conn.connection.driver_connection
        with raw.cursor() as cur, cur.copy(
                f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
                n += 1
        raw.commit()
    return n


class Scraper:
    """``--metrics``: reads every node's ``/metrics`` once a second, as a Prometheus with
    a 1 s scrape interval would (15 s is usual: this is 15 times its cost)."""

    def __init__(self, ports: list[int], interval: float = 1.0) -> None:
        self.ports, self.interval = ports, interval
        self.scrapes = self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="scraper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            for port in self.ports:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                                timeout=5) as r:
                        r.read()
                    self.scrapes += 1
                except OSError:
                    self.failures += 1


class QcCluster:
    """Scheduler nodes s1, s2 and worker nodes w1, w2, as real processes."""

    def __init__(self, opts: Options, db_url: str, tmp: Path, sampler: RssSampler) -> None:
        self.opts = opts
        self.db_url = db_url
        self.tmp = tmp
        self.sampler = sampler
        self.logs = opts.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self._sections: dict[str, Any] = {
            "scheduler": {"poll_seconds": 1.0, "database_timeout_seconds": 10.0,
                          "fire_ahead_seconds": opts.fire_ahead},
            "coordination": {"dblock": {"lease_seconds": opts.lease}},
            "cluster": {"member_timeout_seconds": 10.0},
            "worker": {"heartbeat_seconds": 1.0, "concurrency": opts.concurrency,
                       "tags": [TAG] if opts.tagged else []},
        }
        self.config = write_config(tmp, db_url, **self._sections)
        self.db = Database(db_url)
        self.nodes: dict[str, NodeProcess] = {}
        self._starts = 0
        self.metrics_ports: dict[str, int] = {}  # --metrics: node id -> its /metrics port
        self._scraper: Scraper | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        run_cli("db", "upgrade", config=self.config)
        self._start_node("s1", "scheduler")
        self.wait_leader()
        for node_id in WORKERS:
            self._start_node(node_id, "worker")
        self._start_node("s2", "scheduler")
        wait_for(self._workers_live, timeout=60, what="two live workers")
        if self.metrics_ports:
            self._scraper = Scraper(list(self.metrics_ports.values()))
            self._scraper.start()
        self.sampler.track("leader", self.leader_pid)
        self.sampler.track("w1", lambda: self._pid("w1"))
        self.sampler.track("w2", lambda: self._pid("w2"))

    @property
    def scraper(self) -> Scraper | None:
        return self._scraper

    def close(self) -> None:
        if self._scraper is not None:
            self._scraper.stop()
        for node in self.nodes.values():
            with contextlib.suppress(Exception):
                node.close()
        self.db.dispose()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _start_node(self, node_id: str, role: str) -> NodeProcess:
        old = self.nodes.pop(node_id, None)
        if old is not None:
            old.close()
        self._starts += 1
        log = self.logs / f"{node_id}.{self._starts}.log"
        config = self.config
        if self.opts.metrics:  # a config of its own: its own metrics port
            port = self.metrics_ports.setdefault(node_id, free_port())
            config = write_config(self.tmp, self.db_url, name=f"{node_id}.toml",
                                  **{**self._sections, "metrics": {"port": port}})
        node = start_node(config, node_id=node_id, role=role, log_path=log)
        self.nodes[node_id] = node
        return node

    def _pid(self, node_id: str) -> int | None:
        node = self.nodes.get(node_id)
        return node.pid if node is not None and node.running() else None

    def _workers_live(self) -> bool:
        m = schema.members
        with self.db.read() as conn:
            now = self.db.now(conn)
            rows = conn.execute(
                sa.select(m.c.node_id).where(m.c.roles.like("%worker%"),
                                             m.c.last_seen >= now - 5, m.c.uri.is_not(None))
            ).scalars().all()
        return all(w in rows for w in WORKERS)

    # -- leadership -----------------------------------------------------------------------

    def state(self) -> ClusterState | None:
        return read_cluster(self.db)

    def wait_leader(self, *, after_epoch: int = 0, timeout: float = 60.0) -> ClusterState:
        def ready() -> ClusterState | None:
            s = self.state()
            if s is None or s.epoch <= after_epoch or not s.leader_uri:
                return None
            node = self.nodes.get(s.leader_id or "")
            return s if node is not None and node.running() else None

        state = wait_for(ready, timeout=timeout, interval=0.02, what="a leader")
        assert state is not None
        return state

    def leader_pid(self) -> int | None:
        s = self.state()
        return None if s is None or s.leader_id is None else self._pid(s.leader_id)

    def kill_leader(self) -> tuple[ClusterState, float]:
        """SIGKILL the leader; return its last state and the kill time."""
        state = self.wait_leader()
        killed_at = time.time()
        self.nodes[state.leader_id or ""].kill()
        return state, killed_at

    def restart(self, node_id: str) -> None:
        """Start a killed scheduler node again; it comes back as a follower."""
        self.nodes[node_id].wait()
        self._start_node(node_id, "scheduler")

    # -- tables ----------------------------------------------------------------------------

    def insert_jobs(self, rows: Iterable[tuple[Any, ...]]) -> int:
        """COPY ``rows`` (see :func:`job_row`) into ``qc_jobs`` in one transaction."""
        return copy_rows(self.db, "qc_jobs", JOB_COLUMNS, rows)

    def tag_jobs(self, ids: Sequence[str]) -> None:
        """These jobs ask for :data:`TAG` (a policy of ``tags``), before they first fire."""
        policy = json.dumps({"tags": [TAG]}, sort_keys=True)
        j = schema.jobs
        with self.db.write() as conn:
            for start in range(0, len(ids), 1000):
                conn.execute(j.update().where(j.c.id.in_(list(ids[start:start + 1000])))
                             .values(policy=policy))

    def insert_children(self, parents: Sequence[str], prefix: str) -> list[str]:
        """One job per parent, running after it (an ``after`` trigger, no fire time of its
        own), with its ``qc_job_deps`` edge: ``prefix`` and the parent's index."""
        ids = [f"{prefix}{i:07d}" for i in range(len(parents))]
        now = time.time()
        rows = []
        for child, parent in zip(ids, parents, strict=True):
            spec = json.dumps(validate_spec({"type": "after", "tz": "UTC", "parents": [
                {"job": parent, "on": "success"}]}), sort_keys=True)
            rows.append((child, "jobs.builtin:noop", spec, "[]", "{}", None, False, None,
                         None, False, None, 1, now, now))
        copy_rows(self.db, "qc_jobs", JOB_COLUMNS, rows)
        copy_rows(self.db, "qc_job_deps", ("child_id", "parent_id", "condition"),
                  ((c, p, "success") for c, p in zip(ids, parents, strict=True)))
        return ids

    def chained(self, prefix: str, lo: float, hi: float) -> dict[str, Any]:
        """The runs of the ``prefix`` children of fire times in [lo, hi): how many by
        status, and the delay from the parent run's end to the child's start, ms."""
        rows = self.execute(
            "SELECT c.status, c.started_at - p.finished_at FROM qc_runs c LEFT JOIN qc_runs p "
            "ON p.id = c.parent_run WHERE c.job_id LIKE :p AND c.scheduled_at >= :lo AND "
            "c.scheduled_at < :hi", p=f"{prefix}%", lo=lo, hi=hi).all()
        statuses: dict[str, int] = {}
        for status, _ in rows:
            statuses[status] = statuses.get(status, 0) + 1
        delays = sorted(d * 1000 for _, d in rows if d is not None)
        out: dict[str, Any] = {"runs": len(rows), "by_status": statuses}
        if delays:
            out["delay_ms"] = {"p50": round(percentile(delays, 50), 1),
                               "p99": round(percentile(delays, 99), 1)}
        return out

    def execute(self, sql: str, **params: Any) -> Any:
        with self.db.engine.begin() as conn:
            return conn.execute(sa.text(sql), params)

    def remove_jobs(self, prefix: str) -> None:
        # A bulk DELETE beside a running leader that advances the same rows can deadlock
        # with it; PostgreSQL then aborts one of the two, and the remedy is to run it again.
        for attempt in range(5):
            try:
                self.execute("DELETE FROM qc_jobs WHERE id LIKE :p", p=f"{prefix}%")
                self.execute("DELETE FROM qc_job_deps WHERE child_id LIKE :p",
                             p=f"{prefix}%")
                return
            except sa.exc.OperationalError as e:
                if type(e.orig).__name__ != "DeadlockDetected" or attempt == 4:
                    raise
                time.sleep(0.2)

    def caught_up(self, prefix: str, until: float) -> bool:
        """Whether every fire time before ``until`` of the ``prefix`` jobs has a run row,
        and none of those runs is still scheduled, dispatched or running."""
        behind = self.execute(
            "SELECT count(*) FROM qc_jobs WHERE id LIKE :p AND next_run_time < :t",
            p=f"{prefix}%", t=until).scalar_one()
        if behind:
            return False
        open_runs = self.execute(
            "SELECT count(*) FROM qc_runs WHERE status IN ('scheduled', 'dispatched', "
            "'running') AND job_id LIKE :p AND scheduled_at < :t",
            p=f"{prefix}%", t=until).scalar_one()
        return not open_runs

    def settled(self, prefix: str, lo: float, hi: float) -> int:
        """How many runs of the ``prefix`` jobs scheduled in [lo, hi) are past running.
        A cheap poll: the time range keeps it on an index, whatever the table holds."""
        return int(self.execute(
            "SELECT count(*) FROM qc_runs WHERE scheduled_at >= :lo AND scheduled_at < :hi "
            "AND job_id LIKE :p AND status NOT IN ('scheduled', 'dispatched', 'running')",
            p=f"{prefix}%", lo=lo, hi=hi).scalar_one())

    def stages(self, prefix: str, lo: float, hi: float) -> dict[str, dict[str, float]]:
        """Where the lateness of the runs scheduled in [lo, hi) comes from, p50/p99 in ms:
        ``leader`` (scheduled time -> ``created_at``, when the leader built the run row:
        its wake-up, reading and planning the due jobs), ``dispatch`` (-> ``dispatched_at``,
        when a worker's claim ran: the leader's insert and commit of the batch, the
        dispatcher's queue, the RPC, the claim) and ``worker`` (-> ``started_at``: the
        worker's pool queue). ``dispatched_at`` is on the database clock, the others on the
        nodes' clocks (one host here)."""
        rows = self.execute(
            "SELECT created_at - scheduled_at, dispatched_at - created_at, "
            "started_at - dispatched_at FROM qc_runs WHERE scheduled_at >= :lo AND "
            "scheduled_at < :hi AND job_id LIKE :p AND started_at IS NOT NULL",
            p=f"{prefix}%", lo=lo, hi=hi).all()
        out: dict[str, dict[str, float]] = {}
        for i, name in enumerate(("leader", "dispatch", "worker")):
            values = sorted(r[i] * 1000 for r in rows if r[i] is not None)
            if values:
                out[name] = {"p50": round(percentile(values, 50), 1),
                             "p99": round(percentile(values, 99), 1)}
        return out

    def by_second(self, prefix: str, t0: float) -> list[dict[str, float]]:
        """Lateness of the ``prefix`` runs that started, per whole second of fire time
        after ``t0`` (warm-up included): how long the cluster took to reach its steady
        state, which the window's figures leave out."""
        r = schema.runs
        second = sa.func.floor(r.c.scheduled_at - t0)
        late = r.c.started_at - r.c.scheduled_at
        query = (sa.select(second.label("s"), sa.func.count(),
                           sa.func.percentile_cont(0.5).within_group(late),
                           sa.func.percentile_cont(0.99).within_group(late))
                 .where(r.c.job_id.like(f"{prefix}%"), r.c.started_at.is_not(None))
                 .group_by(second).order_by(second))
        with self.db.read() as conn:
            rows = conn.execute(query).all()
        return [{"second": int(s), "runs": int(n), "p50_ms": round(p50 * 1000, 1),
                 "p99_ms": round(p99 * 1000, 1)} for s, n, p50, p99 in rows]

    def fires(self, prefix: str, lo: float = 0.0, hi: float = 1e12) -> list[Fire]:
        """One :class:`Fire` per run row of the ``prefix`` jobs scheduled in [lo, hi)."""
        r = schema.runs
        query = sa.select(r.c.job_id, r.c.scheduled_at, r.c.status, r.c.started_at).where(
            r.c.job_id.like(f"{prefix}%"), r.c.scheduled_at >= lo, r.c.scheduled_at < hi)
        with self.db.read() as conn:
            rows = conn.execute(query).all()
        out = []
        for row in rows:
            status = row.status
            if status in ("scheduled", "dispatched", "running"):
                status = "open"
            elif status == "lost":
                status = "missed"
            out.append(Fire(row.job_id, row.scheduled_at, status, row.started_at))
        return out

    # The two queries below look only at fire times from a minute before the kill on
    # (an index range), so that polling them does not load the database that the new
    # leader is busy with.

    def wait_first_fire_after(self, epoch: int, since: float, timeout: float = 120) -> float:
        """Wait for the first run row recorded at an epoch > ``epoch``; its created_at."""
        first = wait_for(lambda: self.first_fire_after(epoch, since), timeout=timeout,
                         interval=0.05, what="the new leader's first fire")
        assert first is not None
        return first

    def first_fire_after(self, epoch: int, since: float) -> float | None:
        """created_at of the first run row recorded at an epoch > ``epoch``."""
        return self.execute(  # type: ignore[no-any-return]
            "SELECT min(created_at) FROM qc_runs WHERE scheduled_at >= :s AND epoch > :e",
            s=since - 60, e=epoch).scalar()

    def first_start_after(self, epoch: int, since: float) -> float | None:
        return self.execute(  # type: ignore[no-any-return]
            "SELECT min(started_at) FROM qc_runs WHERE scheduled_at >= :s AND epoch > :e",
            s=since - 60, e=epoch).scalar()
