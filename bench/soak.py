"""A soak under a nemesis (issue 14): 3 scheduler nodes and 2 workers, each in its own
network namespace (tests/cluster/netns.py), one-second jobs and a few ``--recover`` jobs,
and every few seconds one fault, struck, held, then repaired, at random:

* on the **leader** (``--nemesis leader``): killed (SIGKILL, restarted after a moment),
  paused (SIGSTOP past its lease, then SIGCONT) or partitioned (from everything, from the
  database, from its backend or from its workers, with silent drops, then healed);
* on a **random node** (``--nemesis any``): a scheduler or a worker partitioned from a
  random non-empty subset of {the database, the coordination servers, other nodes} for
  3-8 s, or a worker killed (restarted after 0.5-2 s) or paused past its member timeout
  (half the time the worker of a ``--recover`` run, struck mid-run);
* both (``--nemesis mixed``, the default: each fault is one or the other, at random);
* now and then (``--lock-cuts``, a share of the faults) a **lock-wait cut**: the soak
  holds a row ``FOR UPDATE`` until a session of the node is seen waiting on its lock in
  ``pg_stat_activity``, cuts that node from the database, releases the lock (the dead
  session gets it with its transaction open), holds the cut 3-8 s and heals. The row is
  the cluster row, on which the leader's fenced pass waits (leader faults), or a
  ``running`` row of a ``--recover`` job, on which its worker's outcome write waits
  (random-node faults). A wait not seen within 3 s is given up quietly.

    python -m bench.soak --minutes 30                  # dblock on PostgreSQL
    python -m bench.soak --minutes 5 --backend redis --seed 7 --json soak.json -v

Needs root and iproute2 (network namespaces) and the servers of ``scripts/test.sh``
(private PostgreSQL, ZooKeeper, Redis on lab addresses). A node that exits by itself (a
worker's self-fence, exit status 75, or anything else) is started again before the next
fault and counted. At the end it heals every cut, resumes and restarts every node, waits
for the runs to settle, and prints:

* the nemesis events by kind;
* for the one-second jobs, exactly-once: fires, duplicates (fire times that ran more than
  once) and unaccounted fires (no row; a row neither succeeded nor missed; succeeded but
  never ran; missed but ran), each unaccounted one with the fault that touched its worker;
* for the ``--recover`` jobs, which run at least once by contract: (a) fire times with no
  row, a row left open, or a row succeeded that never ran; (b) overlaps, two attempts of
  one run running at once (an attempt runs from its record until ``--recover-sleep`` s
  later, later if its worker was paused meanwhile, sooner if its worker process was
  killed or exited), attempts n+1 started within ``--recover-sleep`` s of attempt n, and
  the closest a later attempt started after an earlier one ended; (c) attempts per run,
  and the runs that ran more than once with the fault that made them;
* the nodes that exited by themselves (``self_fenced``: exit status 75).

Exit status 0 only when the one-second jobs have no duplicates and nothing unaccounted,
and the ``--recover`` jobs have no fire without a final row and no overlap.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from qcluster.store import schema
from qcluster.store.cluster import ClusterState
from qcluster.store.runs import FINISHED
from tests.cluster.harness import records_of
from tests.cluster.netcluster import LAB_BACKENDS, LabServers, NetCluster
from tests.cluster.netns import Lab, lab_problem
from tests.helpers import NodeProcess, run_cli_many, wait_for

SCHEDULERS = ("s1", "s2", "s3")
WORKERS = ("w1", "w2")
NODES = SCHEDULERS + WORKERS
NEMESES = ("leader", "any", "mixed")
LEADER_ACTIONS = ("kill", "pause", "isolate", "cut-database", "cut-backend", "cut-workers")
#: Random-node faults and their weights: half of them are partitions.
NODE_ACTIONS = {"node-cut": 2, "worker-kill": 1, "worker-pause": 1}
#: The exit status of a worker that fenced itself off (docs/DESIGN.md invariant 7).
SELF_FENCE_STATUS = 75
#: A paused worker stays stopped at least this long: past the member timeout of the lab's
#: settings (3 s) and a recovery pass (1 s), so that the leader takes it for dead.
WORKER_PAUSE_MIN = 4.0
#: How long a lock-wait cut waits for a session of its node to wait on the held lock.
LOCK_WAIT_SECONDS = 3.0
#: How long the worker variant waits for a --recover run to be running.
RUNNING_ROW_WAIT_SECONDS = 6.0
#: Slack when comparing the times of two processes: one clock, but a kill's time is taken
#: just before the signal and an exit's by a poll every 0.1 s.
SLACK = 0.15
FINAL = frozenset(str(s) for s in FINISHED)


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


def _epoch(c: NetCluster) -> int | None:
    with contextlib.suppress(Exception):
        return c.state().epoch
    return None


# -- the nodes' processes -----------------------------------------------------------------------


@dataclasses.dataclass
class Life:
    """One process of a node: from its start to its exit (None: still running)."""

    node_id: str
    proc: NodeProcess
    started: float
    ended: float | None = None
    status: int | None = None
    killed: bool = False  # by the nemesis (else it exited by itself)


class Fleet:
    """The nodes' processes: starts, kills, and every exit, with its time (a thread polls
    them every 0.1 s, so a worker's self-fence is timed to within that)."""

    def __init__(self, c: NetCluster) -> None:
        self.c = c
        self.lives: list[Life] = []
        self._now: dict[str, Life] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="soak-exits")

    @staticmethod
    def role(node_id: str) -> str:
        return "worker" if node_id in WORKERS else "scheduler"

    def start(self, node_id: str) -> None:
        """(Re)start ``node_id``, from this (the main) thread: see NodeProcess."""
        started = time.time()
        proc = self.c.start(node_id, self.role(node_id))
        with self._lock:
            life = Life(node_id, proc, started)
            self.lives.append(life)
            self._now[node_id] = life

    def node(self, node_id: str) -> NodeProcess:
        return self._now[node_id].proc

    def kill(self, node_id: str) -> None:
        """SIGKILL ``node_id`` and reap it."""
        life = self._now[node_id]
        with self._lock:
            if life.ended is None:
                life.killed, life.ended = True, time.time()
        life.proc.kill()
        life.status = life.proc.wait()

    def watch(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _watch(self) -> None:
        while not self._stop.wait(0.1):
            self.poll()

    def poll(self) -> None:
        with self._lock:
            for life in self._now.values():
                if life.ended is None and life.proc.returncode is not None:
                    life.ended, life.status = time.time(), life.proc.returncode

    def reap(self) -> list[Life]:
        """Start again every node that exited by itself, whatever its status; return the
        lives that ended so."""
        self.poll()
        exited = [life for life in self._now.values()
                  if life.ended is not None and not life.killed]
        for life in exited:
            self.start(life.node_id)
        return exited

    def exits(self) -> list[Life]:
        """Every process that exited by itself, in order."""
        return [life for life in self.lives if life.ended is not None and not life.killed]

    def life_at(self, node_id: str, when: float) -> Life | None:
        """The process of ``node_id`` that ran at ``when``."""
        found = None
        for life in self.lives:
            if life.node_id == node_id and life.started <= when:
                found = life  # the last one started before ``when``
        return found


# -- the nemesis --------------------------------------------------------------------------------


@dataclasses.dataclass
class Event:
    """One fault: struck at ``start``, repaired at ``end`` (a kill: restarted)."""

    kind: str
    victim: str
    start: float
    hold: float
    peers: tuple[str, ...] = ()  # what a cut cut the victim from: nodes, servers
    epoch: int | None = None  # the cluster's epoch when it struck
    detail: str = ""
    end: float = 0.0

    def touches(self, node_id: str, t0: float, t1: float) -> bool:
        """Whether this fault was on ``node_id`` (or cut it off) at some time in [t0, t1]."""
        return ((self.victim == node_id or node_id in self.peers)
                and self.start <= t1 and (self.end or self.start) >= t0)

    def describe(self) -> str:
        cut = f" from {','.join(self.peers)}" if self.peers else ""
        epoch = "" if self.epoch is None else f", epoch {self.epoch}"
        detail = f", {self.detail}" if self.detail else ""
        return f"{self.kind} {self.victim}{cut} ({self.hold:.1f}s{epoch}{detail})"

    def as_dict(self, t0: float) -> dict[str, Any]:
        return {"kind": self.kind, "victim": self.victim, "at": round(self.start - t0, 2),
                "held": round((self.end or self.start) - self.start, 2),
                "peers": list(self.peers), "epoch": self.epoch, "detail": self.detail}


Groups = list[tuple[str, list[str]]]


class Nemesis:
    """One fault at a time, on the leader or on a random node, then its repair."""

    def __init__(self, c: NetCluster, fleet: Fleet, rng: random.Random,
                 args: argparse.Namespace, say: Callable[[str], None]) -> None:
        self.c, self.fleet, self.rng, self.say = c, fleet, rng, say
        self.mode: str = args.nemesis
        self.hold: tuple[float, float] = (args.min_hold, args.max_hold)
        self.node_hold: tuple[float, float] = (args.node_min_hold, args.node_max_hold)
        self.lock_share: float = args.lock_cuts
        self.recover_jobs: int = args.recover_jobs
        self.recover_sleep: float = args.recover_sleep
        self.events: list[Event] = []
        self.no_leader = 0
        self.not_caught: collections.Counter[str] = collections.Counter()
        self.engine = sa.create_engine(c.url, poolclass=sa.pool.NullPool)
        self.postgres = self.engine.dialect.name == "postgresql"  # the lab's always is

    def close(self) -> None:
        self.engine.dispose()

    @property
    def by_kind(self) -> dict[str, int]:
        return dict(sorted(collections.Counter(e.kind for e in self.events).items()))

    def strike(self) -> Event | None:
        """Start again any node that exited, then one fault, held, repaired."""
        for life in self.fleet.reap():
            self.say(f"{life.node_id} had exited by itself (status {life.status}): "
                     f"started again")
        event = self._strike(self._family())
        if event is not None:
            event.end = event.end or time.time()
            self.events.append(event)
        return event

    def _family(self) -> str:
        if self.postgres and self.rng.random() < self.lock_share:
            if self.mode == "leader" or not self.recover_jobs:
                return "lock-cut-leader"
            if self.mode == "any":
                return "lock-cut-worker"
            return self.rng.choice(("lock-cut-leader", "lock-cut-worker"))
        if self.mode == "mixed":
            return self.rng.choice(("leader", "any"))
        return str(self.mode)

    def _strike(self, family: str) -> Event | None:
        if family == "leader":
            return self._leader_fault()
        if family == "any":
            return self._node_fault()
        return self._lock_cut(family)

    # -- the faults ---------------------------------------------------------------------------

    def _kill(self, node_id: str) -> None:
        self.fleet.kill(node_id)
        time.sleep(self.rng.uniform(0.5, 2.0))
        self.fleet.start(node_id)

    def _pause(self, node_id: str, hold: float) -> None:
        node = self.fleet.node(node_id)
        node.pause()
        try:
            time.sleep(hold)
        finally:
            node.resume()

    def _cut(self, node_id: str, groups: Groups, hold: float) -> None:
        self.c.lab.cut(self.c.address(node_id), [a for _, addresses in groups for a in addresses])
        try:
            time.sleep(hold)
        finally:
            self.c.lab.heal()

    def _servers(self) -> Groups:
        servers: Groups = [("database", self.c.database())]
        if self.c.backend != "dblock":  # the dblock lease is in the database
            servers.append((self.c.backend, self.c.coordination()))
        return servers

    def _others(self, node_id: str) -> Groups:
        return [(n, [self.c.address(n)]) for n in NODES if n != node_id]

    def _leader_fault(self) -> Event | None:
        state = _leader(self.c)
        if state is None or state.leader_id is None:
            self.no_leader += 1
            return None
        victim = state.leader_id
        action = self.rng.choice(LEADER_ACTIONS)
        if action == "cut-backend" and self.c.backend == "dblock":
            action = "cut-database"  # the dblock lease is in the database
        hold = self.rng.uniform(*self.hold)
        groups: Groups = {
            "isolate": [*self._servers(), *self._others(victim),
                        ("soak", [self.c.lab.gateway])],
            "cut-database": self._servers()[:1],
            "cut-backend": self._servers()[1:],
            "cut-workers": [(w, [self.c.address(w)]) for w in WORKERS],
        }.get(action, [])
        event = Event(f"leader-{action}", victim, time.time(), hold,
                      tuple(label for label, _ in groups), state.epoch)
        if action == "kill":
            event.hold = 0.0
            self._kill(victim)
        elif action == "pause":
            self._pause(victim, hold)
        else:
            self._cut(victim, groups, hold)
        return event

    def _cut_groups(self, victim: str) -> Groups:
        """A random non-empty subset of {database, coordination servers, other nodes};
        the other nodes are all of them half the time, else a random non-empty subset."""
        choices: list[Groups] = [[g] for g in self._servers()]
        others = self._others(victim)
        if self.rng.random() < 0.5:
            choices.append(others)
        else:
            choices.append(self.rng.sample(others, self.rng.randint(1, len(others))))
        mask = self.rng.randrange(1, 2 ** len(choices))
        return [g for i, groups in enumerate(choices) if mask >> i & 1 for g in groups]

    def _node_fault(self) -> Event:
        action = self.rng.choices(list(NODE_ACTIONS), weights=list(NODE_ACTIONS.values()))[0]
        epoch = _epoch(self.c)
        if action == "node-cut":
            victim = self.rng.choice(NODES)
            groups = self._cut_groups(victim)
            hold = self.rng.uniform(*self.node_hold)
            event = Event(action, victim, time.time(), hold,
                          tuple(label for label, _ in groups), epoch)
            self._cut(victim, groups, hold)
            return event
        victim, detail = self._worker_victim()
        if action == "worker-kill":
            event = Event(action, victim, time.time(), 0.0, epoch=epoch, detail=detail)
            self._kill(victim)
            return event
        low, high = self.node_hold
        hold = self.rng.uniform(max(low, WORKER_PAUSE_MIN), max(high, WORKER_PAUSE_MIN))
        event = Event(action, victim, time.time(), hold, epoch=epoch, detail=detail)
        self._pause(victim, hold)
        return event

    def _worker_victim(self) -> tuple[str, str]:
        """A random worker; half the time (with --recover jobs) the worker of a --recover
        run that started less than half its sleep ago, struck at a random point before
        the sleep ends, so that the attempt is cut short."""
        if self.recover_jobs and self.rng.random() < 0.5:
            with self.engine.connect() as conn:
                found = self._running_recover_row(conn, lock=False,
                                                  since=0.5 * self.recover_sleep)
            if found is not None:
                victim, what, started = found
                strike_at = self.rng.uniform(max(time.time(), started + 0.1),
                                             started + 0.9 * self.recover_sleep)
                time.sleep(max(0.0, strike_at - time.time()))
                return victim, f"mid-run of {what}, +{time.time() - started:.1f}s"
        return self.rng.choice(WORKERS), ""

    # -- lock-wait cuts ---------------------------------------------------------------------

    def _lock_cut(self, kind: str) -> Event | None:
        """Hold a row FOR UPDATE until a session of its node waits on it; cut that node
        from the database; release; hold the cut; heal. None if no wait was seen."""
        hold = self.rng.uniform(*self.node_hold)
        event: Event | None = None
        try:
            with self.engine.connect() as blocker:
                blocker.execute(sa.text("SET lock_timeout = '2s'"))
                held = (self._lock_cluster_row(blocker) if kind == "lock-cut-leader"
                        else self._running_recover_row(blocker, lock=True))
                if held is None:
                    self._not_caught(kind, "no row to hold")
                    return None
                victim, what, _ = held
                address = self.c.address(victim)
                if not self._seen_waiting(address):
                    self._not_caught(kind, f"no session of {victim} waited on {what}")
                    return None
                event = Event(kind, victim, time.time(), hold, ("database",),
                              _epoch(self.c), f"waited on {what}")
                self.c.lab.cut(address, self.c.database())
                time.sleep(0.3)
                blocker.commit()
            time.sleep(max(0.0, event.start + hold - time.time()))
        except sa.exc.DBAPIError as e:  # our own lock wait timed out, say
            self._not_caught(kind, f"the soak's own session failed: {type(e.orig).__name__}")
            return None
        finally:
            if event is not None:
                self.c.lab.heal()
        return event

    def _not_caught(self, kind: str, why: str) -> None:
        self.not_caught[kind] += 1
        self.say(f"{kind}: {why}; skipped")

    def _lock_cluster_row(self, blocker: sa.Connection) -> tuple[str, str, float] | None:
        """Lock the cluster row; the leader's fenced pass reads it FOR SHARE."""
        row = blocker.execute(sa.text(
            "SELECT epoch, leader_id FROM qc_cluster WHERE id = 1 FOR UPDATE")).one()
        node = self.c.nodes.get(row.leader_id or "")
        if node is None or not node.running():
            return None
        return str(row.leader_id), "the cluster row", time.time()

    def _running_recover_row(self, conn: sa.Connection, *, lock: bool,
                             since: float | None = None) -> tuple[str, str, float] | None:
        """(worker, run, its start) of a running --recover run (that started less than
        ``since`` s ago), waiting up to RUNNING_ROW_WAIT_SECONDS for one; with ``lock``,
        the row is locked FOR UPDATE until ``conn``'s transaction ends."""
        deadline = time.monotonic() + RUNNING_ROW_WAIT_SECONDS
        while time.monotonic() < deadline:
            after = 0.0 if since is None else time.time() - since  # the worker's clock
            row = conn.execute(sa.text(
                "SELECT id, job_id, worker, attempt, started_at FROM qc_runs "
                "WHERE status = 'running' AND recover AND worker IS NOT NULL "
                "AND started_at > :after ORDER BY started_at DESC LIMIT 1"
                + (" FOR UPDATE SKIP LOCKED" if lock else "")), {"after": after}
            ).one_or_none()
            if (row is not None and row.worker in WORKERS
                    and self.fleet.node(row.worker).running()):
                return (str(row.worker), f"run {row.id} ({row.job_id}, attempt {row.attempt})",
                        float(row.started_at))
            time.sleep(0.1)
        return None

    def _seen_waiting(self, address: str) -> bool:
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while time.monotonic() < deadline:
            if self.c.waiting_on_a_lock(address):
                return True
            time.sleep(0.05)
        return False

    def repair_all(self) -> None:
        self.c.lab.heal()
        for node_id in NODES:
            self.fleet.node(node_id).resume()
        for life in self.fleet.reap():
            self.say(f"{life.node_id} had exited by itself (status {life.status}): "
                     f"started again")




# -- what the faults did ------------------------------------------------------------------------


class Timeline:
    """The faults and the nodes' processes, to explain what a run went through."""

    def __init__(self, events: Sequence[Event], fleet: Fleet, sleep: float) -> None:
        self.events, self.fleet, self.sleep = list(events), fleet, sleep

    def blame(self, node_id: str | None, t0: float, t1: float) -> str:
        """The faults on ``node_id`` in [t0, t1], and its processes' own exits; "no
        fault" if none."""
        if node_id is None:
            return "no worker"
        found = [f"{e.kind} {e.victim}" for e in self.events if e.touches(node_id, t0, t1)]
        found += [f"{node_id} exited {life.status}" for life in self.fleet.exits()
                  if life.node_id == node_id and life.ended is not None
                  and t0 <= life.ended <= t1]
        return "; ".join(dict.fromkeys(found)) or "no fault"

    def end_of(self, record: dict[str, Any]) -> tuple[float, str]:
        """When the attempt of ``record`` stopped running, and why then: ``sleep`` s after
        its record, later if its worker was paused meanwhile (its sleep ends at the
        SIGCONT), sooner if its worker process ended."""
        started, worker = float(record["started"]), str(record["worker"])
        end, why = started + self.sleep, f"its {self.sleep:g}s sleep"
        for e in sorted(self.events, key=lambda e: e.start):
            if (e.kind == "worker-pause" and e.victim == worker and e.start < end
                    and e.end > started):
                end, why = max(end, e.end), "its worker paused till then"
        life = self.fleet.life_at(worker, started)
        if life is not None and life.ended is not None and life.ended < end:
            how = "killed" if life.killed else f"exited with status {life.status}"
            end, why = life.ended, f"its worker {how}"
        return end, why

    def paused(self, worker: str, when: float) -> bool:
        """Whether ``worker`` was stopped (SIGSTOP) at ``when``."""
        return any(e.kind == "worker-pause" and e.victim == worker and e.start <= when <= e.end
                   for e in self.events)


def account(rows: list[Any], records: list[dict[str, Any]], job_ids: list[str],
            start: float, end: float, blame: Callable[[Any], str] | None = None
            ) -> dict[str, Any]:
    """The exactly-once figures over every (job, second) in [start, end]. ``blame(row)``
    says which fault touched an unaccounted fire's worker."""
    executed = collections.Counter((r["job_id"], r["scheduled_at"]) for r in records)
    by_key = {(r.job_id, r.scheduled_at): r for r in rows}
    statuses: collections.Counter[str] = collections.Counter()
    causes: collections.Counter[str] = collections.Counter()
    fires = duplicates = 0
    unaccounted: list[str] = []
    for job_id in job_ids:
        t = float(int(start))
        while t <= end:
            fires += 1
            ran = executed.get((job_id, t), 0)
            duplicates += ran > 1
            row = by_key.get((job_id, t))
            problem = None
            if row is None:
                problem = "no row"
            else:
                statuses[row.status] += 1
                if row.status == "succeeded" and ran != 1:
                    problem = f"succeeded, ran {ran} times"
                elif row.status == "missed" and ran:
                    problem = "missed but ran"
                elif row.status not in ("succeeded", "missed"):
                    problem = f"{row.status}, ran {ran}: {row.error}"
            if problem is not None:
                cause = "" if blame is None or row is None else f" [{blame(row)}]"
                causes[problem.split(":")[0] + cause] += 1
                unaccounted.append(f"{job_id}@{t}: {problem}{cause}")
            t += 1.0
    return {"fires": fires, "duplicates": duplicates, "unaccounted": len(unaccounted),
            "unaccounted_examples": unaccounted[:10], "unaccounted_causes": dict(causes),
            "statuses": dict(statuses)}


@dataclasses.dataclass
class RecoverFigures:
    fires: int = 0
    statuses: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    not_final: list[str] = dataclasses.field(default_factory=list)  # (a): no row, left open
    attempts: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)
    ran: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)
    overlaps: list[str] = dataclasses.field(default_factory=list)  # (b)
    overlaps_paused: int = 0  # of them, while the earlier attempt's worker was stopped
    #: The least time from the end of an attempt to the start of a later one of its run.
    closest: tuple[float, str] | None = None
    within_sleep: list[str] = dataclasses.field(default_factory=list)
    reran: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    reran_examples: list[str] = dataclasses.field(default_factory=list)
    missed_but_ran: int = 0
    not_succeeded: list[str] = dataclasses.field(default_factory=list)  # why: the row's error

    def as_dict(self) -> dict[str, Any]:
        return {
            "fires": self.fires, "statuses": dict(self.statuses),
            "not_final": len(self.not_final), "not_final_examples": self.not_final[:10],
            "attempts_per_run": dict(sorted(self.attempts.items())),
            "records_per_run": dict(sorted(self.ran.items())),
            "overlaps": len(self.overlaps), "overlaps_while_paused": self.overlaps_paused,
            "overlap_examples": self.overlaps[:10],
            "closest_margin": None if self.closest is None else round(self.closest[0], 3),
            "closest": None if self.closest is None else self.closest[1],
            "within_sleep": len(self.within_sleep),
            "within_sleep_examples": self.within_sleep[:10],
            "ran_more_than_once": sum(self.reran.values()), "reran_by_cause": dict(self.reran),
            "reran_examples": self.reran_examples[:10], "missed_but_ran": self.missed_but_ran,
            "not_succeeded_examples": self.not_succeeded[:10],
        }


def _check_attempts(key: str, recs: list[dict[str, Any]], timeline: Timeline,
                    out: RecoverFigures) -> None:
    """(b) for one run whose records are ``recs``, in order of start; and (c)."""
    ends = [timeline.end_of(r) for r in recs]
    for i, (a, (end, why)) in enumerate(zip(recs, ends, strict=True)):
        ran = f"attempt {a['attempt']} on {a['worker']} ran till +{end - a['started']:.2f}s ({why})"
        for b in recs[i + 1:]:
            margin = b["started"] - end
            if out.closest is None or margin < out.closest[0]:
                out.closest = (margin, f"{key}: attempt {b['attempt']} on {b['worker']} "
                                       f"started at +{b['started'] - a['started']:.2f}s, {ran}")
            if margin < -SLACK:
                frozen = timeline.paused(str(a["worker"]), float(b["started"]))
                out.overlaps_paused += frozen
                out.overlaps.append(
                    f"{key}: attempt {b['attempt']} on {b['worker']} started at "
                    f"+{b['started'] - a['started']:.2f}s, {ran}"
                    + (", stopped by SIGSTOP then" if frozen else ""))
        if i + 1 < len(recs) and recs[i + 1]["started"] - a["started"] < timeline.sleep:
            out.within_sleep.append(
                f"{key}: attempt {recs[i + 1]['attempt']} on {recs[i + 1]['worker']} "
                f"started at +{recs[i + 1]['started'] - a['started']:.2f}s, {ran}")
    if len(recs) > 1:
        first, (end, _) = recs[0], ends[0]
        cause = timeline.blame(str(first["worker"]), first["started"] - 0.5, end + 1.0)
        out.reran[cause] += 1
        attempts = ", ".join(f"attempt {r['attempt']} on {r['worker']}" for r in recs)
        out.reran_examples.append(f"{key}: {attempts} [{cause}]")


def account_recover(rows: list[Any], records: list[dict[str, Any]], starts: dict[str, float],
                    every: float, end: float, timeline: Timeline) -> dict[str, Any]:
    """The at-least-once figures of the --recover jobs, over each one's fire times from
    ``starts[job]`` to ``end``."""
    by_key = {(r.job_id, r.scheduled_at): r for r in rows if r.job_id in starts}
    by_run: dict[tuple[str, float], list[dict[str, Any]]] = collections.defaultdict(list)
    for r in records:
        if r["job_id"] in starts:
            by_run[(r["job_id"], r["scheduled_at"])].append(r)
    out = RecoverFigures()
    for job_id, t in ((j, s + k * every) for j, s in starts.items()
                      for k in range(int((end - s) // every) + 1)):
        out.fires += 1
        key = f"{job_id}@{t}"
        recs = sorted(by_run.get((job_id, t), []), key=lambda r: float(r["started"]))
        out.ran[len(recs)] += 1
        row = by_key.get((job_id, t))
        if row is None:
            out.not_final.append(f"{key}: no row, ran {len(recs)}")
        elif row.status not in FINAL:
            out.not_final.append(f"{key}: left {row.status} at attempt {row.attempt}")
        else:
            out.statuses[row.status] += 1
            out.attempts[int(row.attempt)] += 1
            if row.status == "succeeded" and not recs:
                out.not_final.append(f"{key}: succeeded but never ran")
            out.missed_but_ran += row.status == "missed" and bool(recs)
            if row.status != "succeeded":
                out.not_succeeded.append(f"{key}: {row.status} at attempt {row.attempt}, "
                                         f"ran {len(recs)}: {row.error}")
        _check_attempts(key, recs, timeline, out)
    return out.as_dict()


# -- the soak ---------------------------------------------------------------------------------


def _add_recover_jobs(c: NetCluster, n: int, every: float, sleep: float) -> list[str]:
    ids = [f"recover{i}" for i in range(n)]
    run_cli_many([("jobs", "add", i, "--func", "jobs.examples:record_run", "--every",
                   f"{every:g}s", "--kwarg", f"path={c.records}", "--kwarg", f"sleep={sleep:g}",
                   "--recover") for i in ids], config=c.config)
    return ids


def _first_fires(c: NetCluster, ids: list[str]) -> dict[str, float]:
    """Each job's next fire time as it is now (read right after the jobs were added)."""
    if not ids:
        return {}
    with c.db.read() as conn:
        found = conn.execute(sa.select(schema.jobs.c.id, schema.jobs.c.next_run_time)
                             .where(schema.jobs.c.id.in_(ids))).all()
    return {str(r.id): float(r.next_run_time) for r in found if r.next_run_time is not None}


def _recover_starts(rows: list[Any], added: dict[str, float], ids: list[str]) -> dict[str, float]:
    """Where each --recover job's fire times begin: its first row, or its next fire time
    when it was added, whichever is first."""
    starts: dict[str, float] = {}
    for job_id in ids:
        seen = [r.scheduled_at for r in rows if r.job_id == job_id]
        if job_id in added or seen:
            starts[job_id] = min([*seen, *([added[job_id]] if job_id in added else [])])
    return starts


def _run_nemesis(nemesis: Nemesis, args: argparse.Namespace, rng: random.Random,
                 say: Callable[[str], None]) -> float:
    began = time.monotonic()
    t0 = time.time()
    deadline = began + args.minutes * 60
    while time.monotonic() < deadline:
        time.sleep(rng.uniform(args.min_gap, args.max_gap))
        done = nemesis.strike()
        if done is not None:
            say(f"{done.start - t0:7.1f}s {done.describe()}")
    return t0


def soak(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)

    def say(text: str) -> None:
        if args.verbose:
            print(text, flush=True)

    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qc-soak-")))
        else:  # kept: the nodes' logs, the job records, the pki
            tmp = args.workdir
            tmp.mkdir(parents=True, exist_ok=True)
        lab = Lab.create()
        stack.callback(lab.close)
        servers = LabServers(lab, _start_server)
        stack.callback(servers.close)
        c = NetCluster(tmp, lab, servers, args.backend)
        stack.callback(c.close)
        fleet = Fleet(c)
        for node_id in NODES:
            fleet.start(node_id)
        fleet.watch()
        stack.callback(fleet.stop)
        c.wait_leader(timeout=60)
        jobs = c.add_second_jobs(args.jobs)
        recover = _add_recover_jobs(c, args.recover_jobs, args.recover_every,
                                    args.recover_sleep)
        added = _first_fires(c, recover)
        first = wait_for(lambda: min((r.scheduled_at for r in c.runs()), default=None),
                         timeout=30, what="the first fire")
        assert isinstance(first, float)
        nemesis = Nemesis(c, fleet, rng, args, say)
        stack.callback(nemesis.close)
        t0 = _run_nemesis(nemesis, args, rng, say)
        nemesis.repair_all()
        c.wait_leader(timeout=60)
        time.sleep(10)
        fleet.poll()
        end = time.time() - 3
        rows = c.wait_settled(end, timeout=180)
        fleet.poll()
        timeline = Timeline(nemesis.events, fleet, args.recover_sleep)
        records = records_of(c)
        result = account(rows, records, jobs, first, end, blame=lambda row: timeline.blame(
            row.worker, row.scheduled_at - 1.0, row.scheduled_at + 6.0))
        recovered = account_recover(rows, records, _recover_starts(rows, added, recover),
                                    args.recover_every, end, timeline)
        exits = fleet.exits()
        return {
            "backend": args.backend, "minutes": args.minutes, "seed": args.seed,
            "nemesis": args.nemesis, "jobs": args.jobs, "recover_jobs": args.recover_jobs,
            "events": len(nemesis.events), "by_kind": nemesis.by_kind,
            "no_leader_to_strike": nemesis.no_leader,
            "lock_cuts_not_caught": dict(nemesis.not_caught),
            "self_fenced": sum(life.status == SELF_FENCE_STATUS for life in exits),
            "exits": [{"node": life.node_id, "status": life.status,
                       "at": round((life.ended or 0.0) - t0, 1)} for life in exits],
            "final_epoch": c.state().epoch, "seconds": round(end - first), **result,
            "recover": recovered,
            "log": [e.as_dict(t0) for e in nemesis.events],
        }


def passed(result: dict[str, Any]) -> bool:
    """No duplicate and nothing unaccounted on the one-second jobs; every --recover fire
    with a final row, and no two attempts of one run at once."""
    recover = result["recover"]
    return bool(result["duplicates"] == 0 and result["unaccounted"] == 0
                and recover["not_final"] == 0 and recover["overlaps"] == 0)


def summary(result: dict[str, Any]) -> list[str]:
    r = result["recover"]
    others = [e for e in result["exits"] if e["status"] != SELF_FENCE_STATUS]
    lines = [
        f"soak {result['minutes']:g} min on {result['backend']} (seed {result['seed']}, "
        f"nemesis {result['nemesis']}): {result['events']} nemesis events "
        f"{result['by_kind']}, {result['fires']} fires over {result['seconds']}s, "
        f"{result['duplicates']} duplicates, {result['unaccounted']} unaccounted; "
        f"statuses {result['statuses']}; final epoch {result['final_epoch']}",
        f"  recover jobs ({result['recover_jobs']}): {r['fires']} fires, statuses "
        f"{r['statuses']}, {r['not_final']} without a final row, {r['overlaps']} overlaps "
        f"({r['overlaps_while_paused']} while the earlier attempt's worker was paused), "
        f"attempts per run {r['attempts_per_run']}, records per run {r['records_per_run']}, "
        f"{r['ran_more_than_once']} ran more than once {r['reran_by_cause']}, "
        f"{r['within_sleep']} attempts started within the sleep of the one before; the "
        f"closest a later attempt started after an earlier one ended: "
        f"{'-' if r['closest_margin'] is None else format(r['closest_margin'], '+.2f')}s",
        f"  self-fenced {result['self_fenced']}, other exits {others}, lock cuts not caught "
        f"{result['lock_cuts_not_caught']}, no leader to strike {result['no_leader_to_strike']}",
    ]
    if result["unaccounted_causes"]:
        lines.append(f"  unaccounted by cause: {result['unaccounted_causes']}")
    lines += [f"  unaccounted: {x}" for x in result["unaccounted_examples"]]
    lines += [f"  recover, no final row: {x}" for x in r["not_final_examples"]]
    lines += [f"  recover, not succeeded: {x}" for x in r["not_succeeded_examples"]]
    lines += [f"  recover, overlap: {x}" for x in r["overlap_examples"]]
    lines += [f"  recover, within the sleep: {x}" for x in r["within_sleep_examples"]]
    lines += [f"  recover, ran more than once: {x}" for x in r["reran_examples"]]
    if r["closest"] is not None:
        lines.append(f"  recover, closest: {r['closest']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--backend", choices=LAB_BACKENDS, default="dblock")
    parser.add_argument("--nemesis", choices=NEMESES, default="mixed",
                        help="faults on the leader, on random nodes, or both (default)")
    parser.add_argument("--jobs", type=int, default=5, help="one-second jobs")
    parser.add_argument("--recover-jobs", type=int, default=2, help="--recover jobs")
    parser.add_argument("--recover-every", type=float, default=5.0,
                        help="seconds between fires of a --recover job")
    parser.add_argument("--recover-sleep", type=float, default=2.0,
                        help="seconds a --recover run takes")
    parser.add_argument("--lock-cuts", type=float, default=0.1,
                        help="the share of faults that are lock-wait cuts (0: none)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--min-gap", type=float, default=1.0,
                        help="seconds between a repair and the next fault, at least")
    parser.add_argument("--max-gap", type=float, default=3.0)
    parser.add_argument("--min-hold", type=float, default=2.0,
                        help="seconds a pause or a cut of the leader lasts, at least")
    parser.add_argument("--max-hold", type=float, default=5.0)
    parser.add_argument("--node-min-hold", type=float, default=3.0,
                        help="seconds a random node's cut, or a lock-wait cut, lasts, at "
                             f"least (a worker's pause: at least {WORKER_PAUSE_MIN:g})")
    parser.add_argument("--node-max-hold", type=float, default=8.0)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the nodes' logs and the job records here (default: a "
                             "temporary directory, removed at the end)")
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per event")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(2**31)
    if (problem := lab_problem()) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    result = soak(args)
    for line in summary(result):
        print(line)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if passed(result) else 1


if __name__ == "__main__":
    sys.exit(main())
