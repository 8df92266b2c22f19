"""A slot process: ``python -m qcluster.worker.child FD PARENT_PID``, started by
:class:`qcluster.worker.slots.Slot`. It runs the runs its worker sends over the socket
``FD`` (:mod:`qcluster.worker.frames`), one at a time, in its main thread.

Promises:

* It dies with its worker: ``PR_SET_PDEATHSIG`` = SIGKILL (Linux; asked at once, then
  the parent is checked to be still ``PARENT_PID``, so a worker that died before the ask
  is noticed too), and it exits when its socket reaches end of file between runs.
* It is the leader of its own session and process group (the worker starts it so), so
  a worker that kills the group kills what the job started with it. It keeps the
  default SIGTERM action: SIGTERM ends it, unless the job installs a handler.
* It imports a job's function by its reference with
  :func:`qcluster.definitions.imports.resolve_func`, on the worker's import path (sent in
  the hello: ``sys.path`` and ``[jobs] paths``), from the worker's working directory, and
  keeps it: module state persists from one run to the next in this process. The worker
  checks the reference against ``[jobs] allow`` before it sends a run.
* Around each call ``current_run()`` tells the job its run; the call's return value is
  sent back as its short repr (``reprlib``: at most
  :data:`~qcluster.worker.frames.MAX_RESULT` characters, never the object; a repr that
  raises is sent as ``<unrepresentable Type>``); an exception is sent back as ``Type:
  message`` (at most :data:`~qcluster.worker.frames.MAX_ERROR` characters) and its
  traceback written to stderr, a reference it cannot import as ``refused: ...``.
* It runs no run after one that left something behind: replaced or closed
  ``sys.stdout``, ``sys.stderr`` or fds 0-2, threads still running, or a process still
  running (its own child, or an orphan of one: it is their subreaper). It replies with
  ``retire`` saying what, and exits; the worker kills the slot's process group, so what
  the run left is ended, and starts a new process for the next run. So a run's output
  and its stdio are its own.
* Its stdin is ``/dev/null``; stdout and stderr are what the worker gave it (one pipe the
  worker reads and keeps each run's tail of, :mod:`qcluster.worker.output`, or the
  worker's own), line-buffered (a pipe would keep stdout's lines behind stderr's), and
  flushed after each run, before the reply. Log records go to stderr.
* It is stopped when its worker is (Linux): while a job runs, a thread looks at the
  worker's state every :data:`FREEZE_CHECK` s, and when the worker is stopped (SIGSTOP,
  a debugger) it stops its own process group, so that a job's code never runs on while
  its worker cannot be heard. The worker, once it runs again, continues it (SIGCONT)
  or, if a leader has counted the run out meanwhile, kills it
  (:class:`qcluster.worker.slotset.SlotSet`).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import reprlib
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from qcluster.errors import QClusterError
from qcluster.worker.context import RunContext, enter_run, leave_run
from qcluster.worker.frames import MAX_ERROR, MAX_RESULT, encode, read_frame

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def die_with_parent(parent: int) -> None:
    """Ask the kernel for SIGKILL when the worker (the thread that started us) ends, then
    check that it has not already ended."""
    if sys.platform.startswith("linux"):
        # The process's own symbols, libc's among them: ctypes.util.find_library would
        # run ldconfig, a tenth of the process's start.
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # A job's orphans (a daemonised grandchild) become ours, so that we see them.
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


#: How often a slot process that runs a job looks whether its worker is stopped (an
#: idle one does not look: no job code runs in it). A leader counts a silent worker's
#: runs out only after its claim lease, seconds later.
FREEZE_CHECK = 0.1
#: How long the watcher goes on looking, on its own clock, after the last run ended: a
#: stream of short runs then wakes it every FREEZE_CHECK, not at each run's start (a
#: wake of a sleeping thread costs about as much as the run itself), and a slot that is
#: idle that long makes it wait for the next run, waking no more.
FREEZE_LINGER = 1.0
_busy = threading.Event()  # set while a job's code runs
_ended = [0.0]  # time.monotonic() when the last run ended


def _freeze_with(parent: int) -> None:
    """Stop this process group while ``parent`` is stopped (see the module doc)."""
    path = f"/proc/{parent}/stat"
    while True:
        _busy.wait()
        while True:
            time.sleep(FREEZE_CHECK)
            if not _busy.is_set():  # between runs: no job code to stop
                if time.monotonic() - _ended[0] >= FREEZE_LINGER:
                    break
                continue
            try:
                with open(path) as f:
                    state = f.read().rsplit(")", 1)[-1].split()[:1]
            except OSError:  # gone: the kernel's death signal ends this process
                return
            if state in (["T"], ["t"]):
                os.killpg(os.getpgrp(), signal.SIGSTOP)


def _call(funcs: dict[str, Any], resolve: Callable[[str], Any],
          request: dict[str, Any]) -> dict[str, Any]:
    ctx = RunContext(
        job_id=request["job_id"], run_id=request["run_id"],
        scheduled_at=datetime.fromtimestamp(request["scheduled_at"], UTC),
        attempt=request["attempt"], epoch=request["epoch"], worker_id=request["worker_id"],
        shard=request.get("shard"), shards=request.get("shards"),
    )
    token = enter_run(ctx)
    _busy.set()
    try:
        ref = request["func"]
        func = funcs.get(ref)
        if func is None:
            func = funcs[ref] = resolve(ref)
        value = func(*json.loads(request["args"]), **json.loads(request["kwargs"]))
    except QClusterError as e:
        return {"ok": False, "error": f"refused: {e}"[:MAX_ERROR]}
    except BaseException as e:  # a job's failure is data, also SystemExit and the like
        with contextlib.suppress(Exception):
            traceback.print_exc(file=sys.__stderr__)
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:MAX_ERROR]}
    finally:
        _busy.clear()
        _ended[0] = time.monotonic()
        leave_run(token)
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                stream.flush()  # type: ignore[union-attr]  # closed, replaced: no matter
    if value is None:
        return {"ok": True}
    return {"ok": True, "result": short_repr(value)}


_REPR = reprlib.Repr()  # Python 3.12 takes these as arguments; 3.11 as attributes
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 10, 10, 10, 10
_REPR.maxstring = _REPR.maxother = MAX_RESULT


def short_repr(value: object) -> str:
    """A bounded repr of a job's return value: containers cut after a few items, at most
    :data:`MAX_RESULT` characters; never raises."""
    try:
        text = _REPR.repr(value)
    except Exception:  # a job's own __repr__ that raises
        text = f"<unrepresentable {type(value).__name__}>"
    return text[:MAX_RESULT]


class _Baseline:
    """What this process is between runs: its stdio (the objects and the files behind
    fds 0-2) and its threads. A run that changes one of them, or leaves a process behind,
    would hand its damage or its output to the next run, so the process ends after it
    and the slot starts a new one (the module doc)."""

    def __init__(self) -> None:
        self.streams = (sys.stdout, sys.stderr)
        self.files = {fd: _identity(fd) for fd in (0, 1, 2)}
        self.threads = threading.active_count()

    def left_behind(self) -> str | None:
        """Why the process must not run another run, or None."""
        if (sys.stdout, sys.stderr) != self.streams or any(
                getattr(s, "closed", True) for s in self.streams):
            return "the run replaced or closed sys.stdout or sys.stderr"
        for fd, was in self.files.items():
            if _identity(fd) != was:
                return f"the run closed or replaced its fd {fd}"
        if threading.active_count() > self.threads:
            return "the run left threads running"
        if _children_left():
            return "the run left processes running"
        return None


def _identity(fd: int) -> tuple[int, int] | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _children_left() -> bool:
    """Whether a child of this process still runs; reaps those that ended (this
    process is their subreaper: a job's orphans come back to it)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:  # no child at all
            return False
        if pid == 0:  # one still runs
            return True


def serve(sock: socket.socket, parent: int | None = None) -> int:
    """Answer the hello, then run what comes until end of file; the exit status. With
    ``parent``, stopped while it is (see the module doc)."""
    if parent is not None and os.path.exists(f"/proc/{parent}/stat"):
        threading.Thread(target=_freeze_with, args=(parent,), name="qc-freeze",
                         daemon=True).start()
    hello = read_frame(sock)
    if hello is None or hello.get("op") != "hello":
        return 2
    sys.path[:] = [str(p) for p in hello["path"]]
    # Imported only now, on the worker's path: it is the worker's copy of qcluster that
    # resolves references, as it was when jobs ran in the worker's threads.
    from qcluster.definitions.imports import extend_import_path, resolve_func

    extend_import_path(hello["job_paths"])
    for stream in (sys.stdout, sys.stderr):  # a pipe: lines in the order written, as a tty
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    logging.basicConfig(level=int(hello["log_level"]), stream=sys.stderr, format=LOG_FORMAT)
    sock.sendall(encode({"ready": os.getpid()}))
    funcs: dict[str, Any] = {}
    clean = _Baseline()
    while True:
        request = read_frame(sock)
        if request is None:  # the worker closed the slot, or died
            return 0
        if request.get("op") != "run":
            return 2
        reply = _call(funcs, resolve_func, request)
        why = clean.left_behind()
        if why is not None:
            reply["retire"] = why[:MAX_ERROR]
        sock.sendall(encode(reply))
        if why is not None:
            return 0  # the worker ends the group: what the run left goes with it


def main(argv: list[str]) -> int:
    fd, parent = int(argv[1]), int(argv[2])
    die_with_parent(parent)
    os.set_inheritable(fd, False)  # what the job execs does not hold the worker's socket
    sock = socket.socket(fileno=fd)
    try:
        return serve(sock, parent)
    except (OSError, EOFError):  # the worker went away mid-frame
        return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
