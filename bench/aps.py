"""Bare APScheduler 3.11 on the same database: the baseline of every comparison.

A child process (``python -m bench.aps``) runs a ``BackgroundScheduler`` on a
``SQLAlchemyJobStore`` (its own table, ``aps_bench_<scenario>``, on the benchmark's
database) with APScheduler's defaults: the default ``ThreadPoolExecutor`` (10 threads),
``coalesce=False``, ``max_instances=1``. One default is changed: ``misfire_grace_time``
is an hour instead of one second, so a late fire runs late instead of being dropped;
APScheduler's misses and max-instances skips are still counted, separately.

How lateness is measured. APScheduler passes no scheduled time to a job, and
``run_job`` may run several fire times of one job in a row. So the job, :func:`probe`,
returns ``time.time()`` as it starts, and a listener on ``EVENT_JOB_EXECUTED`` receives
that value as ``retval`` together with the event's ``scheduled_run_time``: one
(job, scheduled, started) triple per execution, exact, with no executor subclass.
``EVENT_JOB_MISSED`` and ``EVENT_JOB_MAX_INSTANCES`` give the fire times that did not
run. The listener appends one line per event to a file (``os.write`` on an ``O_APPEND``
descriptor), which survives a SIGKILL of the child: lines are ``T <t0>`` (the first fire
time), ``R <time>`` (the scheduler started), ``E job scheduled started``, ``M job
scheduled`` (missed), ``S job scheduled`` (skipped), ``X job scheduled`` (raised).

Jobs are written into the job store's table directly, with exactly the rows
``SQLAlchemyJobStore.add_job`` writes (id, next run time, the pickled ``Job`` state), so
that storing 10,000 jobs takes a second instead of ten. The scheduler starts before the
first fire time, on a full store.

The failover scenario has no counterpart in APScheduler, which has no standby: the child
is killed with SIGKILL and a new one is started at once on the same table (what a process
supervisor does). A fire time that the killed scheduler ran but had not yet advanced in
the store runs again; the lines show it as a duplicate. A run that was in progress at the
kill has no line (the listener writes after the job returns), so the duplicate count is a
lower bound.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import pickle
import resource
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_EXECUTED,
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
)

from bench.common import Lateness, Options, Result, RssSampler, fire_key, sleep_until
from bench.common import spread_offsets as offsets
from bench.fires import Fire, Key, account, expected_keys, undone

GRACE = 3600
ROOT = Path(__file__).resolve().parent.parent  # where ``-m bench.aps`` resolves
SYSTEM = "apscheduler 3.11"


def probe() -> float:
    """The benchmark's APScheduler job: a no-op that tells when it started."""
    return time.time()


# -- the child process ---------------------------------------------------------------------


class _Lines:
    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, *fields: object) -> None:
        os.write(self.fd, (" ".join(map(str, fields)) + "\n").encode())

    def on_event(self, event: Any) -> None:
        if event.code == EVENT_JOB_EXECUTED:
            self.write("E", event.job_id, event.scheduled_run_time.timestamp(), event.retval)
        elif event.code in (EVENT_JOB_MISSED, EVENT_JOB_ERROR):
            kind = "M" if event.code == EVENT_JOB_MISSED else "X"
            self.write(kind, event.job_id, event.scheduled_run_time.timestamp())
        else:  # EVENT_JOB_MAX_INSTANCES: a submission event with every skipped time
            for t in event.scheduled_run_times:
                self.write("S", event.job_id, t.timestamp())


def _store_jobs(scheduler: Any, store: Any, mode: str, n: int, spread: bool,
                lines: _Lines) -> None:
    from apscheduler.job import Job
    from apscheduler.triggers.date import DateTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    store.jobs_t.drop(store.engine, checkfirst=True)
    store.jobs_t.create(store.engine)
    t0 = float(math.ceil(time.time() + 1.0 + n * 3e-4))
    rows = []
    for i, offset in enumerate(offsets(n, spread)):
        first = datetime.fromtimestamp(t0 + offset, UTC)
        trigger: Any = (IntervalTrigger(seconds=1, start_date=first, timezone=UTC)
                        if mode == "steady" else DateTrigger(run_date=first, timezone=UTC))
        job_id = f"aps-{i:07d}"
        job = Job(scheduler, id=job_id, func="bench.aps:probe", trigger=trigger,
                  executor="default", args=(), kwargs={}, name=job_id,
                  misfire_grace_time=GRACE, coalesce=False, max_instances=1,
                  next_run_time=first)
        rows.append({"id": job_id, "next_run_time": first.timestamp(),
                     "job_state": pickle.dumps(job.__getstate__(), store.pickle_protocol)})
    with store.engine.begin() as conn:
        for start in range(0, len(rows), 1000):
            conn.execute(store.jobs_t.insert(), rows[start:start + 1000])
    lines.write("T", t0)


def child_main(argv: list[str] | None = None) -> int:
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler

    p = argparse.ArgumentParser(prog="python -m bench.aps")
    p.add_argument("--db-url", required=True)
    p.add_argument("--table", required=True)
    p.add_argument("--records", type=Path, required=True)
    p.add_argument("--mode", choices=["steady", "burst"], default="steady")
    p.add_argument("--jobs", type=int, default=0)
    p.add_argument("--spread", action="store_true")
    p.add_argument("--reuse", action="store_true", help="keep the stored jobs")
    p.add_argument("--max-seconds", type=float, default=3600)
    args = p.parse_args(argv)

    lines = _Lines(args.records)
    store = SQLAlchemyJobStore(url=args.db_url, tablename=args.table)
    scheduler = BackgroundScheduler(jobstores={"default": store}, timezone=UTC,
                                    job_defaults={"misfire_grace_time": GRACE})
    scheduler.add_listener(lines.on_event, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR
                           | EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES)
    if not args.reuse:
        _store_jobs(scheduler, store, args.mode, args.jobs, args.spread, lines)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    scheduler.start()
    lines.write("R", time.time())
    stop.wait(args.max_seconds)
    scheduler.shutdown(wait=False)
    lines.write("Q", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    os._exit(0)


# -- the parent's side ------------------------------------------------------------------------


class _Child:
    """One APScheduler child process and the file of its events."""

    def __init__(self, opts: Options, db_url: str, scenario: str, records: Path,
                 log: Path, *, mode: str = "steady", n: int = 0, reuse: bool = False) -> None:
        self.records = records
        command = [sys.executable, "-m", "bench.aps", "--db-url", db_url, "--table",
                   f"aps_bench_{scenario}", "--records", str(records), "--mode", mode,
                   "--jobs", str(n)]
        command += ["--spread"] if opts.spread else []
        command += ["--reuse"] if reuse else []
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, cwd=ROOT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def read_lines(path: Path) -> list[list[str]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [line.split() for line in text[: text.rfind("\n") + 1].splitlines() if line]


def header(path: Path, kind: str) -> list[float]:
    return [float(f[1]) for f in read_lines(path) if f[0] == kind]


def outcomes(path: Path) -> list[Fire]:
    status = {"E": "succeeded", "M": "missed", "S": "skipped", "X": "failed"}
    return [Fire(f[1], float(f[2]), status[f[0]], float(f[3]) if f[0] == "E" else None)
            for f in read_lines(path) if f[0] in status]


def _wait_first(path: Path, kind: str, count: int = 1, timeout: float = 120) -> float:
    deadline = time.time() + timeout
    while time.time() < deadline:
        values = header(path, kind)
        if len(values) >= count:
            return values[count - 1]
        time.sleep(0.05)
    raise AssertionError(f"the APScheduler child wrote no {kind!r} line in {timeout}s "
                         f"({path})")


def _drain(path: Path, expected: set[Key], timeout: float) -> bool:
    """Wait until every expected fire time has an outcome line. Polls cheaply (a line
    count) before parsing, so as not to take CPU from the child it measures."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        lines = path.read_text().count("\n") if path.exists() else 0
        if lines >= len(expected) and len({f.key for f in outcomes(path)} & expected) >= len(
                expected):
            return True
        time.sleep(0.25)
    return False


def _starts(n: int, spread: bool, t0: float) -> list[tuple[str, float]]:
    return [(f"aps-{i:07d}", t0 + o) for i, o in enumerate(offsets(n, spread))]


def steady(opts: Options, db_url: str, tmp: Path, sampler: RssSampler, *,
           name: str = "steady") -> Result:
    """``name``: its records' (a sweep's steps, bench/sweep.py, each have their own, and
    share one table)."""
    records = tmp / f"aps-{name}.txt"
    n = opts.aps_jobs or opts.jobs
    child = _Child(opts, db_url, "steady" if name == "steady" else "sweep", records,
                   opts.out / "logs" / f"aps-{name}.log", n=n)
    sampler.track("aps", child.proc.pid)
    try:
        t0 = _wait_first(records, "T")
        w0 = t0 + opts.warmup
        w1 = w0 + opts.duration
        expected = expected_keys(_starts(n, opts.spread, t0), w0, w1)
        sleep_until(w0)
        sampler.reset()
        sleep_until(w1)
        drained = _drain(records, expected, timeout=max(10.0, opts.duration / 2))
        peak = sampler.peak("aps")
    finally:
        child.stop()
    acc = account(outcomes(records), expected, w0, w1)
    result = Result("steady", SYSTEM, acc.fires_per_s, acc.lateness, peak)
    result.notes = [f"{n} jobs every 1s{' spread' if opts.spread else ''}",
                    *acc.notes()]
    if not drained:
        result.notes.append("did not catch up within the drain time")
    result.extra.update(acc.to_json(), offered_per_s=n, window_s=opts.duration)
    return result


def burst(opts: Options, db_url: str, tmp: Path, sampler: RssSampler) -> Result:
    records, n = tmp / "aps-burst.txt", opts.burst
    child = _Child(opts, db_url, "burst", records, opts.out / "logs" / "aps-burst.log",
                   mode="burst", n=n)
    sampler.track("aps", child.proc.pid)
    try:
        t0 = _wait_first(records, "T")
        sleep_until(t0)
        sampler.reset()
        expected = {fire_key(j, t) for j, t in _starts(n, False, t0)}
        done = _drain(records, expected, timeout=30 + n / 50)
        peak = sampler.peak("aps")
    finally:
        child.stop()
    fires = outcomes(records)
    starts = [f.started for f in fires if f.started is not None]
    span = max(starts) - t0 if starts else None
    result = Result("burst", SYSTEM, round(len(starts) / span, 1) if span else None,
                    Lateness.of(s - t0 for s in starts), peak)
    statuses = collections.Counter(f.status for f in fires)
    result.notes = [f"{n} due at once; {len(starts)} started"
                    + (f", all within {span:.2f}s" if span and done else "")]
    if statuses["missed"] or statuses["skipped"]:
        result.notes.append(f"{statuses['missed']} missed, {statuses['skipped']} skipped")
    result.extra.update(jobs=n, started=len(starts), all_started_s=span,
                        statuses=dict(statuses))
    return result


def failover(opts: Options, db_url: str, tmp: Path, sampler: RssSampler) -> Result:
    records, logs = tmp / "aps-failover.txt", opts.out / "logs"
    first_child = _Child(opts, db_url, "failover", records, logs / "aps-failover.log",
                         n=opts.jobs)
    sampler.track("aps", first_child.proc.pid)
    second: _Child | None = None
    try:
        t0 = _wait_first(records, "T")
        w0 = t0 + opts.warmup
        sleep_until(w0 + 2)
        sampler.reset()
        killed_at = time.time()
        first_child.proc.kill()
        first_child.proc.wait()
        second = _Child(opts, db_url, "failover", records, logs / "aps-failover.2.log",
                        reuse=True)
        sampler.track("aps", second.proc.pid)
        ready = _wait_first(records, "R", count=2)
        first_run = _wait_first_start(records, killed_at)
        w1 = max(w0 + opts.duration / 2, math.ceil(first_run) + 2.0)
        expected = expected_keys(_starts(opts.jobs, opts.spread, t0), w0, w1)
        sleep_until(w1)
        drained = _drain(records, expected, timeout=max(15.0, opts.duration))
        peak = sampler.peak("aps")
    finally:
        first_child.stop()
        if second is not None:
            second.stop()
    fires = outcomes(records)
    executions = collections.Counter(f.key for f in fires if f.status == "succeeded")
    acc = account(fires, expected, w0, w1, executions)
    left = undone(fires, expected, killed_at, first_run)
    result = Result("failover", SYSTEM, acc.fires_per_s, acc.lateness, peak)
    result.notes = [
        f"kill -9, restart (no standby): ready {ready - killed_at:.2f}s, first fire "
        f"{first_run - killed_at:.2f}s",
        left.note(), *acc.notes()]
    if not drained:
        result.notes.append("did not catch up within the drain time")
    result.extra.update(acc.to_json(), to_ready_s=ready - killed_at,
                        to_first_fire_s=first_run - killed_at, left_undone=left.count,
                        left_made_up=left.made_up,
                        left_worst_lateness_s=left.worst_lateness_s)
    return result


def _wait_first_start(path: Path, after: float, timeout: float = 120) -> float:
    deadline = time.time() + timeout
    while time.time() < deadline:
        starts = [f.started for f in outcomes(path) if f.started and f.started > after]
        if starts:
            return min(starts)
        time.sleep(0.05)
    raise AssertionError(f"no APScheduler run started after the restart within {timeout}s")


if __name__ == "__main__":
    sys.exit(child_main())
