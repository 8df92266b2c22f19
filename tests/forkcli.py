"""A fork server for the tests' ``qcluster`` commands: each command is a process of its own,
forked from one that has imported qcluster already.

Most of a ``qcluster`` command's CPU is the interpreter importing sqlalchemy, pydantic,
typer and qcluster (about a second on this 2-core machine, the command itself a tenth of
that), and the CLI tests run about two thousand commands. So :func:`run` asks a server
process (``python -m tests.forkcli SOCKET``, one per test process, started on first use)
to fork; the child takes the command's stdin, stdout and stderr (passed over the Unix
socket, ``SCM_RIGHTS``), its environment, working directory and argv, and runs
``python -m qcluster`` as ``runpy`` would, in a new session (so that a timeout kills its
process group), and the server sends back its exit status. What a test sees is what a
fresh ``python -m qcluster`` process gives: its own pid, its own file descriptors, its
exit status; only the imports were done before the fork.

What is read at import time comes from the server's environment, which is
``tests.helpers.cli_env(None)``'s: so a command whose environment differs from that in
more than ``QCLUSTER_*`` variables, or that reads stdin, is run by ``exec`` as before
(:func:`forkable`). ``QCLUSTER_TEST_FORK=0`` runs every command by ``exec``.

The server is single-threaded (a fork copies only the calling thread): it waits on its
socket, on a pidfd per child and on its stdin with ``selectors``; its stdin is a pipe from
the test process, so that it ends when that process ends, however it ends.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

HEADER = struct.Struct("!I")
ENABLED = os.environ.get("QCLUSTER_TEST_FORK", "1") != "0"


# -- the server -------------------------------------------------------------------------------


def _recv_exact(conn: socket.socket, n: int, fds: list[int]) -> bytes:
    data = b""
    while len(data) < n:
        msg, ancdata, _flags, _addr = conn.recvmsg(n - len(data),
                                                   socket.CMSG_SPACE(16 * 4))
        if not msg:
            raise EOFError
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[:len(payload) - len(payload) % got.itemsize])
                fds.extend(got)
        data += msg
    return data


def _child(request: Mapping[str, Any], fds: Sequence[int]) -> None:
    """In the forked child: become ``python -m qcluster ARGS`` and exit with its status."""
    code = 1
    try:
        os.setsid()
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.path[0] = request["cwd"]  # as `python -m` puts its working directory first
        sys.argv = [sys.executable, *request["args"]]
        import runpy

        try:
            runpy.run_module("qcluster", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if e.code is not None and not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
    except BaseException:  # what python would print for an uncaught exception
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
        with contextlib.suppress(BaseException):
            sys.stderr.flush()
        os._exit(code)


def serve(path: str) -> None:
    import qcluster.cli.main  # noqa: F401  (the point of this process)

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "listen")
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "parent")
    print("ready", flush=True)
    while True:
        for key, _events in sel.select():
            if key.data == "parent":  # our test process is gone (EOF): so are we
                if not os.read(key.fd, 4096):
                    return
            elif key.data == "listen":
                conn, _ = listener.accept()
                fds: list[int] = []
                try:
                    size = HEADER.unpack(_recv_exact(conn, HEADER.size, fds))[0]
                    request = json.loads(_recv_exact(conn, size, fds))
                except (EOFError, OSError, ValueError):
                    for fd in fds:
                        os.close(fd)
                    conn.close()
                    continue
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    conn.close()
                    _child(request, fds)
                for fd in fds:
                    os.close(fd)
                conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
                pidfd = os.pidfd_open(pid)
                sel.register(pidfd, selectors.EVENT_READ, (pid, conn))
            else:
                pid, conn = key.data
                sel.unregister(key.fd)
                os.close(key.fd)
                _, status = os.waitpid(pid, 0)
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps(
                        {"returncode": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
                conn.close()


# -- the client -------------------------------------------------------------------------------


class _Server:
    """This test process's fork server, started on first use, stopped at exit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="qc-forkcli-"))
        self.path = str(self._dir / "sock")

    def ensure(self, env: Mapping[str, str]) -> None:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            root = Path(__file__).resolve().parent.parent
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "tests.forkcli", self.path], cwd=root, env=dict(env),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                text=True)  # stdin: its end tells the server that this process is gone
            assert self._proc.stdout is not None
            if self._proc.stdout.readline().strip() != "ready":
                raise RuntimeError("the qcluster fork server did not start")
            import atexit

            atexit.register(self.stop)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None


_SERVER = _Server()


def forkable(env: Mapping[str, str], baseline: Mapping[str, str], stdin: Any) -> bool:
    """Whether a command can be forked: stdin not read, and its environment the server's
    but for ``QCLUSTER_*`` variables (read when used, not at import)."""
    if not ENABLED or stdin not in (None, subprocess.DEVNULL):
        return False
    keys = set(env) | set(baseline)
    return all(k.startswith("QCLUSTER_") or env.get(k) == baseline.get(k) for k in keys)


def run(args: Sequence[str], *, env: Mapping[str, str], baseline: Mapping[str, str],
        cwd: Path | None, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``python -m qcluster ARGS`` by a fork of the server; as ``subprocess.run`` with
    ``capture_output=True, text=True, stdin=DEVNULL``, raising ``TimeoutExpired`` (the
    command's process group killed) after ``timeout`` seconds."""
    _SERVER.ensure(baseline)
    command = [sys.executable, "-m", "qcluster", *args]
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(_SERVER.path)
        body = json.dumps({"args": list(args), "env": dict(env),
                           "cwd": str(cwd or os.getcwd())}).encode()
        socket.send_fds(conn, [HEADER.pack(len(body)) + body], [null, out_w, err_w])
    finally:
        for fd in (null, out_w, err_w):
            os.close(fd)
    reader = conn.makefile("rb")
    pid = int(json.loads(reader.readline())["pid"])
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
    deadline = time.monotonic() + timeout
    timed_out = False
    with selectors.DefaultSelector() as sel:
        for fd in chunks:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
                deadline = time.monotonic() + 5  # what is left in the pipes
            for key, _ in sel.select(max(left, 0.05)):
                data = os.read(key.fd, 65536)
                if data:
                    chunks[key.fd].append(data)
                else:
                    sel.unregister(key.fd)
    for fd in chunks:
        os.close(fd)
    line = reader.readline()
    reader.close()
    conn.close()
    stdout, stderr = (_text(b"".join(chunks[fd])) for fd in (out_r, err_r))
    if timed_out:
        raise subprocess.TimeoutExpired(command, timeout, stdout, stderr)
    returncode = int(json.loads(line)["returncode"]) if line else -signal.SIGKILL
    return subprocess.CompletedProcess(command, returncode, stdout, stderr)


def _text(data: bytes) -> str:
    """As ``subprocess.run(text=True)`` decodes: UTF-8, universal newlines."""
    return data.decode().replace("\r\n", "\n").replace("\r", "\n")


if __name__ == "__main__":
    serve(sys.argv[1])
