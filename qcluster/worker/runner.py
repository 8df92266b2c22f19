"""The worker: a Pyro5 object that accepts runs, and a bounded pool that runs them.

Promises:

* A worker refuses a batch whose epoch is older than the newest epoch it has seen, and
  a second copy of a run attempt it already took (docs/DESIGN.md invariant 4).
* Across workers, a run attempt starts at most once: a worker claims it in the database
  (``scheduled`` -> ``dispatched``, naming itself; :func:`qcluster.store.runs.claim`)
  before running it, and only the one claim that commits runs it.
* Only references that match ``[jobs] allow`` run; a refused run is recorded ``failed``
  with the reason.
* A dispatch is checked before anything is taken or written: every number in it must fit
  the column it is bound to (:mod:`qcluster.store.bounds`: a run id from 1 to 2**63 - 1, an
  attempt from 1 to 2**31 - 1, an epoch from 0 to 2**63 - 1, a fire time within the years
  1 to 9999); ``bool`` is not a number. Anything else refuses the whole call with one line
  (``refused: ...``), and the worker goes on serving with its state unchanged. Each run is
  checked by :func:`qcluster.store.records.from_wire`, against the one :class:`RunRecord`
  that the leader's records are made of.
* Outcomes (``running``, then ``succeeded``/``failed`` with the error text and the
  duration) are written in batches by one writer thread
  (:func:`qcluster.store.runs.write_outcomes`), and only over this worker's own claim, so
  a run that the leader has meanwhile declared ``lost`` is not overwritten.
"""

from __future__ import annotations

import heapq
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import Pyro5.server

from qcluster.definitions.jobdefs import check_func_ref, resolve_func
from qcluster.errors import InputError, QClusterError
from qcluster.store import bounds
from qcluster.store.db import Database
from qcluster.store.records import RunRecord, from_wire
from qcluster.store.runs import (
    Outcome,
    RunStatus,
    check_outcome,
    claim,
    write_outcomes,
)
from qcluster.worker.context import RunContext, enter_run, leave_run

log = logging.getLogger(__name__)

MAX_BATCH = 5000
_SEEN = 200_000
_ON_TIME = 0.002  # a run due this close is started at once


def check_batch(epoch: object, runs: object) -> list[RunRecord]:
    """Validate a dispatch payload from the wire; return its runs (each checked by
    :func:`~qcluster.store.records.from_wire`, ``scheduled_at`` as a float). InputError (one
    line) on anything malformed or out of its column's range."""
    bounds.check_int(epoch, "epoch", bounds.EPOCH)
    if not isinstance(runs, list) or len(runs) > MAX_BATCH:
        raise InputError(f"runs must be a list of at most {MAX_BATCH}")
    return [from_wire(run) for run in runs]


class OutcomeWriter:
    """Writes run outcomes in batches, from one thread."""

    def __init__(self, db: Database, session: str, interval: float = 0.05) -> None:
        self.db = db
        self.session = session
        self.interval = interval
        self._started: dict[tuple[int, int], float] = {}
        self._finished: dict[tuple[int, int], Outcome] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="qc-outcomes", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def started(self, run_id: int, attempt: int, at: float) -> None:
        with self._lock:
            self._started[(run_id, attempt)] = at

    def finished(self, run_id: int, attempt: int, status: RunStatus, started: float,
                 finished: float, error: str | None) -> None:
        check_outcome(status)  # here, not in the writer thread, which must not die
        with self._lock:
            self._finished[(run_id, attempt)] = Outcome(status, started, finished, error)
        if len(self._finished) >= 500:
            self._wake.set()

    def pending(self) -> int:
        with self._lock:
            return len(self._started) + len(self._finished)

    def stop(self, timeout: float = 10.0) -> None:
        """Flush what is pending (within ``timeout``) and stop. Idempotent."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            stopping = self._stop.is_set()
            try:
                self.flush()
            except QClusterError as e:
                log.warning("could not write run outcomes yet (will retry): %s", e)
                if stopping:
                    return
                self._stop.wait(0.5)
                continue
            if stopping and not self.pending():
                return

    def flush(self) -> None:
        with self._lock:
            finished, self._finished = self._finished, {}
            started = {k: v for k, v in self._started.items() if k not in finished}
            self._started = {}
        if not finished and not started:
            return
        try:
            write_outcomes(self.db, self.session, started, finished)
        except QClusterError:
            with self._lock:  # put them back, newer entries win
                self._finished = {**finished, **self._finished}
                self._started = {**started, **self._started}
            raise


@Pyro5.server.expose
class WorkerService:
    """The object a leader calls. Every argument is checked; bad calls are refused."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    def submit(self, epoch: Any, runs: Any) -> dict[str, Any]:
        try:
            batch = check_batch(epoch, runs)
        except InputError as e:
            raise ValueError(f"refused: {e}") from None
        return self._worker.accept(epoch, batch)

    def ping(self) -> dict[str, Any]:
        return self._worker.load()


class _StartTimer:
    """Holds runs that arrived before their fire time (the leader's fire-ahead window) and
    hands each to the pool at its time: one thread and a heap, whatever their number."""

    def __init__(self, start: Callable[[RunRecord], object]) -> None:
        self._start = start
        self._heap: list[tuple[float, int, RunRecord]] = []
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="qc-start-timer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, run: RunRecord) -> None:
        with self._cond:
            heapq.heappush(self._heap, (run["scheduled_at"], run["run_id"], run))
            if self._heap[0][2] is run:
                self._cond.notify()

    def stop(self) -> None:
        """Start what is still waiting now (the worker's grace covers it), then stop."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(5.0)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (
                    not self._heap or self._heap[0][0] > time.time()
                ):
                    wait = self._heap[0][0] - time.time() if self._heap else None
                    self._cond.wait(wait)
                if self._stopped:
                    due, self._heap = [r for _, _, r in self._heap], []
                else:
                    due = []
                    now = time.time()
                    while self._heap and self._heap[0][0] <= now:
                        due.append(heapq.heappop(self._heap)[2])
            for run in due:
                try:
                    self._start(run)
                except RuntimeError:  # the pool is shutting down: the run is left open
                    return
            if self._stopped:
                return


class Worker:
    """Accepts runs over RPC and runs them in a bounded pool."""

    def __init__(
        self,
        db: Database,
        *,
        node_id: str,
        session: str,
        concurrency: int,
        allow: Sequence[str],
        max_queue: int | None = None,
    ) -> None:
        self.db = db
        self.node_id = node_id
        self.session = session
        self.concurrency = concurrency
        self.allow = list(allow)
        self.max_queue = max_queue or max(1000, concurrency * 100)
        self.writer = OutcomeWriter(db, session)
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="qc-job")
        self._timer = _StartTimer(lambda run: self._pool.submit(self._execute, run))
        self._lock = threading.RLock()
        self._max_epoch = 0
        self._seen: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._inflight = 0
        self._accepting = True
        self._funcs: dict[str, Any] = {}

    def start(self) -> None:
        self.writer.start()
        self._timer.start()

    def stop(self, grace: float) -> None:
        """Refuse new runs, let running ones finish (up to ``grace`` s), flush outcomes."""
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + grace
        while self.inflight() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._timer.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.writer.stop()

    def inflight(self) -> int:
        with self._lock:
            return self._inflight

    def load(self) -> dict[str, Any]:
        return {"inflight": self.inflight(), "capacity": self.concurrency,
                "max_queue": self.max_queue, "epoch": self._max_epoch}

    def accept(self, epoch: int, runs: list[RunRecord]) -> dict[str, Any]:
        refused: list[list[Any]] = []
        fresh: list[RunRecord] = []
        with self._lock:
            if not self._accepting:
                return {"accepted": [], "refused": [[r["run_id"], "shutting down"] for r in runs],
                        **self.load()}
            if epoch < self._max_epoch:
                return {"accepted": [],
                        "refused": [[r["run_id"], "stale epoch"] for r in runs], **self.load()}
            if runs:  # an empty batch proves nothing: it must not fence the real leader
                self._max_epoch = epoch
            room = self.max_queue - self._inflight
            for run in runs:
                key = (run["run_id"], run["attempt"])
                if key in self._seen:
                    refused.append([run["run_id"], "duplicate"])
                elif room <= 0:
                    refused.append([run["run_id"], "busy"])
                else:
                    room -= 1
                    self._seen[key] = None
                    fresh.append(run)
            while len(self._seen) > _SEEN:
                self._seen.popitem(last=False)
            self._inflight += len(fresh)
        claimed = self._claim_or_give_back(fresh)
        accepted = []
        now = time.time()
        for run in fresh:
            if run["run_id"] in claimed:
                accepted.append(run["run_id"])
                if run["scheduled_at"] > now + _ON_TIME:  # sent ahead: start it on time
                    self._timer.add(run)
                else:
                    self._pool.submit(self._execute, run)
            else:
                refused.append([run["run_id"], "already claimed"])
        with self._lock:
            self._inflight -= len(fresh) - len(accepted)
        return {"accepted": accepted, "refused": refused, **self.load()}

    def _claim_or_give_back(self, runs: list[RunRecord]) -> set[int]:
        """:meth:`_claim`; if it raises, the runs were not taken: their queue places are
        given back and they are forgotten (so they may come again), then it re-raises."""
        try:
            return self._claim(runs)
        except BaseException:
            with self._lock:
                self._inflight -= len(runs)
                for run in runs:
                    self._seen.pop((run["run_id"], run["attempt"]), None)
            raise

    def _claim(self, runs: list[RunRecord]) -> set[int]:
        """Take the runs in the database: only the claim that commits may run them."""
        try:
            return claim(self.db, runs, worker=self.node_id, session=self.session)
        except QClusterError as e:
            log.warning("could not claim %d runs: %s", len(runs), e)
            with self._lock:  # let them be sent again once the database answers
                for run in runs:
                    self._seen.pop((run["run_id"], run["attempt"]), None)
            return set()

    def _execute(self, run: RunRecord) -> None:
        started = time.time()
        self.writer.started(run["run_id"], run["attempt"], started)
        ctx = RunContext(
            job_id=run["job_id"], run_id=run["run_id"],
            scheduled_at=datetime.fromtimestamp(run["scheduled_at"], UTC),
            attempt=run["attempt"], epoch=run["epoch"], worker_id=self.node_id,
        )
        token = enter_run(ctx)
        status, error = RunStatus.SUCCEEDED, None
        try:
            func = self._resolve(run["func"])
            func(*json.loads(run["args"]), **json.loads(run["kwargs"]))
        except QClusterError as e:
            status, error = RunStatus.FAILED, f"refused: {e}"
        except BaseException as e:  # a job's failure is data, never the worker's crash
            status, error = RunStatus.FAILED, f"{type(e).__name__}: {e}"[:4000]
            if not isinstance(e, Exception):
                log.warning("job %s raised %s", run["job_id"], type(e).__name__)
        finally:
            leave_run(token)
            finished = time.time()
            self.writer.finished(run["run_id"], run["attempt"], status, started, finished, error)
            with self._lock:
                self._inflight -= 1

    def _resolve(self, ref: str) -> Any:
        func = self._funcs.get(ref)
        if func is None:
            check_func_ref(ref, self.allow)
            func = self._funcs[ref] = resolve_func(ref)
        return func
