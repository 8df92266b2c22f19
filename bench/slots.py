"""``python -m bench.slots``: what running each job in a slot process costs, against calling
it in a thread of the worker as the worker did before (issue 15, item 2).

    python -m bench.slots                    # 20,000 no-op runs at concurrency 1 and 8
    python -m bench.slots --runs 5000 --concurrency 1 4 --json

For each concurrency ``c`` it runs ``--runs`` no-op runs (``jobs.builtin:noop``) on ``c``
threads, each thread driving one slot (:class:`qcluster.worker.slots.Slot`, the worker's
own code: a framed msgpack request, the child's ``current_run`` and call, the reply), and
the same on ``c`` threads that call the function themselves (the former ``_run``: the
run context, the arguments' JSON, the call). Per run it prints wall time (total wall time
divided by runs: at ``c`` > 1, the throughput cost) and the CPU time of this process (all
its threads: what the worker pays), and for slots also the CPU time of the slot
processes (read from ``/proc/PID/stat`` before they end). The database is not involved:
the start and outcome writes are the same on both paths.

It also prints a slot's start time (``Slot.ensure``: a new process imports qcluster and
says it is ready; the mean of ``--starts``) and the resident memory of one idle slot
process after one run (``VmRSS`` of ``/proc/PID/status``). Figures are for this machine,
idle; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qcluster.definitions.imports import resolve_func
from qcluster.worker.context import RunContext, enter_run, leave_run
from qcluster.worker.slots import Slot

FUNC = "jobs.builtin:noop"


def request(run_id: int) -> dict[str, Any]:
    return {"op": "run", "run_id": run_id, "job_id": "bench", "func": FUNC, "args": "[]",
            "kwargs": "{}", "scheduled_at": time.time(), "attempt": 1, "epoch": 1,
            "worker_id": "bench"}


def in_thread(n: int) -> None:
    """``n`` runs as the worker ran them in its own threads."""
    func = resolve_func(FUNC)
    for i in range(n):
        req = request(i + 1)
        token = enter_run(RunContext(
            job_id=req["job_id"], run_id=req["run_id"],
            scheduled_at=datetime.fromtimestamp(req["scheduled_at"], UTC),
            attempt=req["attempt"], epoch=req["epoch"], worker_id=req["worker_id"]))
        try:
            func(*json.loads(req["args"]), **json.loads(req["kwargs"]))
        finally:
            leave_run(token)


def cpu_of(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def measure(concurrency: int, runs: int, body: Callable[[int, int], float]) -> dict[str, float]:
    """Run ``body(thread index, runs of that thread)`` on ``concurrency`` threads, started
    together; per run: wall µs, this process's CPU µs, and what the bodies return (other
    processes' CPU seconds) in µs."""
    share = runs // concurrency
    barrier = threading.Barrier(concurrency + 1)
    other: list[float] = [0.0] * concurrency

    def thread(i: int) -> None:
        barrier.wait()
        other[i] = body(i, share)

    threads = [threading.Thread(target=thread, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    cpu, wall = time.process_time(), time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    total = share * concurrency
    return {"runs": total, "wall_us": wall / total * 1e6, "cpu_us": cpu / total * 1e6,
            "child_cpu_us": sum(other) / total * 1e6}


def slot_body(ready: list[Slot]) -> Callable[[int, int], float]:
    def body(i: int, n: int) -> float:
        slot = ready[i]
        before = cpu_of(slot.pid or 0)
        for k in range(n):
            slot.run(request(k + 1), None)
        return cpu_of(slot.pid or 0) - before
    return body


def run_slots(concurrency: int, runs: int) -> dict[str, float]:
    slots: list[Slot] = []
    started = threading.Barrier(concurrency + 1)
    done = threading.Event()

    def owner() -> None:  # a slot lives as long as the thread that started it
        slot = Slot("bench")
        slot.ensure()
        slot.assign((1, 1))
        slot.run(request(0), None)  # the import of the job, once
        slots.append(slot)
        started.wait()
        done.wait()

    owners = [threading.Thread(target=owner, daemon=True) for _ in range(concurrency)]
    for t in owners:
        t.start()
    started.wait()
    try:
        # The slots are driven from other threads than their owners: Slot.run allows it
        # as long as one thread at a time runs each.
        return measure(concurrency, runs, slot_body(slots))
    finally:
        for slot in slots:
            slot.close()
        done.set()


def slot_start(times: int) -> dict[str, float]:
    starts = []
    rss_idle = rss_after = 0
    for _ in range(times):
        slot = Slot("bench")
        began = time.perf_counter()
        slot.ensure()
        starts.append(time.perf_counter() - began)
        rss_idle = rss_kib(slot.pid or 0)
        slot.assign((1, 1))
        slot.run(request(1), None)
        rss_after = rss_kib(slot.pid or 0)
        slot.close()
    return {"start_ms_mean": statistics.mean(starts) * 1e3,
            "start_ms_min": min(starts) * 1e3, "rss_kib_started": rss_idle,
            "rss_kib_after_a_run": rss_after}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.slots", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"cores": os.cpu_count(), "runs": args.runs, "paths": []}
    for c in args.concurrency:
        thread = measure(c, args.runs, lambda i, n: (in_thread(n), 0.0)[1])
        slot = run_slots(c, args.runs)
        results["paths"] += [{"path": "thread", "concurrency": c, **thread},
                             {"path": "slot process", "concurrency": c, **slot}]
    results["slot"] = slot_start(args.starts)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{args.runs} no-op runs each, {results['cores']} cores")
    print(f"{'path':<14}{'conc.':>6}{'wall µs/run':>13}{'worker CPU µs/run':>19}"
          f"{'slot CPU µs/run':>17}")
    for r in results["paths"]:
        child = f"{r['child_cpu_us']:.0f}" if r["path"] != "thread" else "-"
        print(f"{r['path']:<14}{r['concurrency']:>6}{r['wall_us']:>13.1f}"
              f"{r['cpu_us']:>19.1f}{child:>17}")
    s = results["slot"]
    print(f"slot start: {s['start_ms_mean']:.0f} ms mean, {s['start_ms_min']:.0f} ms min "
          f"(of {args.starts}); idle slot RSS: {s['rss_kib_started'] / 1024:.1f} MiB started, "
          f"{s['rss_kib_after_a_run'] / 1024:.1f} MiB after a run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
