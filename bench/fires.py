"""Accounting for fire times, the same way for qcluster and for bare APScheduler.

A scenario knows which fire times it expects (every job, every second of the window) and
collects what happened to each: a :class:`Fire` per observed outcome. qcluster gives one
run row per fire time (its unique key), plus one line per execution from
``jobs.examples:record_run`` when the scenario counts executions from the job side;
APScheduler gives one event per outcome, so a fire time run twice shows up twice.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

from bench.common import Lateness, fire_key

Key = tuple[str, float]

RAN = ("succeeded", "failed")


@dataclasses.dataclass(frozen=True)
class Fire:
    """What became of one fire time: ``succeeded``/``failed`` (it started at ``started``),
    ``missed`` (recorded as not run), ``skipped`` (APScheduler's max_instances) or
    ``open`` (still scheduled or running when the scenario stopped waiting)."""

    job_id: str
    scheduled: float
    status: str
    started: float | None = None

    @property
    def key(self) -> Key:
        return fire_key(self.job_id, self.scheduled)


def expected_keys(starts: Sequence[tuple[str, float]], lo: float, hi: float,
                  period: float = 1.0) -> set[Key]:
    """Fire times in [lo, hi) of jobs that fire every ``period`` s from their start."""
    keys: set[Key] = set()
    for job_id, start in starts:
        k = max(0, int((lo - start) // period))
        t = start + k * period
        while t < hi - 1e-9:
            if t >= lo - 1e-9:
                keys.add(fire_key(job_id, t))
            k += 1
            t = start + k * period
    return keys


@dataclasses.dataclass
class Accounting:
    """Every expected fire time, by what became of it."""

    expected: int
    ran: int
    missed: int
    skipped: int
    open: int
    absent: int  # no outcome at all: "silently absent"
    duplicates: int  # fire times that started more than once
    fires_per_s: float  # runs that succeeded with a start inside the window, per second
    lateness: Lateness | None  # over the runs of expected fire times that started

    def notes(self) -> list[str]:
        parts = [f"{self.ran}/{self.expected} ran"]
        for name in ("missed", "skipped", "open", "absent", "duplicates"):
            if getattr(self, name):
                parts.append(f"{getattr(self, name)} {name}")
        return [", ".join(parts)]

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("lateness")
        return data


def account(fires: Iterable[Fire], expected: set[Key], lo: float, hi: float,
            executions: collections.Counter[Key] | None = None) -> Accounting:
    """Classify the fires of ``expected`` keys; the rate counts starts in [lo, hi).

    ``executions`` (job-side counts per fire time) overrides the duplicate count taken
    from ``fires``; a fire time with several outcomes counts once, by its best outcome.
    """
    best: dict[Key, Fire] = {}
    started: collections.Counter[Key] = collections.Counter()
    lateness: list[float] = []
    in_window = 0
    rank = {"succeeded": 4, "failed": 4, "open": 3, "skipped": 2, "missed": 1}
    for fire in fires:
        key = fire.key
        if fire.status in RAN and fire.started is not None:
            if fire.status == "succeeded" and lo <= fire.started < hi:
                in_window += 1
            if key in expected:
                started[key] += 1
                lateness.append(fire.started - fire.scheduled)
        if key in expected and rank.get(fire.status, 0) > rank.get(
                best[key].status if key in best else "", 0):
            best[key] = fire
    counts = collections.Counter(f.status for f in best.values())
    dup_source = executions if executions is not None else started
    return Accounting(
        expected=len(expected),
        ran=counts["succeeded"] + counts["failed"],
        missed=counts["missed"], skipped=counts["skipped"], open=counts["open"],
        absent=len(expected) - len(best),
        duplicates=sum(1 for k, n in dup_source.items() if n > 1 and k in expected),
        fires_per_s=round(in_window / (hi - lo), 1) if hi > lo else 0.0,
        lateness=Lateness.of(lateness),
    )


@dataclasses.dataclass
class Undone:
    """The fire times a killed scheduler left undone: due before the survivor's first
    fire, and not started before the kill."""

    count: int
    made_up: int
    worst_lateness_s: float | None

    def note(self) -> str:
        worst = self.worst_lateness_s
        return (f"{self.count} fires left undone by the kill, {self.made_up} made up"
                + (f" (the last {worst:.1f}s late)" if worst is not None else ""))


def undone(fires: Iterable[Fire], expected: set[Key], killed_at: float,
           resumed_at: float) -> Undone:
    """Which expected fire times before ``resumed_at`` had not started at ``killed_at``,
    and how many of them started later (a duplicate counts once)."""
    due = {k for k in expected if k[1] < resumed_at}
    started_before: set[Key] = set()
    later: dict[Key, float] = {}  # fire time -> lateness of its first start after the kill
    for f in fires:
        if f.key not in due or f.started is None:
            continue
        if f.started < killed_at:
            started_before.add(f.key)
        else:
            later[f.key] = min(later.get(f.key, math.inf), f.started - f.scheduled)
    left = due - started_before
    made_up = [v for k, v in later.items() if k in left]
    return Undone(len(left), len(made_up), max(made_up, default=None))
