"""The worker's start timer: runs that arrived before their start time wait here.

Promises:

* One thread and a heap, whatever the number of waiting runs; each run is handed to the
  pool ``lead`` seconds before its time (:func:`due_time` of its ``due_at`` if its row
  has one, else of its ``scheduled_at``: :attr:`qcluster.store.runs.Claimed.start_at`),
  not earlier: the worker records its start in that moment and begins its code at its
  time, not before (``worker/runner.py``).
* The thread does not die of a time: a time that is not finite, or is more than
  :data:`~qcluster.store.records.MAX_AHEAD` ahead, is started at once (a dispatch's times
  are checked before they get here; this guards the row's values too).
* ``stop()`` starts nothing more and returns the runs still waiting (the worker gives
  them back), then joins the thread for at most 5 s.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable

from qcluster.store.records import MAX_AHEAD
from qcluster.store.runs import Claimed

log = logging.getLogger(__name__)


def due_time(scheduled_at: float, now: float) -> float:
    """When to start a run fired at ``scheduled_at``: then, unless that is not finite or
    more than :data:`MAX_AHEAD` after ``now``, in which case now."""
    if not math.isfinite(scheduled_at) or scheduled_at > now + MAX_AHEAD:
        return now
    return scheduled_at


class StartTimer:
    """Holds runs that arrived before their start time (the leader's fire-ahead window, a
    jitter, a retry's backoff) and hands each to ``start`` at its time."""

    def __init__(self, start: Callable[[Claimed], object], *, lead: float = 0.0) -> None:
        self._start = start
        self._lead = lead
        self._heap: list[tuple[float, int, Claimed]] = []
        self._order = itertools.count()  # ties: first come, first started
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="qc-start-timer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, run: Claimed) -> None:
        with self._cond:
            at = due_time(run.start_at, time.time())
            heapq.heappush(self._heap, (at, next(self._order), run))
            if self._heap[0][2] is run:
                self._cond.notify()

    def stop(self) -> list[Claimed]:
        """Start nothing more; the runs that were still waiting. Idempotent."""
        with self._cond:
            self._stopped = True
            waiting, self._heap = [r for _, _, r in sorted(self._heap)], []
            self._cond.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        return waiting

    def _take_due(self) -> list[Claimed]:
        """Wait for the earliest run's time less the lead (or stop); what is due by then."""
        with self._cond:
            lead = self._lead
            while not self._stopped and (not self._heap
                                         or self._heap[0][0] - lead > time.time()):
                wait = self._heap[0][0] - lead - time.time() if self._heap else None
                self._cond.wait(wait)
            if self._stopped:
                return []
            due = []
            now = time.time() + lead
            while self._heap and self._heap[0][0] <= now:
                due.append(heapq.heappop(self._heap)[2])
            return due

    def _loop(self) -> None:
        while True:
            for run in self._take_due():
                try:
                    self._start(run)
                except RuntimeError:  # the pool is shutting down: the run is left open
                    return
                except Exception:  # one run's hand-off must not stop the others
                    log.exception("could not start run %d", run.record["run_id"])
            with self._cond:
                if self._stopped:
                    return
