"""What every scenario shares: the options, the result record, lateness statistics, the
machine description, and a resident-memory sampler.

Lateness is always *start of the job's code minus its scheduled fire time*, in seconds
internally and in milliseconds in the report. Percentiles interpolate linearly between
the two nearest samples (numpy's default), so p50 of [1, 2] is 1.5.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

SCENARIOS = ("steady", "burst", "failover", "sweep", "scale")
SYSTEMS = ("qcluster", "apscheduler")
#: Scenarios that only make sense for qcluster (bare APScheduler has no leader to fail
#: over to and keeps no job list that a CLI could page through).
QCLUSTER_ONLY = ("scale",)


@dataclasses.dataclass(frozen=True)
class Options:
    """The settings of one benchmark run, parsed once from the command line."""

    scenarios: tuple[str, ...]
    systems: tuple[str, ...]
    db_url: str | None
    out: Path
    quick: bool
    jobs: int  # steady and failover: interval jobs firing every second
    duration: float  # steady: the measured window, in seconds
    burst: int  # burst: jobs due at one instant
    scale: int  # scale: stored jobs
    spread: bool  # steady: spread fire times over the second instead of all on it
    no_fsync: bool  # the private PostgreSQL runs without fsync
    lease: float  # dblock lease seconds: bounds the failover gap
    concurrency: int  # threads per qcluster worker
    profile: bool
    fire_ahead: float = 0.0  # qcluster's scheduler.fire_ahead_seconds
    aps_jobs: int = 0  # steady on APScheduler: jobs every second (0: as many as qcluster)
    metrics: bool = False  # each node serves /metrics, scraped every second
    children: float = 0.0  # steady: this share of --jobs more, each running after one job
    tagged: float = 0.0  # steady: this share of the jobs asks for a tag (both workers have it)

    @property
    def warmup(self) -> float:
        """Whole seconds of firing before the measured window opens."""
        return float(min(5, max(1, math.ceil(self.duration / 5))))

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["out"] = str(self.out)
        data["db_url"] = "<private>" if self.db_url is None else redact(self.db_url)
        data["warmup"] = self.warmup
        return data


@dataclasses.dataclass
class Lateness:
    """Start minus scheduled time over ``n`` runs, in milliseconds."""

    n: int
    p50: float
    p95: float
    p99: float
    max: float
    mean: float
    #: p0, p1, ..., p100: enough to redraw the distribution from the JSON alone.
    percentiles: list[float]

    @classmethod
    def of(cls, seconds: Iterable[float]) -> Lateness | None:
        values = sorted(s * 1000.0 for s in seconds)
        if not values:
            return None
        pct = [round(percentile(values, q), 3) for q in range(101)]
        return cls(n=len(values), p50=pct[50], p95=pct[95], p99=pct[99], max=values[-1],
                   mean=sum(values) / len(values), percentiles=pct)


@dataclasses.dataclass
class Result:
    """One row of the report: a scenario run on one system."""

    scenario: str
    system: str
    fires_per_s: float | None = None
    lateness: Lateness | None = None
    peak_rss_mb: float | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    #: Every count and time the scenario measured, by name (seconds unless named _ms).
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ascending ``sorted_values``, interpolated."""
    if not sorted_values:
        raise ValueError("no values")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def redact(url: str) -> str:
    from qcluster.settings import redact_url

    return redact_url(url)


def fire_key(job_id: str, scheduled: float) -> tuple[str, float]:
    """The identity of one fire time. A job's own fire times are at least 1 s apart, so
    milliseconds absorb the float noise of a round trip through datetime."""
    return job_id, round(scheduled, 3)


def spread_offsets(n: int, spread: bool) -> list[float]:
    """Each job's offset from the whole second: 0 for all, or ``i / n`` (in whole
    microseconds, which is what a stored trigger keeps) with ``spread``."""
    return [round(i / n, 6) if spread else 0.0 for i in range(n)]


def sleep_until(t: float) -> None:
    delay = t - time.time()
    if delay > 0:
        time.sleep(delay)


# -- the machine -----------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """Cores, CPU model, memory, OS and versions: the context every figure needs."""
    import apscheduler

    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "cores": os.cpu_count(), "cpu": model, "memory_gb": mem_gb,
        "os": platform.platform(), "python": platform.python_version(),
        "apscheduler": apscheduler.__version__, "load_at_start": [round(x, 2) for x in load],
    }


def describe_machine(m: Mapping[str, Any]) -> str:
    return (f"{m['cores']} cores, {m['cpu']}, {m['memory_gb']} GB RAM; {m['os']}; Python "
            f"{m['python']}; APScheduler {m['apscheduler']}; {m.get('database', '')}; load "
            f"average at start {m['load_at_start'][0]}")


# -- resident memory ---------------------------------------------------------------------------


def rss_mb(pid: int) -> float | None:
    """VmRSS of ``pid`` in MB (Linux), or None if it has gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        return None
    return None


class RssSampler:
    """Samples the resident memory of labelled processes every ``interval`` s, keeping the
    peak of each label since the last :meth:`reset`. A label may move to another pid
    (a new leader): the peak is over whichever pid carried it."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self._pids: dict[str, Callable[[], int | None]] = {}
        self._peaks: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def track(self, label: str, pid: int | Callable[[], int | None]) -> None:
        with self._lock:
            self._pids[label] = pid if callable(pid) else (lambda: pid)

    def forget(self, label: str) -> None:
        with self._lock:
            self._pids.pop(label, None)

    def reset(self) -> None:
        with self._lock:
            self._peaks.clear()
        self.sample()

    def peak(self, label: str) -> float | None:
        self.sample()
        with self._lock:
            value = self._peaks.get(label)
        return None if value is None else round(value, 1)

    def sample(self) -> None:
        with self._lock:
            sources = list(self._pids.items())
        for label, source in sources:
            pid = source()
            value = None if pid is None else rss_mb(pid)
            if value is not None:
                with self._lock:
                    self._peaks[label] = max(value, self._peaks.get(label, 0.0))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(2)
