"""``sweep``: the highest rate at which each system keeps p99 lateness under
:data:`BOUND_MS` (issue 18, item 4).

Steady load (one-second interval jobs, all due on the second, or ``--spread``) at rising
job counts, a short window each (:data:`STEP_SECONDS`), on one system at a time; the
sweep stops at the first step whose p99 reaches the bound or that leaves a fire unrun
(missed, open or absent). The result's row is the last step that passed: its rate and
lateness, and a note listing every step tried. A system that fails its first step has no
rate under the bound ("-").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from bench.common import Options, Result

BOUND_MS = 100.0
#: Jobs due every second, step by step: what a sweep tries, in order.
STEPS = (50, 100, 200, 300, 500, 700, 1000, 1500, 2000, 3000, 4000, 5000)
QUICK_STEPS = (5, 10)
STEP_SECONDS = 10.0
QUICK_STEP_SECONDS = 1.0


def sweep(system: str, opts: Options, step: Callable[[Options, str], Result]) -> Result:
    """Run ``step(options, name)`` (a steady run of ``options.jobs`` jobs, its records
    named ``name``) at each count of the sweep until one fails; the sweep's result."""
    steps = QUICK_STEPS if opts.quick else STEPS
    seconds = QUICK_STEP_SECONDS if opts.quick else STEP_SECONDS
    best: Result | None = None
    tried: list[str] = []
    stopped = ""
    for n in steps:
        r = step(dataclasses.replace(opts, jobs=n, aps_jobs=0, duration=seconds),
                 f"sweep-{n}")
        p99 = r.lateness.p99 if r.lateness is not None else None
        unrun = sum(int(r.extra.get(k, 0)) for k in ("missed", "open", "absent"))
        tried.append(f"{n}/s p99 {'-' if p99 is None else f'{p99:,.0f}'} ms"
                     + (f" ({unrun} not run)" if unrun else ""))
        if r.error or p99 is None or p99 >= BOUND_MS or unrun:
            stopped = r.error or ""
            break
        best = r
    result = Result("sweep", system)
    if best is not None:
        result.fires_per_s, result.lateness = best.fires_per_s, best.lateness
        result.peak_rss_mb = best.peak_rss_mb
        result.extra["jobs"] = best.extra.get("offered_per_s")
    result.notes = [
        f"highest rate with p99 < {BOUND_MS:g} ms: "
        + (f"{best.extra.get('offered_per_s')} jobs every 1s" if best else "none of the steps"),
        f"{seconds:g}s a step: " + ", ".join(tried)]
    if stopped:
        result.notes.append(f"the last step failed: {stopped}")
    result.extra["steps"] = tried
    return result
