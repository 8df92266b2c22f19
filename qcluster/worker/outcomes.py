"""The worker's outcome writer: one thread that writes run outcomes in batches.

Promises:

* Outcomes (``succeeded``/``failed``/``interrupted`` with the error text, the duration,
  the run's output tail and result, :mod:`qcluster.worker.output`; ``running`` is written
  before the job starts, by :class:`~qcluster.worker.starts.StartGate`) are written by
  :func:`qcluster.store.runs.write_outcomes`, only over this worker's own claim (its
  session and the attempt), so a run that the leader has meanwhile declared ``lost`` is
  not overwritten.
* An outcome the database could not take is kept and written again (a newer one for the
  same attempt wins); the thread never dies of a database error.
* :meth:`OutcomeWriter.seal` (the self-fence's last act) hands over what is pending and
  writes nothing more: outcomes recorded after it (the runs the fence is killing) are
  never written by this process.
* :meth:`OutcomeWriter.unwritten` shows every outcome not yet committed, the batch whose
  write is under way included: what the worker reports to a leader that cannot see it
  (``qcluster.worker.runner.Worker.report``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from qcluster.errors import QClusterError
from qcluster.store.db import Database
from qcluster.store.runs import Outcome, RunStatus, check_outcome, write_outcomes

log = logging.getLogger(__name__)


class OutcomeWriter:
    """Writes run outcomes in batches, from one thread."""

    def __init__(self, db: Database, session: str, interval: float = 0.05) -> None:
        self.db = db
        self.session = session
        self.interval = interval
        self._finished: dict[tuple[int, int], Outcome] = {}
        self._writing: dict[tuple[int, int], Outcome] = {}  # the batch being written
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._sealed = False
        self._thread = threading.Thread(target=self._loop, name="qc-outcomes", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def finished(self, run_id: int, attempt: int, status: RunStatus, started: float,
                 finished: float, error: str | None, *, output: str | None = None,
                 result: str | None = None) -> None:
        check_outcome(status)  # here, not in the writer thread, which must not die
        with self._lock:
            self._finished[(run_id, attempt)] = Outcome(status, started, finished, error,
                                                        output, result)
        if len(self._finished) >= 500:
            self._wake.set()

    def unwritten(self, keys: Iterable[tuple[int, int]]) -> dict[tuple[int, int], Outcome]:
        """The outcomes of ``keys`` that have not been written yet, those being written
        included (a write that hangs on a cut-off database has not committed)."""
        with self._lock:
            return {k: o for k in keys
                    if (o := self._finished.get(k) or self._writing.get(k)) is not None}

    def pending(self) -> int:
        with self._lock:
            return len(self._finished)

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

    def seal(self) -> dict[tuple[int, int], Outcome]:
        """Stop writing; the outcomes recorded and not yet taken by a write, for the
        caller to write. A write under way finishes (or fails) as it would have."""
        with self._lock:
            self._sealed = True
            finished, self._finished = self._finished, {}
        return finished

    def flush(self) -> None:
        with self._lock:
            if self._sealed:
                return
            finished, self._finished = self._finished, {}
            self._writing = finished
        if not finished:
            return
        try:
            write_outcomes(self.db, self.session, finished)
        except BaseException:
            with self._lock:  # put them back, newer entries win
                self._finished = {**finished, **self._finished}
                self._writing = {}
            raise
        with self._lock:
            self._writing = {}
