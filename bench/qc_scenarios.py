"""The scenarios on qcluster: steady, burst, failover under load, and scale.

Every figure comes from the runs table, whose times are epoch seconds written by the
processes themselves: ``scheduled_at`` (the fire time), ``created_at`` (the leader
recorded the run), ``started_at`` (the worker entered the job function). Lateness is
``started_at - scheduled_at``. The job is ``jobs.builtin:noop`` except in the failover
scenario, whose job, ``jobs.examples:record_run``, appends one line per execution to a
file, so that executions are counted from the job's side as well as from the table.
Steady and burst also split the lateness into stages (:meth:`QcCluster.stages`): until
the leader builds the run row, until a worker has claimed it, until the job starts.

* **steady**: ``--jobs`` interval jobs every second, all anchored on the whole second (or
  spread evenly over it with ``--spread``). After ``warmup`` seconds of firing, the window
  [W0, W0 + duration) is measured: fires/s = runs that succeeded with a start inside the
  window, divided by its length; lateness over the runs of fire times inside the window.
  After the window the bench waits (bounded) until the leader has recorded every fire time
  of the window and the workers have finished them, so a leader that falls behind shows up
  as lateness or as open/absent fire times, not as a shorter list.
* **burst**: ``--burst`` one-shot (date) jobs due at the same instant T. Reported: the time
  from T until the last one started, fires/s = jobs / that time, and lateness.
* **failover**: the steady load with ``coalesce = false``; two seconds into the window the
  leader is killed with SIGKILL and the standby takes over (within ``--lease`` s). The
  window lasts half the steady duration, and at least until 2 s after the new leader's
  first fire. Every fire time of the window must end as one run: the fires the dead leader
  missed are made up late by the new one.
  Reported: time to the new leader and to its first fire; the fires left undone by the kill
  (due before the new leader's first fire and not started before the kill), how many were
  made up and how late the last one; fire times that ran twice (counted from the job's own
  records, since the run key would hide a second row); fire times with no outcome at all.
* **scale**: ``--scale`` stored jobs (all but ten with a next run 30 days ahead; ten tick
  every second), loaded by COPY and then ANALYZEd (as autovacuum would soon do). Reported:
  the COPY rate; the leader's peak RSS (VmRSS sampled every 0.25 s while it fires the
  ticks, and again for the new leader after the failover); the wall time of ``qcluster
  jobs list --limit 50`` (a whole CLI process, interpreter start included; median of 3)
  and of its query alone; after killing the leader, the time from the new leader winning
  (``leader_since``, on the database clock) to its first recorded fire. The row's
  lateness is the ticks' before the kill: a sanity check that firing goes on.
"""

from __future__ import annotations

import collections
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import pgstat
from bench.common import (
    Lateness,
    Options,
    Result,
    RssSampler,
    fire_key,
    sleep_until,
    spread_offsets,
)
from bench.cpu import CpuMeter
from bench.fires import Key, account, expected_keys, undone
from bench.qc import QcCluster, date_spec, interval_spec, job_row
from qcluster.store import catalog
from tests.helpers import read_records, run_cli, wait_for

Profile = Callable[[str, float], None]
SYSTEM = "qcluster"
TICKS = 10


def _start_time(n: int) -> float:
    """A whole second far enough ahead for n jobs to be stored and seen by the leader."""
    return float(math.ceil(time.time() + 1.5 + n * 2e-5))


def _drain(cluster: QcCluster, prefix: str, until: float, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cluster.caught_up(prefix, until):
            return True
        time.sleep(0.25)
    return False


def _peaks(sampler: RssSampler, result: Result) -> None:
    result.peak_rss_mb = sampler.peak("leader")
    result.extra["worker_peak_rss_mb"] = [sampler.peak("w1"), sampler.peak("w2")]


#: The ids of ``--children`` jobs: not under the steady jobs' prefix, which the accounting
#: of fire times reads.
CHILD_PREFIX = "child-"


def steady(cluster: QcCluster, opts: Options, sampler: RssSampler,
           profile: Profile | None = None, *, name: str = "steady") -> Result:
    """``name``: the jobs' prefix (a sweep's steps, bench/sweep.py, each have their own)."""
    prefix, n = f"{name}-", opts.jobs
    t0 = _start_time(n)
    offsets = spread_offsets(n, opts.spread)
    ids = [f"{prefix}{i:07d}" for i in range(n)]
    cluster.insert_jobs(job_row(i, "jobs.builtin:noop", interval_spec(1.0, t0 + o), t0 + o)
                        for i, o in zip(ids, offsets, strict=True))
    tagged = round(n * opts.tagged)
    if tagged:  # spread over the jobs: every k-th one asks for the tag
        cluster.tag_jobs(ids[:: max(1, n // tagged)][:tagged])
    kids = round(n * opts.children)
    if kids:  # spread over the jobs: every k-th job has a child
        cluster.insert_children(ids[:: max(1, n // kids)][:kids], CHILD_PREFIX)
    w0 = t0 + opts.warmup
    w1 = w0 + opts.duration
    sleep_until(w0)
    sampler.reset()
    if profile is not None:
        profile("steady", opts.duration)
    meter = CpuMeter()
    statements = pgstat.reset(cluster.db.engine)
    meter.start()
    sleep_until(w1)
    meter.stop()
    if statements:
        _write_statements(opts.out / f"pg-statements-{name}.txt", pgstat.top(cluster.db.engine))
    drained = _drain(cluster, prefix, w1, timeout=max(10.0, opts.duration / 2))
    result = Result("steady", SYSTEM)
    _peaks(sampler, result)
    by_second = cluster.by_second(prefix, t0)
    cluster.remove_jobs(prefix)
    expected = expected_keys([(i, t0 + o) for i, o in zip(ids, offsets, strict=True)], w0, w1)
    # From before W0 too: a fire time of the warm-up that starts inside the window counts
    # in the rate, as it does for APScheduler.
    acc = account(cluster.fires(prefix, w0 - 60, w1), expected, w0, w1)
    result.fires_per_s, result.lateness = acc.fires_per_s, acc.lateness
    result.notes = [f"{n} jobs every 1s{' spread' if opts.spread else ''}"
                    f"{f', {opts.tagged:.0%} of them tagged' if tagged else ''}", *acc.notes()]
    if kids:
        _drain(cluster, CHILD_PREFIX, w1, timeout=10.0)
        result.extra["children"] = chained = cluster.chained(CHILD_PREFIX, w0, w1)
        delay = chained.get("delay_ms", {})
        result.notes.append(
            f"{kids} children ({opts.children:.0%}): {chained['runs']} runs "
            f"{chained['by_status']}, parent end -> child start p50 {delay.get('p50')} ms, "
            f"p99 {delay.get('p99')} ms")
        cluster.remove_jobs(CHILD_PREFIX)
    if profile is not None:
        result.notes.append("under py-spy")
    if not drained:
        result.notes.append("did not catch up within the drain time")
    result.extra.update(acc.to_json(), offered_per_s=n, window_s=opts.duration,
                        stages_ms=cluster.stages(prefix, w0, w1))
    result.notes.append(_stages_note(result.extra["stages_ms"]))
    _cpu(cluster, meter, round(acc.fires_per_s * opts.duration), result)
    result.extra["by_second"] = by_second
    scraper = cluster.scraper
    if scraper is not None:
        result.notes.append(f"/metrics of each node read every {scraper.interval:g}s: "
                            f"{scraper.scrapes} reads, {scraper.failures} failed")
    return result


def _write_statements(path: Path, rows: list[dict[str, Any]]) -> None:
    """The database's top statements of the window, one per line."""
    total = sum(r["total_ms"] for r in rows) or 1.0
    lines = [f"{r['total_ms'] / total * 100:5.1f}%  {r['total_ms']:9.1f} ms  "
             f"{r['calls']:7d} calls  {r['mean_ms']:7.3f} ms/call  {r['max_ms']:7.1f} max  "
             f"{r['blocks_per_call']:6d} blk/call  {r['rows']:8d} rows  "
             f"{r['query']}" for r in rows]
    path.write_text("PostgreSQL statements of the steady window, by total execution time "
                    "(pg_stat_statements; % of these)\n" + "\n".join(lines) + "\n")


def _cpu(cluster: QcCluster, meter: CpuMeter, fires: int, result: Result) -> None:
    """CPU per fire and share of a core of each part, over the window (bench/cpu.py):
    the leader, each worker with its slot processes, PostgreSQL."""
    state = cluster.state()
    roles = {} if state is None or state.leader_id is None else {state.leader_id: "leader"}
    per_fire = meter.per_fire_us(fires, roles)
    result.extra["cpu_us_per_fire"] = per_fire
    result.extra["cpu_share_pct"] = meter.shares()
    parts = [f"{k} {v:.0f}" for k, v in per_fire.items() if k in ("leader", "w1", "w2",
                                                                   "slots", "postgres")]
    if parts:
        result.notes.append("CPU µs/fire: " + ", ".join(parts))


def burst(cluster: QcCluster, opts: Options, sampler: RssSampler,
          profile: Profile | None = None) -> Result:
    prefix, n = "burst-", opts.burst
    t0 = _start_time(n)
    spec = date_spec(t0)
    cluster.insert_jobs(job_row(f"{prefix}{i:07d}", "jobs.builtin:noop", spec, t0)
                        for i in range(n))
    if profile is not None:
        sleep_until(t0 - 0.5)
        profile("burst", 2 + n / 2000)
    sleep_until(t0)
    sampler.reset()

    done = True
    try:
        wait_for(lambda: cluster.settled(prefix, t0, t0 + 1) >= n, timeout=30 + n / 100,
                 interval=0.2, what="the burst")
    except AssertionError:
        done = False
    result = Result("burst", SYSTEM)
    _peaks(sampler, result)
    fires = cluster.fires(prefix)
    cluster.remove_jobs(prefix)
    starts = [f.started for f in fires if f.started is not None]
    result.lateness = Lateness.of(s - t0 for s in starts)
    span = max(starts) - t0 if starts else None
    statuses = collections.Counter(f.status for f in fires)
    result.fires_per_s = round(len(starts) / span, 1) if span else None
    result.notes = [f"{n} due at once; {len(starts)} started"
                    + (f", all within {span:.2f}s" if span and done else "")]
    if statuses["missed"]:
        result.notes.append(f"{statuses['missed']} missed")
    if profile is not None:
        result.notes.append("under py-spy")
    result.extra.update(jobs=n, started=len(starts), all_started_s=span,
                        statuses=dict(statuses), stages_ms=cluster.stages(prefix, t0, t0 + 1))
    result.notes.append(_stages_note(result.extra["stages_ms"]))
    return result


def failover(cluster: QcCluster, opts: Options, sampler: RssSampler, tmp: Path) -> Result:
    prefix, n = "failover-", opts.jobs
    records = tmp / "failover-records.jsonl"
    t0 = _start_time(n)
    offsets = spread_offsets(n, opts.spread)
    ids = [f"{prefix}{i:07d}" for i in range(n)]
    # coalesce off: each fire time the dead leader missed must be run, not folded into one.
    cluster.insert_jobs(
        job_row(i, "jobs.examples:record_run", interval_spec(1.0, t0 + o), t0 + o,
                args=[str(records)], coalesce=False)
        for i, o in zip(ids, offsets, strict=True))
    w0 = t0 + opts.warmup
    sleep_until(w0 + 2)
    sampler.reset()
    old, killed_at = cluster.kill_leader()
    new = cluster.wait_leader(after_epoch=old.epoch)
    first = cluster.wait_first_fire_after(old.epoch, killed_at, timeout=60)
    w1 = max(w0 + opts.duration / 2, math.ceil(first) + 2.0)
    sleep_until(w1)
    drained = _drain(cluster, prefix, w1, timeout=max(15.0, opts.duration))
    result = Result("failover", SYSTEM)
    _peaks(sampler, result)
    cluster.remove_jobs(prefix)
    cluster.restart(old.leader_id or "")
    expected = expected_keys([(i, t0 + o) for i, o in zip(ids, offsets, strict=True)], w0, w1)
    executions: collections.Counter[Key] = collections.Counter(
        fire_key(r["job_id"], r["scheduled_at"]) for r in read_records(records))
    fires = cluster.fires(prefix, w0 - 60, w1)
    acc = account(fires, expected, w0, w1, executions)
    left = undone(fires, expected, killed_at, first)
    ran_rows = sum(1 for f in fires if f.key in expected and f.started is not None)
    ran_jobs = sum(1 for k in expected if executions[k])
    result.fires_per_s, result.lateness = acc.fires_per_s, acc.lateness
    result.notes = [
        f"kill -9 leader -> new leader {new.leader_since and new.leader_since - killed_at:.2f}s,"
        f" first fire {first - killed_at:.2f}s",
        left.note(), *acc.notes()]
    if not drained:
        result.notes.append("did not catch up within the drain time")
    result.extra.update(
        acc.to_json(), killed=old.leader_id, old_epoch=old.epoch, new_epoch=new.epoch,
        to_new_leader_s=(new.leader_since or 0) - killed_at,
        to_first_fire_s=first - killed_at, left_undone=left.count,
        left_made_up=left.made_up, left_worst_lateness_s=left.worst_lateness_s,
        ran_per_run_rows=ran_rows, ran_per_job_records=ran_jobs,
        lease_s=opts.lease)
    return result


def scale(cluster: QcCluster, opts: Options, sampler: RssSampler) -> Result:
    prefix, n = "scale-", max(opts.scale, TICKS)
    result = Result("scale", SYSTEM)
    far = math.ceil(time.time()) + 30 * 86400.0
    spec = interval_spec(86400.0, far)
    began = time.time()
    cluster.insert_jobs(job_row(f"{prefix}{i:08d}", "jobs.builtin:noop", spec, far)
                        for i in range(n - TICKS))
    copy_s = time.time() - began
    cluster.execute("ANALYZE qc_jobs")
    t0 = _start_time(0)
    cluster.insert_jobs(job_row(f"{prefix}tick-{i}", "jobs.builtin:noop",
                                interval_spec(1.0, t0), t0) for i in range(TICKS))
    sampler.reset()
    wait_for(lambda: cluster.settled(f"{prefix}tick-", t0, t0 + 3600), timeout=60,
             interval=0.2, what="the first tick")
    observe = max(2.0, min(10.0, opts.duration / 3))
    time.sleep(observe)
    list_cli = [_time(lambda: run_cli("jobs", "list", "--limit", "50", config=cluster.config))
                for _ in range(3)]
    list_query = [_time(lambda: _list_query(cluster)) for _ in range(3)]
    old_peak = sampler.peak("leader")
    old, killed_at = cluster.kill_leader()
    new = cluster.wait_leader(after_epoch=old.epoch)
    sampler.reset()
    first = cluster.wait_first_fire_after(old.epoch, killed_at)
    time.sleep(observe)
    new_peak = sampler.peak("leader")
    first_start = cluster.first_start_after(old.epoch, killed_at)
    ticks = [f for f in cluster.fires(f"{prefix}tick-", t0) if f.started is not None]
    before = [f.started - f.scheduled for f in ticks if f.started and f.scheduled < killed_at]
    after = Lateness.of(f.started - f.scheduled for f in ticks
                        if f.started and f.scheduled >= killed_at)
    cluster.restart(old.leader_id or "")
    cluster.execute("TRUNCATE qc_jobs")
    won = new.leader_since or killed_at
    result.peak_rss_mb = max(x for x in (old_peak, new_peak, 0.0) if x is not None)
    result.lateness = Lateness.of(before)  # the ticks, while 1M jobs wait
    result.notes = [
        f"{n:,} jobs stored ({n / copy_s:,.0f} rows/s by COPY)",
        f"jobs list --limit 50: CLI {statistics.median(list_cli):.2f}s, query "
        f"{statistics.median(list_query) * 1000:.0f}ms",
        f"new leader's first fire {first - won:.2f}s after winning",
        f"leader RSS {old_peak} MB, after failover {new_peak} MB"]
    result.extra.update(
        jobs=n, copy_s=copy_s, jobs_list_cli_s=list_cli, jobs_list_query_s=list_query,
        leader_rss_mb=old_peak, new_leader_rss_mb=new_peak, first_fire_after_win_s=first - won,
        first_start_after_win_s=None if first_start is None else first_start - won,
        ticks_after_failover_ms=None if after is None else {"p50": after.p50, "max": after.max},
        kill_to_new_leader_s=won - killed_at, worker_peak_rss_mb=[sampler.peak("w1"),
                                                                  sampler.peak("w2")])
    return result


def _stages_note(stages: dict[str, dict[str, float]]) -> str:
    parts = [f"{name} {v['p50']:.0f}" for name, v in stages.items()]
    return "p50 ms by stage: " + ", ".join(parts) if parts else "no stages"


def _time(fn: Callable[[], Any]) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def _list_query(cluster: QcCluster) -> list[dict[str, Any]]:
    with cluster.db.read() as conn:
        return catalog.list_jobs(conn, limit=50)
