"""A slot process's stdout and stderr, the worker's side: the tail of what each run wrote.

A slot's process writes its fds 1 and 2 into one pipe that the worker reads
(:class:`~qcluster.worker.slots.Slot` polls it while a run runs, beside its socket), as
``2>&1`` would: one pipe, so that what the job wrote to either stream keeps its order.
Promises:

* What a job (its Python code, its log records, the commands it starts) writes to stdout
  or stderr still reaches the worker's own stdout (both streams: their order is one),
  as it is read, so a node's console or journal keeps the jobs' output.
* Of what was written between the start and the end of one run, the last
  ``max_bytes`` bytes are kept (:meth:`OutputTail.begin`, :meth:`OutputTail.end`), in
  the order written; what came before is counted and the text says so (``[... 1234
  earlier bytes not kept]``). It is decoded as UTF-8 (bad bytes
  replaced) and NUL characters are dropped, which a PostgreSQL text cannot hold.
* The end of a run sees everything its process wrote before its reply: the slot process
  flushes its streams before it answers, and :meth:`end` reads the pipe until it is
  empty, so nothing written before the reply is left for the next run. A run whose
  process was killed keeps what it wrote until then.
* Output written between runs (a job's background process) is passed on, not kept; it is
  read at the start of the next run, so such a process that writes more than a pipe's
  buffer (64 KiB on Linux) between runs waits until then.
* Memory: at most ``max_bytes`` plus one read (64 KiB) per slot.
"""

from __future__ import annotations

import contextlib
import os
import threading

#: Bytes read from a pipe at a time.
READ_SIZE = 1 << 16


class OutputTail:
    """The read end of one slot process's output pipe, and the current run's tail (see
    the module doc). Its methods may be called from any thread; they take turns."""

    def __init__(self, max_bytes: int, fd: int, *, echo: int = 1) -> None:
        """``fd``: the read end (made nonblocking, owned from now on); ``echo``: where
        what is read is passed on (the worker's stdout)."""
        self.max_bytes = max_bytes
        self.fds = (fd,)
        os.set_blocking(fd, False)
        self._echo = echo
        self._lock = threading.Lock()
        self._tail = bytearray()
        self._dropped = 0
        self._keeping = False
        self._open = set(self.fds)

    def begin(self) -> None:
        """A run starts: pass on what is pending (not this run's), then keep what comes."""
        with self._lock:
            self._drain()
            self._tail.clear()
            self._dropped = 0
            self._keeping = True

    def end(self) -> str | None:
        """The run is over: what it wrote (see the module doc), or None if nothing."""
        with self._lock:
            self._drain()
            self._keeping = False
            if not self._tail and not self._dropped:
                return None
            text = bytes(self._tail).decode("utf-8", errors="replace").replace("\0", "")
            self._tail.clear()
            dropped, self._dropped = self._dropped, 0
        if dropped:
            return f"[... {dropped} earlier bytes not kept]\n{text}"
        return text

    def pump(self, fd: int) -> None:
        """Read what ``fd`` has now (one read), pass it on, keep it if a run is on."""
        with self._lock:
            self._read(fd)

    def drain(self) -> None:
        """Read the pipe until it is empty."""
        with self._lock:
            self._drain()

    def fds_open(self) -> set[int]:
        """The read end, unless every writer has gone."""
        with self._lock:
            return set(self._open)

    def close(self) -> None:
        """Read what is left, then close the pipe (the process is gone)."""
        with self._lock:
            self._drain()
            for fd in list(self._open):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._open.clear()

    # -- with _lock held ------------------------------------------------------------------

    def _drain(self) -> None:
        for fd in self.fds:
            while self._read(fd):
                pass

    def _read(self, fd: int) -> bool:
        """One read of ``fd``; whether it gave bytes."""
        if fd not in self._open:
            return False
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:  # every writer is gone: nothing more will come
            os.close(fd)
            self._open.discard(fd)
            return False
        self._pass_on(self._echo, data)
        if self._keeping and self.max_bytes:
            self._tail += data
            over = len(self._tail) - self.max_bytes
            if over > 0:
                del self._tail[:over]
                self._dropped += over
        return True

    @staticmethod
    def _pass_on(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
            except BlockingIOError:  # a nonblocking console that is full: drop the rest
                return
            except OSError:  # closed: the output is still kept in the tail
                return
            view = view[n:]
