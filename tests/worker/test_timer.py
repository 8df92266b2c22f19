"""The worker's start timer (``worker/timer.py``): a run that arrived before its time is
handed over ``lead`` seconds before it, not earlier, in time order, and what still waits
at ``stop()`` comes back."""

from __future__ import annotations

import threading
import time

from qcluster.store.records import run_record
from qcluster.store.runs import Claimed
from qcluster.worker.timer import StartTimer

LEAD = 0.5  # large: a loaded machine's late wake-up must not flake the "not before" check


def _claimed(run_id: int, at: float) -> Claimed:
    return Claimed(run_record(run_id, f"j{run_id}", "jobs.builtin:noop", "[]", "{}", at, 1, 1,
                              False), None, None)


def test_runs_are_handed_over_the_lead_before_their_time_not_earlier_in_order() -> None:
    handed: list[tuple[int, float]] = []
    done = threading.Event()

    def start(run: Claimed) -> None:
        handed.append((run.record["run_id"], time.time()))
        if len(handed) == 2:
            done.set()

    timer = StartTimer(start, lead=LEAD)
    timer.start()
    try:
        now = time.time()
        times = {1: now + 1.6, 2: now + 1.0}
        for run_id, at in times.items():
            timer.add(_claimed(run_id, at))
        assert done.wait(5.0), handed
    finally:
        timer.stop()
    assert [run_id for run_id, _ in handed] == [2, 1]
    for run_id, at in handed:  # inside [its time - LEAD, its time): late by under LEAD
        assert times[run_id] - LEAD - 0.001 <= at < times[run_id], (run_id, at, times[run_id])


def test_stop_hands_back_what_still_waits() -> None:
    timer = StartTimer(lambda run: None, lead=LEAD)
    timer.start()
    run = _claimed(7, time.time() + 60)
    timer.add(run)
    assert timer.stop() == [run]
