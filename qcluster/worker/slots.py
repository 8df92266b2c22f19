"""A pool slot's process, the worker's side: each slot of the job pool runs its runs in a
child process of its own (:mod:`qcluster.worker.child`), one run at a time, so that a run
can be stopped (a timeout, a cancel, the end of a shutdown grace) and a job that kills
its process, segfaults or holds the GIL takes only its slot down, never the worker.

Why a ``subprocess`` of our own and not ``multiprocessing``: the child is
``sys.executable -m qcluster.worker.child`` started with ``subprocess.Popen`` (fork and
exec at once: nothing of the multi-threaded worker runs in the child before ``exec``),
``start_new_session=True`` (its own session and process group), and one private socket
(``pass_fds``; the job keeps stdin/stdout for itself) carrying length-framed msgpack
(:mod:`qcluster.worker.frames`). ``multiprocessing``'s spawn and forkserver would pickle
across the pipe, run the parent's ``__main__`` again in the child (the ``qcluster``
script, or pytest), and keep a resource tracker and atexit hooks of their own; we need
none of that, and need a process group and a death signal it does not give.

Promises:

* A slot starts its process when first used (:meth:`Slot.ensure`), from the pool thread
  that owns it, for the slot's life: ``PR_SET_PDEATHSIG`` fires when the *thread* that
  started a child ends, and the pool's threads live as long as the pool.
* :meth:`Slot.run` returns how the run ended, as a :class:`RunEnd`: ``succeeded``;
  ``failed`` with the job's ``Type: message``; ``failed`` with ``its process died:
  killed by SIGSEGV`` (or ``exited with status 3``) when the child ended mid-run on its
  own; or the status and reason that :meth:`Slot.stop` (or the run's ``timeout``: then
  ``timed_out``, ``timed out after 30s``) asked. A reply that arrived before the stop
  took effect wins: the run had finished. With it come the tail of what the run wrote
  to stdout and stderr (one pipe, :mod:`qcluster.worker.output`, ``output_max_bytes``; 0: the
  process writes to the worker's stdout and stderr directly and nothing is kept), a
  killed run's included, and the short repr of its return value.
* Stopping a run: SIGTERM to the slot's process group, then SIGKILL to the group
  :data:`KILL_GRACE` seconds later, or as soon as the slot's own process has exited
  (what the job started goes with it). The process is then reaped and the slot starts a
  new one at its next run. The group is signalled only while its leader is unreaped, so a
  recycled process id is never signalled.
* A process that died, broke the protocol or was stopped is never used again, nor one
  whose run left something behind (``retire`` in its reply: threads, processes, or its
  stdio replaced or closed; :mod:`qcluster.worker.child`): its group is killed at once.
  A run that ended normally and cleanly leaves the process, and the modules it
  imported, for the next run.
* :meth:`Slot.stop` and :meth:`Slot.kill` may be called from any thread; the rest only
  from the owning thread.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from qcluster.store.runs import RunStatus
from qcluster.worker.frames import MAX_ERROR, MAX_RESULT, FrameError, FrameReader, encode
from qcluster.worker.output import OutputTail

log = logging.getLogger(__name__)

#: Seconds between SIGTERM and SIGKILL to a stopped run's process group.
KILL_GRACE = 2.0
#: Seconds a new slot process may take to import what it needs and say it is ready.
START_SECONDS = 60.0
#: How often the end of a process is looked for where ``pidfd_open`` is missing.
_EXIT_POLL = 0.2

Key = tuple[int, int]  # (run id, attempt)


class SlotError(Exception):
    """The slot's process could not be started."""


class Stop(NamedTuple):
    status: RunStatus
    reason: str


class RunEnd(NamedTuple):
    """How one run ended in its slot: its status and error, the tail of what it wrote
    (None: nothing, or output not kept), the repr of its return value (None: it returned
    None, or did not return)."""

    status: RunStatus
    error: str | None
    output: str | None = None
    result: str | None = None


def describe_exit(returncode: int) -> str:
    """``killed by SIGKILL``, ``exited with status 3``."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


class Slot:
    """One slot's child process, the worker's side (see the module doc)."""

    def __init__(self, name: str, *, job_paths: Sequence[str] = (),
                 kill_grace: float = KILL_GRACE, output_max_bytes: int = 0) -> None:
        self.name = name
        self.job_paths = [str(p) for p in job_paths]
        self.kill_grace = kill_grace
        self.output_max_bytes = output_max_bytes
        self._output: OutputTail | None = None
        self._lock = threading.Lock()  # _proc while it may be signalled, _key, _asked
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._pidfd: int | None = None
        self._key: Key | None = None
        self._asked: Stop | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.started = 0  # processes started, for tests and the benchmark

    @property
    def pid(self) -> int | None:
        with self._lock:
            return None if self._proc is None else self._proc.pid

    # -- any thread ---------------------------------------------------------------------

    def stop(self, key: Key, status: RunStatus, reason: str) -> bool:
        """Ask that the run ``key`` be stopped and recorded ``status`` with ``reason``;
        False if this slot is not (or no longer) running it, or a stop was already asked.
        Returns at once; the owning thread signals the group."""
        with self._lock:
            if self._key != key or self._asked is not None:
                return False
            self._asked = Stop(status, reason)
        with contextlib.suppress(BlockingIOError):  # a wake-up is pending already
            os.write(self._wake_w, b"\0")
        return True

    def kill(self) -> None:
        """SIGKILL the slot's process group now, if it has a live process."""
        with self._lock:
            self._signal(signal.SIGKILL)

    def frozen(self) -> bool:
        """Whether the slot's process is stopped: it stops its own group when it sees its
        worker stopped (``worker/child.py``), and waits for :meth:`thaw` or a kill."""
        pid = self.pid
        if pid is None:
            return False
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[-1].split()[:1] in (["T"], ["t"])

    def thaw(self) -> None:
        """SIGCONT the slot's process group."""
        with self._lock:
            self._signal(signal.SIGCONT)

    # -- the owning thread --------------------------------------------------------------

    def ensure(self) -> None:
        """Start the slot's process if it has none; SlotError if it cannot."""
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                return
            self._end()
        self._spawn()

    def assign(self, key: Key | None) -> None:
        """The run this slot is about to run (None: none): what :meth:`stop` matches."""
        with self._lock:
            self._key, self._asked = key, None

    def run(self, request: dict[str, Any], timeout: float | None) -> RunEnd:
        """Run one run (``request``: the ``run`` message, see :mod:`frames`) in the slot's
        process, started by :meth:`ensure`; how it ended. Never raises for what the job or
        its process does."""
        with self._lock:
            asked = self._asked
        if asked is not None:  # stopped before it began: nothing of it ran
            return RunEnd(asked.status, asked.reason)
        sock = self._sock
        assert sock is not None, "Slot.run before Slot.ensure"
        output = self._output
        if output is not None:
            output.begin()
        with contextlib.suppress(OSError):  # the process is gone: its end is seen below
            sock.sendall(encode(request))
        deadline = None if timeout is None else time.monotonic() + timeout
        reply, ended, asked = self._await(sock, deadline, timeout)
        if reply is None and asked is None:
            # A stop asked while the process was dying (the thaw thread's stop and kill at
            # once: the exit can wake the loop before it reads the stop) is the stop.
            with self._lock:
                asked = self._asked
        if reply is not None and not ended and asked is None:
            done = _outcome(reply, output)
            if "retire" in reply:  # it left something behind: it goes, with its group
                log.info("slot %s: a new process for the next run: %s", self.name,
                         str(reply["retire"])[:200])
                self._end()
            return done
        returncode = self._end()
        if reply is not None:  # it finished before the stop took effect
            return _outcome(reply, output)
        text = None if output is None else output.end()
        if asked is not None:
            return RunEnd(asked.status, asked.reason, text)
        return RunEnd(RunStatus.FAILED,
                      f"its process died: {ended or describe_exit(returncode)}", text)

    def close(self) -> None:
        """End the slot's process (SIGKILL to its group) and free what it holds."""
        if self._proc is not None:
            self._end()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1

    # -- inside ------------------------------------------------------------------------

    def _spawn(self) -> None:
        ours, theirs = socket.socketpair()
        # One pipe for stdout and stderr (``2>&1``): the tail keeps their order.
        pipe = os.pipe() if self.output_max_bytes > 0 else None
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "qcluster.worker.child", str(theirs.fileno()),
                 str(os.getpid())],
                stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),),
                stdout=None if pipe is None else pipe[1],
                stderr=None if pipe is None else subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as e:
            ours.close()
            for fd in pipe or ():
                os.close(fd)
            raise SlotError(f"could not start a slot process: {e}") from None
        finally:
            theirs.close()
        if pipe is not None:  # the process (and what it starts) holds the write end
            os.close(pipe[1])
            self._output = OutputTail(self.output_max_bytes, pipe[0])
        with self._lock:
            self._proc = proc
        self._sock = ours
        try:
            self._pidfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):  # not Linux 5.3+: the exit is polled for
            self._pidfd = None
        self.started += 1
        hello = {"op": "hello", "path": list(sys.path), "job_paths": self.job_paths,
                 "log_level": logging.getLogger().getEffectiveLevel()}
        with contextlib.suppress(OSError):
            ours.sendall(encode(hello))
        reply, ended, _ = self._await(ours, time.monotonic() + START_SECONDS, None,
                                      startup=True)
        if reply is None or "ready" not in reply:
            returncode = self._end()
            why = ended or describe_exit(returncode)
            raise SlotError(f"the slot process did not start: {why}")
        log.debug("slot %s: process %d ready", self.name, proc.pid)

    def _await(self, sock: socket.socket, deadline: float | None, timeout: float | None,
               *, startup: bool = False) -> tuple[dict[str, Any] | None, str | None,
                                                  Stop | None]:
        """Wait for one reply frame; (the reply or None, why the process is done or None,
        the stop asked or None). It signals the group as a stop or the deadline asks;
        ``startup``: no stop applies, ``deadline`` is the start's."""
        output = self._output
        piped = set() if output is None else set(output.fds)
        poller = select.poll()
        for fd in (sock.fileno(), self._wake_r, self._pidfd, *piped):
            if fd is not None:
                poller.register(fd, select.POLLIN)
        reader = FrameReader()
        stopping = _Stopping()
        while True:
            now = time.monotonic()
            if startup and deadline is not None and now >= deadline:
                return None, f"not ready within {START_SECONDS:g}s", None
            if not startup:
                stopping.asked = self._check(deadline, timeout, now)
                self._escalate(stopping, now)
            wait = _wait_for(now, deadline if stopping.asked is None else None,
                             stopping.kill_at(self.kill_grace), poll_exit=self._pidfd is None)
            events = poller.poll(None if wait is None else math.ceil(wait * 1000))
            exited = any(fd == self._pidfd for fd, _ in events)
            _pump(output, events, piped, poller)
            if any(fd == self._wake_r for fd, _ in events):
                _drain(self._wake_r)
            if any(fd == sock.fileno() for fd, _ in events):
                try:
                    data = sock.recv(1 << 16)
                    frames = reader.feed(data)
                except OSError as e:
                    return None, f"its socket failed ({e})", stopping.asked
                except FrameError as e:
                    return None, f"it broke the protocol ({e})", stopping.asked
                if frames:
                    return frames[0], None, stopping.asked
                exited = exited or not data
            if exited or (self._pidfd is None and self._exited()):
                return None, None, stopping.asked

    def _escalate(self, stopping: _Stopping, now: float) -> None:
        """SIGTERM to the group once a stop is asked, SIGKILL a kill grace later."""
        if stopping.asked is None:
            return
        if stopping.term_at is None:
            with self._lock:
                self._signal(signal.SIGTERM)
            stopping.term_at = now
        elif not stopping.killed and now >= stopping.term_at + self.kill_grace:
            with self._lock:
                self._signal(signal.SIGKILL)
            stopping.killed = True

    def _check(self, deadline: float | None, timeout: float | None, now: float) -> Stop | None:
        """The stop asked, asking the timeout's if the deadline has passed."""
        with self._lock:
            if self._asked is None and deadline is not None and now >= deadline:
                self._asked = Stop(RunStatus.TIMED_OUT, f"timed out after {timeout:g}s")
            return self._asked

    def _signal(self, sig: signal.Signals) -> None:
        """Signal the slot's process group (with ``_lock`` held): only while the leader
        is not reaped, so its id cannot have been given to another process."""
        if self._proc is None or self._proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    def _exited(self) -> bool:
        proc = self._proc
        if proc is None:
            return True
        try:  # WNOWAIT: the leader stays unreaped, its group id reserved
            return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) \
                is not None
        except ChildProcessError:
            return True

    def _end(self) -> int:
        """SIGKILL the group, reap the process, free the socket; its return code."""
        with self._lock:
            proc = self._proc
            assert proc is not None
            self._signal(signal.SIGKILL)
            self._proc = None  # signalled no more: it is reaped below
        returncode = proc.wait()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._output is not None:  # what the group wrote before it died stays kept
            self._output.close()
            self._output = None
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        return returncode


class _Stopping:
    """Where the stop of one run is: asked, SIGTERM sent at ``term_at``, SIGKILL sent."""

    def __init__(self) -> None:
        self.asked: Stop | None = None
        self.term_at: float | None = None
        self.killed = False

    def kill_at(self, grace: float) -> float | None:
        return None if self.term_at is None or self.killed else self.term_at + grace


def _wait_for(now: float, *deadlines: float | None, poll_exit: bool) -> float | None:
    """Seconds until the earliest of ``deadlines`` (None: no deadline), or until the next
    look for the process's exit (``poll_exit``); None: no bound."""
    left = [t - now for t in deadlines if t is not None]
    if poll_exit:
        left.append(_EXIT_POLL)
    return max(0.0, min(left)) if left else None


def _pump(output: OutputTail | None, events: list[tuple[int, int]], piped: set[int],
          poller: select.poll) -> None:
    """Read the output pipes that ``events`` name; poll no more those at end of file."""
    if output is None:
        return
    for fd, _ in events:
        if fd in piped:
            output.pump(fd)
            if fd not in output.fds_open():
                poller.unregister(fd)
                piped.discard(fd)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 64):
            pass
    except BlockingIOError:
        pass


def _outcome(reply: dict[str, Any], output: OutputTail | None) -> RunEnd:
    text = None if output is None else output.end()
    result = reply.get("result")
    result = result[:MAX_RESULT] if isinstance(result, str) else None
    if reply.get("ok") is True:
        return RunEnd(RunStatus.SUCCEEDED, None, text, result)
    error = reply.get("error")
    if reply.get("ok") is False and isinstance(error, str):
        return RunEnd(RunStatus.FAILED, error[:MAX_ERROR], text)
    return RunEnd(RunStatus.FAILED, "its process sent a malformed reply", text)
