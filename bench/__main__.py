"""``python -m bench``: qcluster against bare APScheduler 3.11, on one PostgreSQL, in one run.

    python -m bench all                       # full size (about 15 minutes on 2 cores)
    python -m bench all --quick               # small settings (under 2 minutes)
    python -m bench steady burst --db-url postgresql+psycopg://user@host/scratch
    python -m bench steady --jobs 5000 --spread --profile
    python -m bench report bench/out          # print and redraw a saved report

Scenarios (see ``bench/qc_scenarios.py`` and ``bench/aps.py`` for exactly what each one
measures): ``steady`` (``--jobs`` interval jobs every second for ``--duration`` s),
``burst`` (``--burst`` jobs due at one instant), ``failover`` (the steady load with the
leader killed by SIGKILL), ``sweep`` (the steady load at rising job counts, 10 s each:
the highest rate with p99 lateness under 100 ms, ``bench/sweep.py``), ``scale``
(``--scale`` stored jobs; qcluster only). Each runs on
qcluster (a real cluster: a leader, a standby and two workers, as ``qcluster start``
processes) and on bare APScheduler (a child process with a ``SQLAlchemyJobStore``).

Without ``--db-url`` a private PostgreSQL is started on loopback (``tests/servers``: it
needs the ``postgresql`` Debian package), with fsync on as in production (``--no-fsync``
runs it as the tests do). ``--db-url`` (``postgresql+psycopg://...``) must name a scratch
database: the bench creates qcluster's tables and ``aps_bench_*`` there, and empties or
drops them at the end. The machine should be otherwise idle: every figure is wall time.

Output: a table on the terminal, and in ``--out`` (default ``bench/out``): ``report.json``
(everything), ``report.md`` (the table), ``lateness.png`` (needs matplotlib), node logs in
``logs/``, and with ``--profile`` py-spy's flame graphs and top lists.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from rich.console import Console

from bench import aps, qc_scenarios, report, sweep
from bench.common import SCENARIOS, SYSTEMS, Options, Result, RssSampler, machine_info
from bench.pgstat import statements_available
from bench.profile import Profiler
from bench.qc import QcCluster

ROOT = Path(__file__).resolve().parent.parent
FULL = {"jobs": 2000, "duration": 60.0, "burst": 10_000, "scale": 1_000_000}
QUICK = {"jobs": 200, "duration": 10.0, "burst": 1000, "scale": 20_000}
APS_TABLES = ("aps_bench_steady", "aps_bench_burst", "aps_bench_failover",
              "aps_bench_sweep")

# Piped output (a CI log, a file) gets a width that fits the table on one line per row.
console = Console() if sys.stdout.isatty() else Console(width=200)


def parse_args(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenarios", nargs="*", default=["all"],
                   help=f"all (default) or some of: {', '.join(SCENARIOS)}")
    p.add_argument("--db-url", help="a scratch PostgreSQL database (SQLAlchemy URL)")
    p.add_argument("--quick", action="store_true", help="small settings: " + ", ".join(
        f"{k} {v:g}" for k, v in QUICK.items()))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out",
                   help="where the report, logs and profiles go (bench/out)")
    p.add_argument("--jobs", type=int, help=f"steady/failover jobs (default {FULL['jobs']})")
    p.add_argument("--duration", type=float, help="steady window, seconds (default 60)")
    p.add_argument("--burst", type=int, help="burst jobs (default 10000)")
    p.add_argument("--scale", type=int, help="scale: stored jobs (default 1000000)")
    p.add_argument("--spread", action="store_true",
                   help="spread steady fire times over the second (default: all on it)")
    p.add_argument("--no-fsync", action="store_true",
                   help="private PostgreSQL without fsync (as the tests run it)")
    p.add_argument("--lease", type=float, default=5.0, help="dblock lease seconds (5)")
    p.add_argument("--concurrency", type=int, default=16, help="threads per worker (16)")
    p.add_argument("--aps-jobs", type=int, default=0,
                   help="steady on APScheduler: jobs every second (default: --jobs); a "
                        "lower rate shows the rate APScheduler keeps up with")
    p.add_argument("--fire-ahead", type=float, default=0.0,
                   help="qcluster's [scheduler] fire_ahead_seconds (default 0: off)")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help="comma-separated: qcluster, apscheduler")
    p.add_argument("--metrics", action="store_true",
                   help="each qcluster node serves /metrics ([metrics] port), scraped every "
                        "second during the run (what the endpoint costs)")
    p.add_argument("--children", type=float, default=0.0,
                   help="steady: this share of --jobs more jobs (0.1: 10%%), each running "
                        "after one of the jobs (jobs add --after): what the leader's "
                        "dependency checks cost")
    p.add_argument("--tagged", type=float, default=0.0,
                   help="steady: this share of the jobs (0.1: 10%%) asks for the tag "
                        "'bench' (jobs add --tags), which both workers have: what routing "
                        "by tags costs the dispatcher")
    p.add_argument("--profile", action="store_true",
                   help="py-spy on the leader and a worker during qcluster's steady window")
    a = p.parse_args(argv)
    for flag in ("jobs", "duration", "burst", "scale", "concurrency", "lease"):
        value = getattr(a, flag)
        if value is not None and not value > 0:
            p.error(f"--{flag} must be above 0, not {value}")
    for flag in ("aps_jobs", "fire_ahead", "children", "tagged"):
        if getattr(a, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must not be below 0")
    if a.tagged > 1:
        p.error("--tagged is a share of the jobs: 0 to 1")
    names = set(a.scenarios)
    unknown = names - {*SCENARIOS, "all"}
    systems = tuple(s.strip() for s in a.systems.split(",") if s.strip())
    if unknown or not set(systems) <= set(SYSTEMS) or not systems:
        p.error(f"unknown scenario or system: {sorted(unknown) or systems}")
    sizes = QUICK if a.quick else FULL
    return Options(
        scenarios=tuple(s for s in SCENARIOS if "all" in names or s in names),
        systems=systems, db_url=a.db_url, out=a.out.resolve(), quick=a.quick,
        jobs=a.jobs or int(sizes["jobs"]), duration=a.duration or sizes["duration"],
        burst=a.burst or int(sizes["burst"]), scale=a.scale or int(sizes["scale"]),
        spread=a.spread, no_fsync=a.no_fsync, lease=a.lease, concurrency=a.concurrency,
        profile=a.profile, fire_ahead=a.fire_ahead, aps_jobs=a.aps_jobs, metrics=a.metrics,
        children=a.children, tagged=a.tagged,
    )


def _attempt(scenario: str, system: str, fn: Callable[[], Result], out: Path) -> Result:
    console.print(f"[bold]{scenario}[/bold] on {system} ...")
    began = time.time()
    try:
        result = fn()
    except Exception as e:
        with open(out / "logs" / "errors.txt", "a") as f:
            f.write(f"--- {scenario} on {system}\n{traceback.format_exc()}\n")
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        result = Result(scenario, system, error=f"{type(e).__name__}: {first}"[:300])
    result.extra["elapsed_s"] = round(time.time() - began, 1)
    console.print(f"  {'; '.join(result.notes) or result.error}")
    return result


def _database(opts: Options, stack: contextlib.ExitStack) -> tuple[str, str]:
    """The URL to use, and a description of the database for the report."""
    if opts.db_url is None:
        from tests.servers import PostgresServer
        from tests.servers.base import ServerError

        # Durable commits by default, as in production: the tests' server turns fsync
        # off, which flatters a store that commits once per job (APScheduler's).
        fsync = "off" if opts.no_fsync else "on"
        settings = {"fsync": fsync, "full_page_writes": fsync}
        if statements_available():  # what the database spends its time on (bench/pgstat.py)
            settings["shared_preload_libraries"] = "pg_stat_statements"
        try:
            pg = stack.enter_context(PostgresServer(settings=settings))
        except ServerError as e:
            raise SystemExit(f"error: no --db-url, and no private PostgreSQL: {e}") from e
        url, where = pg.create_database("qcbench"), f"private PostgreSQL (fsync={fsync})"
    else:
        url, where = opts.db_url, "PostgreSQL at --db-url"
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            if conn.dialect.name != "postgresql":
                raise SystemExit("error: the benchmark needs PostgreSQL (--db-url)")
            version = conn.execute(sa.text("SHOW server_version")).scalar()
            if sa.inspect(conn).has_table("qc_jobs") and conn.execute(
                    sa.text("SELECT count(*) FROM qc_jobs")).scalar():
                raise SystemExit("error: qc_jobs is not empty; give --db-url a scratch database")
    finally:
        engine.dispose()
    return url, f"{where}, version {version}"


def _cleanup(url: str) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            for table in APS_TABLES:
                conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
            if sa.inspect(conn).has_table("qc_jobs"):
                conn.execute(sa.text("TRUNCATE qc_jobs, qc_runs, qc_job_deps"))
    finally:
        engine.dispose()


def run(opts: Options, argv: list[str]) -> dict[str, Any]:
    started = datetime.now(UTC).isoformat(timespec="seconds")
    began = time.time()
    (opts.out / "logs").mkdir(parents=True, exist_ok=True)
    for old in (opts.out / "logs").glob("*.*"):
        if old.is_file():
            old.unlink()
    results: list[Result] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qc-bench-")))
        url, database = _database(opts, stack)
        machine = {**machine_info(), "database": database}
        stack.callback(_cleanup, url)
        sampler = stack.enter_context(RssSampler())
        if "apscheduler" in opts.systems:
            for name in ("steady", "burst", "failover"):
                if name in opts.scenarios:
                    fn = functools.partial(getattr(aps, name), opts, url, tmp, sampler)
                    results.append(_attempt(name, aps.SYSTEM, fn, opts.out))
            if "sweep" in opts.scenarios:
                step = functools.partial(aps.steady, db_url=url, tmp=tmp, sampler=sampler)
                results.append(_attempt("sweep", aps.SYSTEM, functools.partial(
                    sweep.sweep, aps.SYSTEM, opts, lambda o, n: step(o, name=n)), opts.out))
        if "qcluster" in opts.systems:
            results += _qcluster(opts, url, tmp, sampler, stack)
    _compare(results)
    return report.build(machine, opts.to_json(), results, started, time.time() - began,
                        argv)


def _compare(results: list[Result]) -> None:
    """What a user compares, noted on qcluster's rows: at equal load (steady), APScheduler's
    lateness over qcluster's at each quantile; in the sweep, qcluster's highest rate under
    the bound over APScheduler's."""
    by = {(r.scenario, r.system): r for r in results if r.error is None}
    qc, ap = by.get(("steady", qc_scenarios.SYSTEM)), by.get(("steady", aps.SYSTEM))
    if qc and ap and qc.lateness and ap.lateness:
        ratios = [f"{k} {getattr(ap.lateness, k) / max(getattr(qc.lateness, k), 1e-3):.1f}x"
                  for k in ("p50", "p95", "p99", "max")]
        qc.notes.append("APScheduler's lateness over qcluster's: " + ", ".join(ratios))
        qc.extra["aps_over_qcluster"] = ratios
    qc, ap = by.get(("sweep", qc_scenarios.SYSTEM)), by.get(("sweep", aps.SYSTEM))
    if qc and ap and qc.fires_per_s:
        ratio = (f"{qc.fires_per_s / ap.fires_per_s:.1f}x APScheduler's"
                 if ap.fires_per_s else "APScheduler kept none of the steps under the bound")
        qc.notes.append(f"highest rate under the bound: {ratio}")


def _qcluster(opts: Options, url: str, tmp: Path, sampler: RssSampler,
              stack: contextlib.ExitStack) -> list[Result]:
    system = qc_scenarios.SYSTEM
    try:
        console.print("starting the qcluster cluster (2 schedulers, 2 workers) ...")
        cluster = stack.enter_context(QcCluster(opts, url, tmp, sampler))
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return [Result(s, system, error=f"cluster did not start: {first}"[:300])
                for s in opts.scenarios]
    profiler = Profiler(opts.out)
    hook = None
    if opts.profile:
        if profiler.available:
            hook = profiler.hook({"leader": cluster.leader_pid,
                                  "worker": lambda: cluster.nodes["w1"].pid})
        else:
            console.print("[yellow]--profile needs py-spy: pip install py-spy[/yellow]")
    runs: dict[str, Callable[[], Result]] = {
        "steady": lambda: qc_scenarios.steady(cluster, opts, sampler, hook),
        "burst": lambda: qc_scenarios.burst(cluster, opts, sampler, hook),
        "failover": lambda: qc_scenarios.failover(cluster, opts, sampler, tmp),
        "sweep": lambda: sweep.sweep(system, opts, lambda o, n: qc_scenarios.steady(
            cluster, o, sampler, name=n)),
        "scale": lambda: qc_scenarios.scale(cluster, opts, sampler),
    }
    results = [_attempt(name, system, runs[name], opts.out) for name in opts.scenarios]
    for path in profiler.finish():
        console.print(f"profile: {path}")
    return results


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["report"]:
        out = Path(args[1]) if len(args) > 1 else ROOT / "bench" / "out"
        data = json.loads((out / "report.json").read_text())
    else:
        opts = parse_args(args)
        data = run(opts, args)
        out = opts.out
    for warning in report.write(data, out):
        console.print(f"[yellow]{warning}[/yellow]")
    report.print_table(data, console)
    console.print(f"written: {out / 'report.json'}, {out / 'report.md'}"
                  + ("" if not (out / "lateness.png").exists() else f", {out / 'lateness.png'}"))
    failed = [r for r in data["results"] if r.get("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
