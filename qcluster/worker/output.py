"""A slot process's stdout and stderr, the worker's side: the tail of what each run wrote.

A slot's process writes its fds 1 and 2 into one pipe that the worker reads
(:class:`~qcluster.worker.slots.Slot` polls it while a run runs, beside its socket), as
``2>&1`` would: one pipe, so that what the job wrote to either stream keeps its order.
Promises:

* What a job (its Python code, its log records, the commands it starts) writes to stdout
  or stderr still reaches the worker's own stdout (both streams: their order is one),
  so a node's console or journal keeps the jobs' output: in whole lines (a run's last
  line without a newline gets one at its end; a line is cut at 64 KiB), so that the
  lines of slots that run at once do not run into one another, and by an :class:`Echo`
  thread, so that a stdout nobody reads (a full pipe, a stopped terminal) never stops a
  slot's reading, its timeout or a cancel. While it cannot keep up, what it has no room
  for (:data:`ECHO_BYTES` queued) is dropped from the worker's stdout only, and said so
  there once it can write again; the runs' tails are kept whatever it does.
* Of what was written between the start and the end of one run, the last
  ``max_bytes`` bytes are kept (:meth:`OutputTail.begin`, :meth:`OutputTail.end`), in
  the order written; what came before is counted and the text says so (``[... 1234
  earlier bytes not kept]``), the cut moved past a character it would split. It is
  decoded as UTF-8, bad bytes and NUL characters (which a PostgreSQL text cannot hold)
  replaced by U+FFFD.
* The end of a run sees everything its process wrote before its reply: the slot process
  flushes its streams before it answers, and :meth:`end` reads the pipe until it is
  empty, so nothing written before the reply is left for the next run. A run whose
  process was killed keeps what it wrote until then.
* Output written between runs is passed on, not kept. A run that leaves a thread or a
  process behind ends its slot's process (:mod:`qcluster.worker.child`), so between runs
  nothing of the slot's is left to write.
* Memory: at most ``max_bytes``, one read (64 KiB) and one line (64 KiB) per slot, and
  :data:`ECHO_BYTES` for the echo.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time

#: Bytes read from a pipe at a time.
READ_SIZE = 1 << 16
#: A line longer than this is passed on in pieces of this size.
LINE_BYTES = 1 << 16
#: What the echo thread may hold, not yet written to the worker's stdout.
ECHO_BYTES = 4 << 20


class Echo:
    """Writes what slots pass on to one fd (the worker's stdout) on a thread of its own,
    from a queue of at most :data:`ECHO_BYTES`: :meth:`put` never blocks."""

    def __init__(self, fd: int = 1, limit: int = ECHO_BYTES) -> None:
        self.fd, self.limit = fd, limit
        self._cond = threading.Condition()
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self.dropped = 0  # bytes dropped since the last note of it
        self._thread: threading.Thread | None = None

    def put(self, data: bytes) -> None:
        with self._cond:
            if self._queued + len(data) > self.limit:
                self.dropped += len(data)
                return
            self._queue.append(data)
            self._queued += len(data)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="qc-echo", daemon=True)
                self._thread.start()
            self._cond.notify()

    def flushed(self, timeout: float = 5.0) -> bool:
        """Wait until everything put so far is written (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queued and time.monotonic() < deadline:
                self._cond.wait(0.01)
            return not self._queued

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                data = self._queue[0]
                dropped, self.dropped = self.dropped, 0
            if dropped:
                _write_all(self.fd, f"[qcluster: {dropped} bytes of job output not passed on "
                                    f"here: this stdout was not being read]\n".encode())
            _write_all(self.fd, data)
            with self._cond:
                self._queue.popleft()
                self._queued -= len(data)
                self._cond.notify_all()


_ECHO: Echo | None = None
_ECHO_LOCK = threading.Lock()


def stdout_echo() -> Echo:
    """The process's one :class:`Echo` to fd 1, made on first use."""
    global _ECHO
    with _ECHO_LOCK:
        if _ECHO is None:
            _ECHO = Echo(1)
        return _ECHO


def flush_stdout_echo(timeout: float) -> None:
    """Wait up to ``timeout`` s for the echo to write what it holds (a stopping worker:
    the last lines of its jobs reach its stdout)."""
    echo = _ECHO
    if echo is not None:
        echo.flushed(timeout)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:  # a nonblocking console that is full: wait a little
            time.sleep(0.01)
            continue
        except OSError:  # closed: the output is still kept in the tails
            return
        view = view[n:]


class OutputTail:
    """The read end of one slot process's output pipe, and the current run's tail (see
    the module doc). Its methods may be called from any thread; they take turns."""

    def __init__(self, max_bytes: int, fd: int, *, echo: Echo | None = None) -> None:
        """``fd``: the read end (made nonblocking, owned from now on); ``echo``: where
        what is read is passed on (default: the worker's stdout)."""
        self.max_bytes = max_bytes
        self.fds = (fd,)
        os.set_blocking(fd, False)
        self._echo = stdout_echo() if echo is None else echo
        self._line = bytearray()  # what was read of a line not yet passed on
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
            self._end_line()
            self._keeping = False
            if not self._tail and not self._dropped:
                return None
            tail = bytes(self._tail)
            if self._dropped:  # the cut may have split a character: start at the next
                start = next((i for i in range(min(4, len(tail)))
                              if tail[i] & 0xC0 != 0x80), 0)
                tail = tail[start:]
                self._dropped += start
            text = tail.decode("utf-8", errors="replace").replace("\0", "\ufffd")
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
            self._end_line()
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
        self._pass_on(data)
        if self._keeping and self.max_bytes:
            self._tail += data
            over = len(self._tail) - self.max_bytes
            if over > 0:
                del self._tail[:over]
                self._dropped += over
        return True

    def _pass_on(self, data: bytes) -> None:
        """Give the echo the whole lines of what was read so far (with ``_lock`` held)."""
        self._line += data
        cut = self._line.rfind(b"\n") + 1
        if not cut and len(self._line) >= LINE_BYTES:
            cut = len(self._line)  # a line this long goes in pieces
        if cut:
            self._echo.put(bytes(self._line[:cut]))
            del self._line[:cut]

    def _end_line(self) -> None:
        """Pass on a last line that has no newline, with one."""
        if self._line:
            self._echo.put(bytes(self._line) + b"\n")
            self._line.clear()
