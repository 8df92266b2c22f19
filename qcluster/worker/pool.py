"""The worker's job pool: a fixed number of daemon threads that run claimed runs.

Promises:

* At most ``size`` runs at once; the others wait in order of arrival.
* The threads are daemon threads, so a thread stuck on a run cannot keep the process
  alive (``concurrent.futures.ThreadPoolExecutor``'s threads are joined at interpreter
  exit, which is why it is not used). A job's code does not run on them: each thread
  drives the process of its slot (:mod:`qcluster.worker.slots`), which it starts and
  which lives as long as the thread (``PR_SET_PDEATHSIG`` is bound to the thread).
* A thread lives from its first item (or :meth:`JobPool.grow`) until
  :meth:`JobPool.stop`; ``on_start`` runs on it first (the worker starts the thread's slot
  process there, before any run waits for it), ``on_exit`` last (it ends that process).
* :meth:`JobPool.stop` returns what never started and starts nothing more.
* With ``run_many`` and ``joinable``: a thread that takes an item ``joinable`` accepts
  also takes the next ones it accepts, up to ``max_batch`` in all, while the queue holds
  more items than the other threads not running items could take (a backlog: none of
  them waits for these), and calls ``run_many(items)`` once, in queue order. With no
  backlog a thread takes one item, so a free thread never waits while another holds a
  batch.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)


class JobPool(Generic[T]):
    """Calls ``run(item)`` for each submitted item on one of ``size`` daemon threads."""

    def __init__(self, size: int, run: Callable[[T], object], *, name: str = "qc-job",
                 on_start: Callable[[], object] | None = None,
                 on_exit: Callable[[], object] | None = None,
                 run_many: Callable[[list[T]], object] | None = None,
                 joinable: Callable[[T], bool] | None = None, max_batch: int = 1) -> None:
        self._size = size
        self._run = run
        self._run_many = run_many
        self._joinable = joinable
        self._max_batch = max_batch if run_many is not None and joinable is not None else 1
        self._busy = 0  # threads running items
        self._name = name
        self._on_start = on_start
        self._on_exit = on_exit
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
            self._add_thread()  # threads are started as work comes
            self._cond.notify()

    def grow(self) -> None:
        """Start one more thread (up to ``size``), for work that will come: a run that
        waits for its start time."""
        with self._cond:
            if not self._stopped:
                self._add_thread()

    def _add_thread(self) -> None:
        if len(self._threads) < self._size:
            t = threading.Thread(target=self._loop, daemon=True,
                                 name=f"{self._name}_{len(self._threads)}")
            self._threads.append(t)
            t.start()

    def stop(self) -> list[T]:
        """Start nothing more; the items that never started. Running items go on (they
        end with the process, or when they return). Idempotent."""
        with self._cond:
            self._stopped = True
            waiting, self._queue = list(self._queue), collections.deque()
            self._cond.notify_all()
        return waiting

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s in all for the threads to end (after :meth:`stop`);
        whether they all did."""
        deadline = time.monotonic() + timeout
        with self._cond:
            threads = list(self._threads)
        for t in threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads if t is not threading.current_thread())

    def _loop(self) -> None:
        try:
            _hook(self._on_start, "start")
            self._serve()
        finally:
            _hook(self._on_exit, "exit")

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                items = [self._queue.popleft()]
                free = len(self._threads) - self._busy - 1  # the others not running items
                if self._max_batch > 1 and self._joinable is not None \
                        and self._joinable(items[0]):
                    while (len(items) < self._max_batch and len(self._queue) > free
                           and self._joinable(self._queue[0])):
                        items.append(self._queue.popleft())
                self._busy += 1
            try:
                if len(items) == 1:
                    self._run(items[0])
                else:
                    assert self._run_many is not None
                    self._run_many(items)
            except BaseException:  # the run function records its own failures
                log.exception("a job pool thread's run raised")
            finally:
                with self._cond:
                    self._busy -= 1


def _hook(hook: Callable[[], object] | None, what: str) -> None:
    """Run a thread's start or exit hook; what it raises is logged, never the thread's end."""
    if hook is not None:
        try:
            hook()
        except Exception:
            log.exception("a job pool thread's %s hook raised", what)
