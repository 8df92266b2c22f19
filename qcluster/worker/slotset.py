"""The slots of one worker's pool (:class:`~qcluster.worker.slots.Slot`, one per pool
thread), which run each slot runs, and what stops them: a cancel read from the database,
or the end of a shutdown.

Promises:

* :meth:`SlotSet.mine` is the calling pool thread's slot, made on its first call;
  :meth:`SlotSet.close_mine` ends that slot's process (the pool's ``on_exit``).
* While a run is inside :meth:`SlotSet.running`, :meth:`SlotSet.stop` with its key
  reaches its slot, and only then: a stop never hits the next run of the same slot.
* After :meth:`SlotSet.stop_all`, every run that enters :meth:`SlotSet.running` is
  stopped before it begins (its code does not run).
* While runs run, the cancel watcher (thread ``qc-cancels``) asks ``asked(keys)`` every
  ``check_seconds`` which of them a cancel was asked for (in the database, so a cancel
  outlives a change of leader: :func:`qcluster.store.runs.cancel_asked`), and stops those,
  recorded ``cancelled``. With no run running it reads nothing. A failed read is logged
  and tried again at the next check; the thread never dies of it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence

from qcluster.errors import QClusterError
from qcluster.store.runs import RunStatus
from qcluster.worker.slots import KILL_GRACE, Key, Slot

log = logging.getLogger(__name__)

#: The error of a run stopped on a cancel.
CANCELLED_REASON = ("cancelled while running (a cancel was asked: runs cancel, or the "
                    "overlap policy cancel-other; its process group was stopped)")


#: How often the thaw thread looks for slot processes stopped with their worker.
THAW_CHECK = 0.05
#: The error of a run killed after its worker was paused past its claim lease.
COUNTED_OUT_REASON = ("interrupted: its worker was paused past its claim lease and a leader "
                      "counted the run out (its process group was killed, not resumed)")


class SlotSet:
    def __init__(self, asked: Callable[[list[Key]], set[Key]], *, check_seconds: float = 1.0,
                 job_paths: Sequence[str] = (), kill_grace: float = KILL_GRACE,
                 frozen: Callable[[list[Key]], tuple[set[Key], set[Key]]] | None = None,
                 output_max_bytes: int = 0) -> None:
        self._asked = asked
        self._frozen = frozen
        self._check_seconds = check_seconds
        self._job_paths = list(job_paths)
        self._kill_grace = kill_grace
        self._output_max_bytes = output_max_bytes
        self._local = threading.local()
        self._lock = threading.Lock()
        self._slots: list[Slot] = []
        self._active: dict[Key, Slot] = {}
        self._stop_all: tuple[RunStatus, str] | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="qc-cancels", daemon=True)
        self._thaw_thread = threading.Thread(target=self._thaw_loop, name="qc-thaw",
                                             daemon=True)

    def start(self) -> None:
        self._thread.start()
        if self._frozen is not None:
            self._thaw_thread.start()

    def _thaw_loop(self) -> None:
        """The slots stopped with their worker (``worker/child.py``): ``frozen(keys)``
        says which runs to continue and which to kill; the others wait (the self-fence
        acts on ``--recover`` ones; a database that does not answer is asked again)."""
        assert self._frozen is not None
        while not self._stopped.wait(THAW_CHECK):
            with self._lock:
                active = dict(self._active)
            stopped = {key: slot for key, slot in active.items() if slot.frozen()}
            if not stopped:
                continue
            try:
                go_on, kill = self._frozen(list(stopped))
            except QClusterError as e:
                log.warning("cannot decide on %d runs stopped with this worker yet: %s",
                            len(stopped), e)
                self._stopped.wait(0.5)
                continue
            except Exception:  # never let this thread die: the slots would stay stopped
                log.exception("deciding on the stopped slots failed")
                continue
            for key in go_on:
                stopped[key].thaw()
            for key in kill:
                if stopped[key].stop(key, RunStatus.INTERRUPTED, COUNTED_OUT_REASON):
                    log.warning("run %d (attempt %d) was counted out while this worker was "
                                "paused: killed, not resumed", key[0], key[1])
                stopped[key].kill()

    def mine(self) -> Slot:
        slot: Slot | None = getattr(self._local, "slot", None)
        if slot is None:
            with self._lock:
                slot = Slot(f"{threading.current_thread().name}", job_paths=self._job_paths,
                            kill_grace=self._kill_grace,
                            output_max_bytes=self._output_max_bytes)
                self._slots.append(slot)
            self._local.slot = slot
        return slot

    def close_mine(self) -> None:
        slot: Slot | None = getattr(self._local, "slot", None)
        if slot is not None:
            slot.close()
            with self._lock:
                self._slots.remove(slot)
            self._local.slot = None

    @contextlib.contextmanager
    def running(self, key: Key) -> Iterator[Slot]:
        """The calling thread's slot, assigned to run ``key`` inside the block."""
        slot = self.mine()
        with self._lock:
            slot.assign(key)
            self._active[key] = slot
            stop_all = self._stop_all
        if stop_all is not None:
            slot.stop(key, *stop_all)
        try:
            yield slot
        finally:
            with self._lock:
                self._active.pop(key, None)
                slot.assign(None)

    def active(self) -> list[Key]:
        with self._lock:
            return list(self._active)

    def stop(self, key: Key, status: RunStatus, reason: str) -> bool:
        """Stop run ``key`` if a slot runs it; whether one did (and had no stop asked)."""
        with self._lock:
            slot = self._active.get(key)
        return slot is not None and slot.stop(key, status, reason)

    def stop_all(self, status: RunStatus, reason: str) -> int:
        """Stop every run, those that begin later included; how many were running."""
        with self._lock:
            self._stop_all = (status, reason)
            active = dict(self._active)
        return sum(slot.stop(key, status, reason) for key, slot in active.items())

    def kill_all(self) -> None:
        """SIGKILL every slot's process group now (the last step of a stop)."""
        with self._lock:
            slots = list(self._slots)
        for slot in slots:
            slot.kill()

    def pids(self) -> list[int]:
        """The process ids of the live slot processes."""
        with self._lock:
            slots = list(self._slots)
        return [pid for slot in slots if (pid := slot.pid) is not None]

    def stop_watching(self) -> None:
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5.0)

    def check_cancels(self) -> int:
        """One look at the database for cancels of running runs; how many it stopped."""
        keys = self.active()
        if not keys:
            return 0
        try:
            asked = self._asked(keys)
        except QClusterError as e:
            log.warning("could not read which running runs were cancelled: %s", e)
            return 0
        stopped = 0
        for key in sorted(asked):
            if self.stop(key, RunStatus.CANCELLED, CANCELLED_REASON):
                log.info("run %d (attempt %d): cancelled while running, stopping it", *key)
                stopped += 1
        return stopped

    def _watch(self) -> None:
        while not self._stopped.wait(self._check_seconds):
            try:
                self.check_cancels()
            except Exception:  # a bug here must not end the watcher
                log.exception("the cancel check failed")
