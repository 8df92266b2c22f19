"""Built-in jobs: a shell command, a no-op, a sleep."""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence

log = logging.getLogger(__name__)


def shell(command: str | Sequence[str], timeout: float | None = None,
          cwd: str | None = None) -> int:
    """Run a command (a string is split like a POSIX shell would, but no shell runs it).

    A non-zero exit status fails the run, with the command's last output line as the
    error. It runs whatever it is given, so no ``[jobs] allow`` pattern admits it: list
    ``jobs.builtin:shell`` itself (``settings/refs.NAMED_ONLY``).
    """
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    # In the slot's own process group (no process_group=0): a timeout, a cancel, and the
    # freeze of a paused worker signal that group, so they reach the command and what it
    # starts; a group of its own hid them from all three.
    proc = subprocess.run(_dies_with_us(argv), capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeError(f"exit status {proc.returncode}: {tail[-1] if tail else ''}")
    return proc.returncode


_SETPRIV = shutil.which("setpriv") if sys.platform.startswith("linux") else None


def _dies_with_us(argv: list[str]) -> list[str]:
    if _SETPRIV is None:
        return argv
    return [_SETPRIV, "--pdeathsig", "KILL", "--", *argv]


def noop() -> None:
    """Do nothing: the unit of the throughput benchmarks."""


def sleep(seconds: float) -> None:
    """Sleep, to stand in for a long job."""
    time.sleep(seconds)
