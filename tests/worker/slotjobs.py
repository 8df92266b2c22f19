"""Jobs for the slot tests (tests/worker/test_slots.py): each records what it can see of
its own process in a JSON file it is given, then misbehaves as its name says."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from qcluster import current_run

#: Module state: how many runs this process has made of :func:`count`.
COUNT = 0


def _note(path: str, **extra: object) -> None:
    """Write this process's identity, its run's and ``extra`` to ``path`` (atomically)."""
    run = current_run()
    data = {"pid": os.getpid(), "pgid": os.getpgid(0), "sid": os.getsid(0),
            "ppid": os.getppid(), "attempt": run.attempt, "run_id": run.run_id,
            "worker": run.worker_id, **extra}
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def sleep_with_child(path: str, seconds: float = 30.0) -> None:
    """Start ``sleep 1000`` (a plain subprocess, no death signal of its own), note both
    process ids, then sleep."""
    child = subprocess.Popen(["sleep", "1000"])
    _note(path, grandchild=child.pid)
    time.sleep(seconds)


def ignore_sigterm(path: str) -> None:
    """Ignore SIGTERM, note, and never return: only SIGKILL stops it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _note(path)
    while True:
        time.sleep(0.1)


def exit_3(path: str) -> None:
    _note(path)
    os._exit(3)


def kill_self(path: str) -> None:
    _note(path)
    os.kill(os.getpid(), signal.SIGKILL)


def count(path: str) -> int:
    """Add one to the module's counter and note it."""
    global COUNT
    COUNT += 1
    _note(path, count=COUNT)
    return COUNT


def identify(path: str) -> None:
    _note(path)


def shell_background(path: str) -> None:
    """Note, then run a ``jobs.builtin:shell`` command that starts a background process
    (its pid in ``path``.bg) and waits for it: a command left running by its job."""
    from jobs.builtin import shell

    _note(path)
    shell(["sh", "-c", f"sleep 1000 & echo $! > {path}.bg; wait"])


def chatty(path: str, lines: int = 3) -> dict[str, object]:
    """Write to stdout, stderr, a log record and a subprocess's stdout; return a dict."""
    import logging
    import sys

    for i in range(lines):
        print(f"out line {i}")
    print("to stderr", file=sys.stderr)
    logging.getLogger("chatty").warning("a log record")
    subprocess.run(["echo", "from a command"], check=True)
    _note(path)
    return {"rows": lines, "path": path}


def flood(path: str, size: int = 200_000) -> None:
    """Write ``size`` bytes (a numbered line each 16 bytes, then a last line), NUL and an
    escape sequence included."""
    import sys

    for i in range(size // 16):
        sys.stdout.write(f"{i:015d}\n")
    sys.stdout.write("bad \0 byte \x1b[2J end\n")
    _note(path)


def chatty_then_hang(path: str) -> None:
    """Write a line, then sleep until killed."""
    print("before the timeout", flush=True)
    _note(path)
    time.sleep(60)


def chatty_then_fail(path: str) -> None:
    print("working...")
    _note(path)
    raise ValueError("bad row 7")


def close_stdio(path: str) -> None:
    """Close fds 1 and 2 (what a careless daemonising job does), then note."""
    _note(path)
    os.close(1)
    os.close(2)


def replace_stdout(path: str) -> None:
    """Swap sys.stdout for a buffer and keep it there."""
    import io
    import sys

    _note(path)
    sys.stdout = io.StringIO()


def leave_thread(path: str) -> None:
    """Start a daemon thread that goes on printing after the run ends."""
    import threading

    def chatter() -> None:
        for i in range(200):
            print(f"LEAK {i}", flush=True)
            time.sleep(0.02)

    threading.Thread(target=chatter, daemon=True).start()
    _note(path)


def leave_child(path: str) -> None:
    """Start a process (not waited for) that goes on printing after the run ends."""
    child = subprocess.Popen(["sh", "-c", "for i in $(seq 200); do echo LEAK $i; sleep 0.02; done"])
    _note(path, child=child.pid)


def flood_unterminated(path: str, size: int = 1 << 20) -> None:
    """Write ``size`` bytes with no newline, then sleep until stopped."""
    import sys

    _note(path)
    sys.stdout.write("x" * size)
    sys.stdout.flush()
    time.sleep(60)
