"""The start gate: a claimed run's code runs only once its row says ``running``.

Promises:

* :meth:`StartGate.begin` returns True only after :func:`qcluster.store.runs.start`
  committed ``dispatched`` -> ``running`` for that (run id, attempt) over this worker's
  claim. The leader records a run that no worker started within its grace ``missed``, and
  a cancelled one ``cancelled``, by transitions from the same ``dispatched`` status, so
  either the start commits first and the run runs, or the leader's write does and it
  never starts (False). Never both.
* Starts that arrive together are written together: one thread writes the batch of
  everyone waiting (group commit), so a worker starting hundreds of runs a second does
  not make one transaction per run.
* While the database cannot be reached, ``begin`` tries again every ``retry`` seconds,
  until ``stopping`` is set (False: the run does not start). After :meth:`StartGate.close`,
  nothing starts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from qcluster.errors import QClusterError
from qcluster.store.db import Database
from qcluster.store.runs import start

log = logging.getLogger(__name__)

Key = tuple[int, int]  # (run id, attempt)


class StartGate:
    def __init__(self, db: Database, session: str, stopping: threading.Event, *,
                 clock: Callable[[], float] = time.time, retry: float = 0.5) -> None:
        self._db = db
        self._session = session
        self._stopping = stopping
        self._clock = clock
        self._retry = retry
        self._cond = threading.Condition()
        self._pending: set[Key] = set()
        self._results: dict[Key, bool | None] = {}  # None: the database did not answer
        self._writing = False
        self._closed = False

    def close(self) -> None:
        """Start nothing more: wait for a write in flight, then every ``begin`` answers
        False. After it returns, no start of this worker can commit."""
        with self._cond:
            self._closed = True
            while self._writing:
                self._cond.wait()
            self._cond.notify_all()

    def begin(self, key: Key) -> bool:
        """Whether the run may start now (its row moved to ``running``)."""
        return key in self.begin_many([key])

    def begin_many(self, keys: Iterable[Key]) -> set[Key]:
        """Of ``keys``, the runs that may start now, written in one batch (with everyone
        else's that waits)."""
        wanted, moved = set(keys), set()
        while wanted:
            for key, result in self._once(wanted).items():
                if result is not None:
                    wanted.discard(key)
                    if result:
                        moved.add(key)
            if wanted and self._stopping.wait(self._retry):
                break
        return moved

    def _once(self, keys: set[Key]) -> dict[Key, bool | None]:
        with self._cond:
            self._pending |= keys
            while not keys <= self._results.keys():
                if self._closed:
                    self._pending -= keys
                    return {key: self._results.pop(key, False) for key in keys}
                if self._writing:
                    self._cond.wait()
                    continue
                self._writing = True
                batch, self._pending = self._pending, set()
                self._cond.release()
                try:
                    answers = self._write(batch)
                finally:
                    self._cond.acquire()
                    self._writing = False
                self._results.update(answers)
                self._cond.notify_all()
            return {key: self._results.pop(key) for key in keys}

    def _write(self, batch: set[Key]) -> dict[Key, bool | None]:
        try:
            moved = start(self._db, batch, session=self._session, now=self._clock())
        except QClusterError as e:
            log.warning("could not record %d runs as started (will retry): %s", len(batch), e)
            return dict.fromkeys(batch, None)
        except Exception:  # a bug must not leave the other waiters waiting for ever
            log.exception("recording %d runs as started failed", len(batch))
            return dict.fromkeys(batch, None)
        return {key: key in moved for key in batch}
