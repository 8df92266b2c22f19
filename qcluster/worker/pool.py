"""The worker's job pool: a fixed number of daemon threads that run claimed runs.

Promises:

* At most ``size`` runs at once; the others wait in order of arrival.
* The threads are daemon threads, so a job that never returns cannot keep the process
  alive: ``qcluster start`` exits within its shutdown grace whatever its jobs do
  (``concurrent.futures.ThreadPoolExecutor``'s threads are joined at interpreter exit,
  which is why it is not used). A running Python thread cannot be killed; the process
  ends it by exiting.
* :meth:`JobPool.stop` returns what never started and starts nothing more.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)


class JobPool(Generic[T]):
    """Calls ``run(item)`` for each submitted item on one of ``size`` daemon threads."""

    def __init__(self, size: int, run: Callable[[T], object], *, name: str = "qc-job") -> None:
        self._size = size
        self._run = run
        self._name = name
        self._queue: collections.deque[T] = collections.deque()
        self._cond = threading.Condition()
        self._stopped = False
        self._threads: list[threading.Thread] = []

    def submit(self, item: T) -> None:
        """Queue ``item``; RuntimeError once the pool is stopped."""
        with self._cond:
            if self._stopped:
                raise RuntimeError("the job pool is stopped")
            self._queue.append(item)
            if len(self._threads) < self._size:  # threads are started as work comes
                t = threading.Thread(target=self._loop, daemon=True,
                                     name=f"{self._name}_{len(self._threads)}")
                self._threads.append(t)
                t.start()
            self._cond.notify()

    def stop(self) -> list[T]:
        """Start nothing more; the items that never started. Running items go on (they
        end with the process, or when they return). Idempotent."""
        with self._cond:
            self._stopped = True
            waiting, self._queue = list(self._queue), collections.deque()
            self._cond.notify_all()
        return waiting

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                item = self._queue.popleft()
            try:
                self._run(item)
            except BaseException:  # the run function records its own failures
                log.exception("a job pool thread's run raised")
