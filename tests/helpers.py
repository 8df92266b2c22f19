"""Run ``qcluster`` as real subprocesses, for tests.

A small library for every test that drives the command line or starts nodes:

- :func:`write_config` writes a ``qcluster.toml`` tuned for tests (short poll, lease,
  member timeout and heartbeat; a fixed RPC secret; an allow list that names
  ``jobs.builtin:shell`` and ``jobs.examples:record_run``), mode 600 so qcluster does
  not warn;
- :func:`write_job_file` writes a ``jobs apply`` file of ``[[job]]`` tables;
- :func:`run_cli` runs ``python -m qcluster ...`` and returns its text output, and
  :func:`run_cli_many` runs independent commands a few at a time;
- :func:`start_node` starts ``qcluster start`` in a process group of its own, logging to a
  file, as a :class:`NodeProcess` that a ``with`` block always kills at exit;
- :func:`wait_for` polls a condition and fails with a message that says what it waited for;
- :func:`runs_json`, :func:`jobs_json`, :func:`run_json`, :func:`read_records` and
  :func:`parse_time` read what the CLI and ``jobs.examples:record_run`` produce;
- :func:`assert_cli_error` checks the CLI's error contract: one ``error: ...`` line on
  stderr, a non-zero exit, no traceback.

Every child gets a clean environment: no ``QCLUSTER_*`` variable of the caller leaks in,
``QCLUSTER_CONFIG`` is set only when a config is given, and output is plain text (no
colour, wide enough that tables do not wrap).

Nothing here imports qcluster, so a broken product module fails the tests that use it,
not their collection.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from datetime import time as dt_time
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self, TypeVar

from tests import forkcli

T = TypeVar("T")

#: The RPC secret of every config that :func:`write_config` writes (at least 32 bytes, as
#: every secret must be).
TEST_SECRET = "test-secret-3f9a1c7e5b2d4068-a7c41e9b"

#: The jobs that run a process or write a file are allowed only by name, never by the
#: default ``jobs.*``: the tests' configs name the two that tests run.
TEST_ALLOW = ["jobs.*", "jobs.builtin:shell", "jobs.examples:record_run"]

#: Settings that make a test cluster react in about a second instead of ten.
TEST_SETTINGS: dict[str, Any] = {
    "rpc": {"secret": TEST_SECRET},
    "jobs": {"allow": TEST_ALLOW},
    "scheduler": {"poll_seconds": 0.2, "database_timeout_seconds": 3},
    "coordination": {"dblock": {"lease_seconds": 2}},
    "cluster": {"member_timeout_seconds": 3},
    "worker": {"heartbeat_seconds": 0.5},
}

CLI_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0


# -- TOML ---------------------------------------------------------------------------------


def toml_dumps(data: Mapping[str, Any]) -> str:
    """TOML text that ``tomllib.loads`` reads back as ``data``, the one TOML writer of
    the tests (configs, job files, and the fuzzers' random documents).

    Nested mappings become tables, lists of mappings arrays of tables (``[[job]]``), and
    mappings inside arrays inline tables. Values are str (any text: control characters,
    DEL, quotes and non-ASCII are escaped or kept as TOML allows), int, float (also nan
    and +-inf), bool, datetime (naive or with a whole-minute UTC offset), date, time
    (naive), and lists and tuples of them, mixed as TOML 1.0 allows. Keys are any text,
    bare where TOML allows, quoted otherwise. Integers outside 64 bits are written too:
    tomllib reads them, and the fuzzers use them on purpose. Anything else is a TypeError.
    """
    lines: list[str] = []
    _toml_table(lines, (), data)
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml_table(lines: list[str], path: tuple[str, ...], table: Mapping[str, Any]) -> None:
    plain = {k: v for k, v in table.items() if not _is_table(v) and not _is_table_array(v)}
    if path and (plain or not table):
        lines += ["", f"[{'.'.join(_toml_key(p) for p in path)}]"]
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in plain.items()]
    for key, value in table.items():
        if _is_table(value):
            _toml_table(lines, (*path, key), value)
        elif _is_table_array(value):
            header = ".".join(_toml_key(p) for p in (*path, key))
            for item in value:
                lines += ["", f"[[{header}]]"]
                lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in item.items()]


def _is_table(value: object) -> bool:
    return isinstance(value, Mapping)


def _is_table_array(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _toml_key(key: str) -> str:
    bare = key.replace("_", "").replace("-", "")
    return key if key and bare.isascii() and bare.isalnum() else _toml_string(key)


def _toml_string(text: str) -> str:
    # A JSON string is a TOML basic string, except that TOML also wants DEL escaped.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))  # an IntEnum too, as its number
    if isinstance(value, float):
        # repr is a TOML float: "1.5", "1e+16", "nan", "inf", "-inf"
        return repr(float(value))
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, datetime | date | dt_time):
        return _toml_datetime(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}"
                                for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_datetime(value: datetime | date | dt_time) -> str:
    """An offset or local date-time, a local date or a local time (RFC 3339 as TOML has it)."""
    offset = value.utcoffset() if isinstance(value, datetime | dt_time) else None
    if isinstance(value, dt_time) and offset is not None:
        raise TypeError(f"TOML has no time of day with an offset: {value!r}")
    if offset is not None and offset % timedelta(minutes=1):
        raise TypeError(f"TOML offsets are whole minutes: {value!r}")
    return value.isoformat()


def _merge(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``changes``, mappings merged deeply; a None value removes a key."""
    out = dict(base)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# -- config and job files -------------------------------------------------------------------


def write_config(tmp_path: Path, db_url: str, *, name: str = "qcluster.toml",
                 **overrides: Any) -> Path:
    """Write a test config for ``db_url`` into ``tmp_path``; return its path.

    ``overrides`` are sections merged over :data:`TEST_SETTINGS`, e.g.
    ``write_config(tmp_path, url, jobs={"allow": ["jobs.examples"]})``; a None value
    removes a key or a whole section (``rpc=None``: no secret).
    """
    data = _merge({"database": {"url": db_url}, **TEST_SETTINGS}, overrides)
    return write_private(tmp_path / name, toml_dumps(data))


def write_job_file(path: Path, jobs: Sequence[Mapping[str, Any]]) -> Path:
    """Write a ``jobs apply`` file: one ``[[job]]`` table per mapping."""
    path.write_text(toml_dumps({"job": list(jobs)}) if jobs else "")
    return path


def write_private(path: Path, text: str) -> Path:
    """Write ``text`` to ``path``, readable by its owner only: qcluster warns about a
    config file with a secret that others can read, and refuses such a ``secret_file`` or
    ``url_file``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(0o600)
    return path


# -- running the CLI ----------------------------------------------------------------------


def cli_env(config: Path | None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a qcluster child: the caller's, minus its ``QCLUSTER_*``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QCLUSTER_")}
    env.update({"NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "240", "PYTHONUNBUFFERED": "1"})
    if config is not None:
        env["QCLUSTER_CONFIG"] = str(config)
    env.update(extra or {})
    return env


def qcluster_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "qcluster", *args]


def describe_result(result: subprocess.CompletedProcess[str]) -> str:
    """Command, exit status and both outputs, for an assertion message."""
    args = result.args if isinstance(result.args, list) else [str(result.args)]
    shown = " ".join(str(a) for a in args[2:])  # from "qcluster" on
    return (f"$ {shown}\nexit status {result.returncode}\n--- stdout\n{result.stdout}"
            f"--- stderr\n{result.stderr}")


def run_cli(
    *args: str,
    config: Path | None,
    check: bool = True,
    timeout: float = CLI_TIMEOUT,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m qcluster *args`` with ``QCLUSTER_CONFIG=config``; return its output.
    The process is forked from one that has imported qcluster (``tests/forkcli.py``)
    when its environment allows.

    With ``check``, a non-zero exit fails the test with the command and both outputs. A
    command that outlives ``timeout`` is killed and fails the test either way.
    """
    command = qcluster_command(*args)
    full_env = cli_env(config, env)
    try:
        if forkcli.forkable(full_env, cli_env(None), subprocess.DEVNULL):
            result = forkcli.run(args, env=full_env, baseline=cli_env(None), cwd=cwd,
                                 timeout=timeout)
        else:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                env=full_env, stdin=subprocess.DEVNULL, check=False,
            )  # fmt: skip
    except subprocess.TimeoutExpired as e:
        raise AssertionError(
            f"`qcluster {' '.join(args)}` did not finish within {timeout}s\n"
            f"--- stdout\n{_text(e.stdout)}--- stderr\n{_text(e.stderr)}"
        ) from None
    if check and result.returncode != 0:
        raise AssertionError(f"qcluster failed\n{describe_result(result)}")
    return result


def run_cli_many(
    commands: Iterable[Sequence[str]],
    *,
    config: Path | None,
    check: bool = True,
    workers: int = 3,
) -> list[subprocess.CompletedProcess[str]]:
    """Run independent commands a few at a time; the results come in the given order.

    Most of a CLI call is the interpreter importing qcluster, so on a machine with two
    cores two or three at once take about half the time of one after the other.
    """
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(run_cli, *c, config=config, check=check) for c in commands]
        return [f.result() for f in futures]


def run_json(*args: str, config: Path | None) -> Any:
    """Run a ``--json`` command (add ``--json`` yourself) and parse its output."""
    result = run_cli(*args, config=config)
    try:
        return json.loads(result.stdout)
    except ValueError:
        raise AssertionError(f"output is not JSON\n{describe_result(result)}") from None


def runs_json(
    config: Path,
    *,
    job: str | None = None,
    status: str | None = None,
    since: str | datetime | None = None,
    limit: int = 0,
) -> list[dict[str, Any]]:
    """``qcluster runs list --json`` with these filters; by default every run (limit 0)."""
    args = ["runs", "list", "--json", "--limit", str(limit)]
    if job is not None:
        args += ["--job", job]
    if status is not None:
        args += ["--status", status]
    if since is not None:
        args += ["--since", since.isoformat() if isinstance(since, datetime) else since]
    runs: list[dict[str, Any]] = run_json(*args, config=config)
    return runs


def jobs_json(config: Path) -> list[dict[str, Any]]:
    """``qcluster jobs list --json``: every job, ordered by id."""
    jobs: list[dict[str, Any]] = run_json("jobs", "list", "--json", config=config)
    return jobs


def assert_cli_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Assert the CLI's error contract: a non-zero exit, stderr exactly one line
    ``error: ...`` (containing each of ``fragments``), no traceback. Return that line."""
    where = describe_result(result)
    assert result.returncode != 0, f"expected a failure\n{where}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr\n{where}"
    assert lines[0].startswith("error: "), f"expected 'error: ...' on stderr\n{where}"
    assert "Traceback" not in result.stdout + result.stderr, where
    for fragment in fragments:
        assert fragment in lines[0], f"expected {fragment!r} in the error\n{where}"
    return lines[0]


# -- reading results ------------------------------------------------------------------------


def parse_time(text: str) -> datetime:
    """An ISO 8601 time from qcluster's JSON ("...Z" or "+00:00"), as an aware datetime."""
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert value.tzinfo is not None, f"time {text!r} has no UTC offset"
    return value.astimezone(UTC)


def read_records(path: Path) -> list[dict[str, Any]]:
    """The lines that ``jobs.examples:record_run`` appended to ``path`` ([] if none yet).

    Only whole lines count: a line still being written is left for the next read.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    complete = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


# -- waiting ---------------------------------------------------------------------------------


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.1,
    what: str = "a condition",
    details: Callable[[], str] | None = None,
) -> T:
    """Call ``predicate`` until it returns something truthy, and return that.

    After ``timeout`` seconds, fail with ``AssertionError("timed out after ...s waiting
    for <what>")``, the last value, and ``details()`` (a node's log, say). Exceptions of
    ``predicate`` are not caught: a broken check fails at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            message = f"timed out after {timeout}s waiting for {what} (last value: {value!r})"
            if details is not None:
                message += "\n" + details()
            raise AssertionError(message)
        time.sleep(interval)


# -- nodes -------------------------------------------------------------------------------------


@functools.cache
def _pdeathsig_prefix() -> tuple[str, ...]:
    """``setpriv --pdeathsig KILL --`` where util-linux's setpriv can do it, else nothing."""
    path = shutil.which("setpriv")
    if path is None:
        return ()
    probe = subprocess.run([path, "--help"], capture_output=True, text=True, check=False)
    return (path, "--pdeathsig", "KILL", "--") if "--pdeathsig" in probe.stdout else ()


class NodeProcess:
    """A running ``qcluster start``, in a process group of its own, logging to a file.

    ``prefix`` goes before ``python -m qcluster`` and must exec it in the same process
    (``ip netns exec NS``, ``env VAR=...``), so that the pid is the node's.

    Signals go to the whole group, so whatever the node started goes with it. Used as a
    context manager it is always SIGKILLed at exit (a no-op once it has exited), so no
    test leaves a node behind, whatever it asserted. Where setpriv allows, the kernel
    also kills it when the thread that started it dies, which covers a test run that is
    itself killed: start nodes from the test's own thread.
    """

    def __init__(self, args: Sequence[str], *, config: Path | None, log_path: Path,
                 cwd: Path | None = None, env: Mapping[str, str] | None = None,
                 prefix: Sequence[str] = ()) -> None:
        self.args = list(args)
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 (closed by close())
        try:
            self.proc = subprocess.Popen(
                [*_pdeathsig_prefix(), *prefix, *qcluster_command(*args)],
                stdin=subprocess.DEVNULL, stdout=self._log,
                stderr=subprocess.STDOUT, cwd=cwd, env=cli_env(config, env),
                start_new_session=True,
            )  # fmt: skip
        except BaseException:
            self._log.close()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit status, or None while it runs."""
        return self.proc.poll()

    def running(self) -> bool:
        return self.proc.poll() is None

    def send_signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the node's process group (nothing if it has exited)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def terminate(self) -> None:
        """SIGTERM: a graceful stop."""
        self.send_signal(signal.SIGTERM)

    def interrupt(self) -> None:
        """SIGINT, as Ctrl-C does."""
        self.send_signal(signal.SIGINT)

    def kill(self) -> None:
        """SIGKILL: a crash."""
        self.send_signal(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP: the node freezes, as in a long GC pause or a suspended VM."""
        self.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        self.send_signal(signal.SIGCONT)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for the node to exit; return its exit status. Fails after ``timeout``."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"node {' '.join(self.args)} (pid {self.pid}) did not exit within {timeout}s"
                f"\n{self.log_tail()}"
            ) from None

    def log(self) -> str:
        """Everything the node wrote to stdout and stderr so far (also after close)."""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = 4000) -> str:
        """The end of :meth:`log`, labelled, for assertion messages."""
        return f"--- log of {' '.join(self.args)} ({self.log_path})\n{self.log()[-chars:]}"

    def close(self) -> None:
        """SIGKILL the group if still running (paused or not), reap it, close the log."""
        self.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(STOP_TIMEOUT)
        self._log.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def start_node(
    config: Path | None,
    *,
    node_id: str | None,
    role: str = "all",
    log_path: Path,
    demo: bool = False,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    prefix: Sequence[str] = (),
) -> NodeProcess:
    """Start ``qcluster start --role ROLE --node-id ID`` (``--demo`` if asked), after
    ``prefix`` (see :class:`NodeProcess`).

    ``config`` None starts it with no config at all (the embedded defaults, or a
    ``qcluster.toml`` in ``cwd``). Use the result in a ``with`` block.
    """
    args = ["start", "--role", role]
    if node_id is not None:
        args += ["--node-id", node_id]
    if demo:
        args.append("--demo")
    return NodeProcess(args, config=config, log_path=log_path, cwd=cwd, env=env, prefix=prefix)


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")


def wait_leading(config: Path, node: NodeProcess, node_id: str = "n1",
                 timeout: float = 60.0) -> None:
    """Wait until ``cluster status`` names ``node_id`` (running as ``node``) the leader."""
    def leading() -> bool:
        assert node.running(), node.log_tail()
        status = run_json("cluster", "status", "--json", config=config)
        return bool((status["leader"] or {}).get("node_id") == node_id)

    wait_for(leading, timeout, interval=0.5, what=f"{node_id} to lead", details=node.log_tail)


def closed_by_peer(sockets: Iterable[socket.socket], settle: float = 0.5) -> int:
    """How many of ``sockets`` the server has closed ``settle`` seconds from now (the
    others are still open and silent)."""
    time.sleep(settle)
    closed = 0
    for s in sockets:
        s.settimeout(0.02)
        with contextlib.suppress(TimeoutError):
            closed += s.recv(1) == b""
    return closed
