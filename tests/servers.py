"""Private PostgreSQL, ZooKeeper and Redis servers on loopback, for tests.

Each server is an object. ``start()`` runs it in the foreground as a child process, on a
free 127.0.0.1 port, with its files in a private temporary directory, and returns only once
it accepts connections. ``stop()`` shuts it down gracefully and ``kill()`` with SIGKILL;
both keep the port and the data directory, so a later ``start()`` brings back the same
server with the same data (Redis keeps data only with ``persist=True``). ``pause()`` and
``resume()`` freeze and thaw the whole process group (SIGSTOP/SIGCONT). ``close()`` stops
the server and deletes its directory; a ``with`` block calls ``start()`` and ``close()``.

Promises:

- a server listens on 127.0.0.1 only;
- a failed start raises :class:`ServerStartError` with the tail of the server's log; a
  missing program raises :class:`ServerUnavailable`; both derive from :class:`ServerError`;
- nothing outlives the interpreter: an atexit hook kills every server not yet closed and
  deletes its directory. Where util-linux's ``setpriv`` exists, the kernel also kills a
  server when the thread that started it dies (PR_SET_PDEATHSIG), which covers a test run
  killed with SIGKILL. So start servers from a thread that lives as long as they should
  (pytest's main thread does).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit, urlunsplit

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


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port that nothing listens on at the time of the call.

    Another process may take it before the caller binds it; tests accept that race.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def tcp_request(
    host: str, port: int, payload: bytes, *, until: bytes | None = None, timeout: float = 1.0
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
        self.dir = Path(tempfile.mkdtemp(prefix=f"qct-{self.kind}-"))
        self.log_path = self.dir / f"{self.kind}.log"
        #: The OS user that runs the server, when not this process's own.
        self.os_user: pwd.struct_passwd | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._prepared = False
        self._paused = False
        self._closed = False
        _UNCLOSED.add(self)

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
        user: dict[str, Any] = {}
        if self.os_user is not None:
            user = {"user": self.os_user.pw_uid, "group": self.os_user.pw_gid, "extra_groups": []}
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
                start_new_session=True,  # its own process group: signals reach all of it
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


@atexit.register
def _kill_unclosed() -> None:
    for server in list(_UNCLOSED):
        with contextlib.suppress(Exception):
            server.kill()
        shutil.rmtree(server.dir, ignore_errors=True)
        _UNCLOSED.discard(server)


# -- PostgreSQL


def find_pg_bindir() -> Path:
    """The directory of ``postgres`` and ``initdb``: $QCLUSTER_PG_BINDIR, else Debian's
    newest /usr/lib/postgresql/N/bin, else the one on PATH."""
    candidates: list[Path] = []
    if env := os.environ.get("QCLUSTER_PG_BINDIR"):
        candidates.append(Path(env))
    debian = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(
        debian, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True
    )
    if on_path := shutil.which("postgres"):
        candidates.append(Path(on_path).resolve().parent)
    for bindir in candidates:
        if (bindir / "postgres").is_file() and (bindir / "initdb").is_file():
            return bindir
    raise ServerUnavailable(
        "PostgreSQL server programs (postgres, initdb) not found: install the 'postgresql' "
        "package or set QCLUSTER_PG_BINDIR"
    )


class PostgresServer(Server):
    """A PostgreSQL cluster made by initdb, with trust authentication on loopback.

    The superuser is ``postgres``. As root, the server runs as the ``postgres`` OS user
    (PostgreSQL refuses to run as root) and the directory belongs to that user.
    """

    kind = "postgres"
    # SIGINT is the "fast" shutdown; SIGTERM ("smart") would wait for every client to leave.
    stop_signal = signal.SIGINT
    user = "postgres"

    def __init__(
        self,
        *,
        port: int | None = None,
        max_connections: int = 200,
        settings: Mapping[str, str] | None = None,
        start_timeout: float = START_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        self.bindir = find_pg_bindir()
        os_user = None
        if os.geteuid() == 0:
            try:
                os_user = pwd.getpwnam("postgres")
            except KeyError:
                raise ServerUnavailable(
                    "PostgreSQL refuses to run as root, and there is no 'postgres' OS user "
                    "to run it as"
                ) from None
        super().__init__(port=port, start_timeout=start_timeout, stop_timeout=stop_timeout)
        self.os_user = os_user
        if os_user is not None:
            os.chown(self.dir, os_user.pw_uid, os_user.pw_gid)
        self.data_dir = self.dir / "data"
        self.settings: dict[str, str] = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": str(self.dir),
            "max_connections": str(max_connections),
            "shared_buffers": "64MB",
            # No fsync: a commit still reaches the OS before it is acknowledged, so it
            # survives kill -9 of the server (not a crash of the machine). Leave
            # synchronous_commit on: off would lose acknowledged commits on kill -9.
            "fsync": "off",
            "full_page_writes": "off",
            "log_line_prefix": "%m [%p] ",
            **(settings or {}),
        }

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the ``postgres`` database."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/postgres"

    @property
    def conninfo(self) -> str:
        """libpq connection string of the ``postgres`` database (for psycopg)."""
        return f"host={self.host} port={self.port} user={self.user} dbname=postgres"

    def create_database(self, name: str) -> str:
        """Create database ``name``; return its SQLAlchemy URL."""
        return create_database(self.url, name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, ending its connections."""
        drop_database(self.url, name)

    def _env(self) -> dict[str, str]:
        # PGDATA, PGPORT and friends from the caller's shell must not steer this server.
        return {k: v for k, v in os.environ.items() if not k.startswith("PG")}

    def _prepare(self) -> None:
        command = [
            str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", self.user,
            "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync",
        ]  # fmt: skip
        user: dict[str, Any] = {}
        if self.os_user is not None:
            user = {"user": self.os_user.pw_uid, "group": self.os_user.pw_gid, "extra_groups": []}
        with open(self.log_path, "ab") as logfile:
            done = subprocess.run(
                command, stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT,
                cwd=self.dir, env=self._env(), check=False, **user,
            )  # fmt: skip
        if done.returncode != 0:
            hint = ""
            if self.os_user is not None:
                hint = f" (can the '{self.os_user.pw_name}' OS user reach {self.dir}?)"
            raise ServerStartError(
                f"initdb failed with code {done.returncode}{hint}; log {self.log_path}:\n"
                f"{self.log_tail()}"
            )

    def _command(self) -> list[str]:
        command = [str(self.bindir / "postgres"), "-D", str(self.data_dir)]
        for key, value in self.settings.items():
            command += ["-c", f"{key}={value}"]
        return command

    def _ready(self) -> bool:
        # postmaster.pid: line 1 is the pid, line 8 the status ("ready" once it accepts
        # connections). Checking the pid ignores a stale file left by a killed server.
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return (
            len(lines) >= 8
            and lines[0].strip() == str(self.pid)
            and lines[7].strip() == "ready"
            and port_open(self.host, self.port)
        )


def _libpq_url(url: str) -> str:
    """A SQLAlchemy PostgreSQL URL without its ``+driver``, which libpq accepts."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme=parts.scheme.split("+", 1)[0]))


def database_url(url: str, name: str) -> str:
    """``url`` with its database replaced by ``name``."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def create_database(admin_url: str, name: str) -> str:
    """Create database ``name`` on the server of ``admin_url``; return the new URL."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(_libpq_url(admin_url), autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return database_url(admin_url, name)


def drop_database(admin_url: str, name: str) -> None:
    """Drop database ``name`` if it exists, ending the sessions still connected to it."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(_libpq_url(admin_url), autocommit=True, connect_timeout=10) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


# -- ZooKeeper


def _zookeeper_classpath() -> str:
    """$ZOOKEEPER_HOME's jars (an Apache tarball), else Debian's zookeeper package."""
    if home := os.environ.get("ZOOKEEPER_HOME"):
        return os.pathsep.join([f"{home}/lib/*", f"{home}/*"])
    debian = Path("/usr/share/java/zookeeper.jar")
    if not debian.is_file():
        raise ServerUnavailable(
            "ZooKeeper not found: install the 'zookeeper' package or set ZOOKEEPER_HOME"
        )
    # The jar's manifest names its dependencies; slf4j-simple, when there, makes it log.
    jars = [debian, Path("/usr/share/java/slf4j-simple.jar")]
    return os.pathsep.join(str(jar) for jar in jars if jar.is_file())


def _java() -> str:
    if (home := os.environ.get("JAVA_HOME")) and Path(home, "bin", "java").is_file():
        return str(Path(home, "bin", "java"))
    if found := shutil.which("java"):
        return found
    raise ServerUnavailable("java not found: install a Java runtime (default-jre-headless)")


class ZooKeeperServer(Server):
    """A standalone ZooKeeper that allows short sessions (``min_session_timeout_ms``).

    Its data survives stop/start and kill/start. All four-letter words are enabled.
    """

    kind = "zookeeper"

    def __init__(
        self,
        *,
        port: int | None = None,
        tick_time_ms: int = 500,
        min_session_timeout_ms: int = 1000,
        max_session_timeout_ms: int = 60000,
        heap_mb: int = 256,
        start_timeout: float = START_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        self.java = _java()
        self.classpath = _zookeeper_classpath()
        super().__init__(port=port, start_timeout=start_timeout, stop_timeout=stop_timeout)
        self.heap_mb = heap_mb
        self.config: dict[str, str] = {
            "tickTime": str(tick_time_ms),
            "dataDir": str(self.dir / "data"),
            "clientPort": str(self.port),
            "clientPortAddress": self.host,
            "minSessionTimeout": str(min_session_timeout_ms),
            "maxSessionTimeout": str(max_session_timeout_ms),
            "maxClientCnxns": "0",  # no per-IP limit: every test client comes from 127.0.0.1
            "admin.enableServer": "false",
            "4lw.commands.whitelist": "*",
            "forceSync": "no",
        }

    @property
    def hosts(self) -> str:
        """The connect string, "127.0.0.1:PORT"."""
        return f"{self.host}:{self.port}"

    def four_letter_word(self, word: str, timeout: float = 1.0) -> str:
        """Send a four-letter command ("ruok", "srvr", "cons", ...) and return the answer."""
        answer = tcp_request(self.host, self.port, word.encode(), timeout=timeout)
        return answer.decode(errors="replace")

    def _prepare(self) -> None:
        (self.dir / "data").mkdir()
        lines = [f"{key}={value}" for key, value in self.config.items()]
        (self.dir / "zoo.cfg").write_text("\n".join(lines) + "\n")

    def _command(self) -> list[str]:
        return [
            self.java,
            f"-Xmx{self.heap_mb}m",
            "-XX:+UseSerialGC",  # few threads and little memory on a small test machine
            "-XX:TieredStopAtLevel=1",  # faster start
            "-Djava.net.preferIPv4Stack=true",
            "-Dzookeeper.admin.enableServer=false",
            "-Dorg.slf4j.simpleLogger.showDateTime=true",
            "-cp",
            self.classpath,
            "org.apache.zookeeper.server.ZooKeeperServerMain",
            str(self.dir / "zoo.cfg"),
        ]

    def _ready(self) -> bool:
        # "srvr" answers "not currently serving requests" until the server is up.
        try:
            return "Mode: standalone" in self.four_letter_word("srvr", timeout=0.5)
        except OSError:
            return False


# -- Redis


def _redis_server() -> str:
    for found in (shutil.which("redis-server"), "/usr/bin/redis-server", "/usr/sbin/redis-server"):
        if found and Path(found).is_file():
            return found
    raise ServerUnavailable("redis-server not found: install the 'redis-server' package")


class RedisServer(Server):
    """A Redis server. With ``persist=False`` (the default: no RDB, no AOF) a restart
    starts empty, as a real Redis without persistence would; ``persist=True`` turns on
    the append-only file so that data survives stop/start and kill/start."""

    kind = "redis"

    def __init__(
        self,
        *,
        port: int | None = None,
        persist: bool = False,
        start_timeout: float = START_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        self.program = _redis_server()
        super().__init__(port=port, start_timeout=start_timeout, stop_timeout=stop_timeout)
        self.persist = persist

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _prepare(self) -> None:
        """Nothing to create: redis-server makes its files in ``dir`` itself."""

    def _command(self) -> list[str]:
        return [
            self.program,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "yes" if self.persist else "no",
            "--appendfsync", "no",
            "--dir", str(self.dir),
            "--daemonize", "no",
            "--protected-mode", "no",
            "--logfile", "",
        ]  # fmt: skip

    def _ready(self) -> bool:
        # A Redis still loading its data answers "-LOADING", not "+PONG".
        try:
            answer = tcp_request(self.host, self.port, b"PING\r\n", until=b"\r\n", timeout=0.5)
        except OSError:
            return False
        return answer.startswith(b"+PONG")
