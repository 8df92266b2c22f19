"""The life cycle shared by every test server: ports, processes, signals, clean-up.

See the package docstring (tests/servers/__init__.py) for what a server promises.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import Any, Self

log = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
_POLL_INTERVAL = 0.05


class ServerError(RuntimeError):
    """Root of this module's errors."""


class ServerUnavailable(ServerError):
    """A program that the server needs is not installed."""


class ServerStartError(ServerError):
    """The server was started but did not come up."""


def _server_port_range() -> range:
    """Ports below the kernel's ephemeral range (where client sockets get theirs).

    A stopped test server must be able to bind its port again; a client connection that
    happened to get that port as its local one would block it.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(10000, low) if low > 12000 else range(0)


_handed_out: set[int] = set()


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port that nothing listens on now, never handed out before by this process.

    Picked at random below the ephemeral port range (see ``_server_port_range``), so that
    parallel test runs rarely collide; another process may still take it before the caller
    binds it, a race that tests accept.
    """
    candidates = _server_port_range()
    for _ in range(200):
        port = random.choice(candidates) if candidates else 0
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            port = int(sock.getsockname()[1])
        _handed_out.add(port)
        return port
    raise ServerError(f"no free TCP port found on {host}")


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def tcp_request(
    host: str,
    port: int,
    payload: bytes,
    *,
    until: bytes | None = None,
    timeout: float = 1.0,
) -> bytes:
    """Send payload, then read until ``until`` appears, the peer closes, or timeout passes."""
    chunks: list[bytes] = []
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(payload)
        with contextlib.suppress(TimeoutError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                if until is not None and until in b"".join(chunks):
                    break
    return b"".join(chunks)


@functools.cache
def _setpriv() -> str | None:
    """util-linux's setpriv when it can set a parent-death signal (2.33 and later)."""
    path = shutil.which("setpriv")
    if path is None:
        return None
    probe = subprocess.run([path, "--help"], capture_output=True, text=True, check=False)
    return path if "--pdeathsig" in probe.stdout else None


def _process_table() -> dict[int, tuple[str, int, int]]:
    """pid -> (state, ppid, pgrp) of every live (not zombie) process; empty without /proc."""
    table: dict[int, tuple[str, int, int]] = {}
    with contextlib.suppress(FileNotFoundError), os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            # The command name may hold spaces and parentheses; the fields after the
            # last ")" are fixed: state, ppid, pgrp, ...
            state, ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
            if state not in ("Z", "X"):
                table[int(entry.name)] = (state, int(ppid), int(pgrp))
    return table


def _family(root: int) -> set[int]:
    """Live processes under ``root`` or in its process group, ``root`` excluded.

    Both count: PostgreSQL makes each backend the leader of a session of its own, so
    only the parent links find them; the process group finds orphans of a dead parent.
    """
    table = _process_table()
    found = {pid for pid, (_, _, pgrp) in table.items() if pgrp == root}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (_, ppid, _) in table.items() if ppid == parent]
        frontier += [pid for pid in children if pid not in found]
        found.update(children)
    found.discard(root)
    return found


def _signal(pids: set[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_stopped(pid: int, timeout: float = 2.0) -> None:
    """Wait (bounded) until SIGSTOP has taken effect on ``pid``: after that it forks no more."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = _process_table().get(pid)
        if entry is None or entry[0] in ("T", "t"):
            return
        time.sleep(0.01)


class Server(ABC):
    """One private server process on 127.0.0.1:``port`` with its files under ``dir``."""

    kind = "server"
    #: The signal for a graceful stop.
    stop_signal: signal.Signals = signal.SIGTERM

    def __init__(
        self,
        *,
        port: int | None = None,
        start_timeout: float = START_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        self.host = LOCALHOST
        self.port = port if port is not None else free_port()
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.dir = Path(tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{self.kind}-"))
        (self.dir / _OWNER_FILE).write_text(str(os.getpid()))
        self.log_path = self.dir / f"{self.kind}.log"
        #: The OS user that runs the server, when not this process's own.
        self.os_user: pwd.struct_passwd | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._prepared = False
        self._paused = False
        self._closed = False
        _UNCLOSED.add(self)

    def _run_as(self) -> dict[str, Any]:
        """subprocess keyword arguments that run the server as ``os_user`` (if any)."""
        if self.os_user is None:
            return {}
        return {"user": self.os_user.pw_uid, "group": self.os_user.pw_gid,
                "extra_groups": []}

    # -- what each kind of server defines

    @abstractmethod
    def _prepare(self) -> None:
        """Create the server's files; runs once, before the first start."""

    @abstractmethod
    def _command(self) -> list[str]:
        """The command that runs the server in the foreground."""

    @abstractmethod
    def _ready(self) -> bool:
        """Whether the server answers on its port (called while its process runs)."""

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    # -- life cycle

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def paused(self) -> bool:
        return self._paused

    def start(self) -> Self:
        """Start the server and wait until it accepts connections; a no-op when running."""
        if self._closed:
            raise ServerError(f"{self!r} is closed")
        if self.running:
            return self
        if not self._prepared:
            self._prepare()
            self._prepared = True
        command = self._command()
        setpriv = _setpriv()
        if setpriv is not None:
            command = [setpriv, "--pdeathsig", "KILL", "--", *command]
        user = self._run_as()
        with open(self.log_path, "ab") as logfile:
            logfile.write(f"--- qcluster tests: start {' '.join(command)}\n".encode())
            logfile.flush()
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                env=self._env(),
                start_new_session=True,  # Ctrl-C at the terminal must not reach it
                **user,
            )
        self._paused = False
        try:
            self._wait_ready(self._proc)
        except BaseException:
            self.kill()
            raise
        log.debug("started %r", self)
        return self

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            code = proc.poll()
            if code is not None:
                raise ServerStartError(
                    f"{self.kind} exited with code {code} while starting on "
                    f"{self.host}:{self.port}; log {self.log_path}:\n{self.log_tail()}"
                )
            if self._ready():
                return
            if time.monotonic() >= deadline:
                raise ServerStartError(
                    f"{self.kind} did not accept connections on {self.host}:{self.port} "
                    f"within {self.start_timeout:.0f}s; log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(_POLL_INTERVAL)

    def stop(self) -> None:
        """Shut the server down gracefully (SIGKILL after ``stop_timeout``); idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, self.stop_signal)
            if self._paused:  # a stopped process handles no signal until it continues
                self.resume()
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                log.warning("%r did not stop within %.0fs; killing it", self, self.stop_timeout)
                self.kill()
                return
        self._reap(proc)

    def kill(self) -> None:
        """Kill the server and every process under it with SIGKILL, as a crash would;
        idempotent."""
        proc = self._proc
        if proc is None:
            return
        # Freeze the main process first so that it starts no new child while we list them.
        _signal({proc.pid}, signal.SIGSTOP)
        _wait_stopped(proc.pid)
        family = _family(proc.pid)
        _signal({proc.pid, *family}, signal.SIGKILL)
        proc.wait()
        self._reap(proc, family)

    def _reap(self, proc: subprocess.Popen[bytes], family: set[int] | None = None) -> None:
        # Wait (bounded) for the other processes too, e.g. PostgreSQL backends: a restart
        # on the same data directory needs them gone.
        family = (family or set()) | _family(proc.pid)
        deadline = time.monotonic() + 10.0
        while (alive := family & _process_table().keys()) and time.monotonic() < deadline:
            _signal(alive, signal.SIGKILL)
            time.sleep(_POLL_INTERVAL)
        self._proc = None
        self._paused = False

    def pause(self) -> None:
        """Freeze the server and every process under it (SIGSTOP): connections hang, and
        none is refused."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise ServerError(f"{self!r} is not running")
        _signal({proc.pid}, signal.SIGSTOP)
        _wait_stopped(proc.pid)
        _signal(_family(proc.pid), signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Thaw a paused server (SIGCONT)."""
        if self._proc is not None:
            _signal({self._proc.pid, *_family(self._proc.pid)}, signal.SIGCONT)
        self._paused = False

    def close(self) -> None:
        """Stop the server and delete its directory; idempotent."""
        if self._closed:
            return
        try:
            self.stop()
        finally:
            self._closed = True
            _UNCLOSED.discard(self)
            shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.host}:{self.port} pid={self.pid} dir={self.dir}>"


_UNCLOSED: set[Server] = set()
_DIR_PREFIX = "qct-"
_OWNER_FILE = ".owner-pid"


def sweep_stale_dirs() -> None:
    """Delete the directories of servers whose test process is gone.

    A test run ended by SIGKILL or SIGTERM runs no atexit hook; its servers die with it
    (PR_SET_PDEATHSIG) but their directories stay. The next run removes them here.
    """
    for path in Path(tempfile.gettempdir()).glob(f"{_DIR_PREFIX}*-*"):
        try:
            owner = int((path / _OWNER_FILE).read_text())
            os.kill(owner, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (OSError, ValueError):
            continue  # not ours to judge: no owner file, or another user's process


sweep_stale_dirs()


@atexit.register
def _kill_unclosed() -> None:
    for server in list(_UNCLOSED):
        with contextlib.suppress(Exception):
            server.kill()
        shutil.rmtree(server.dir, ignore_errors=True)
        _UNCLOSED.discard(server)
