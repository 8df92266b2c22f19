"""The one way qcluster reads a file it is given: :func:`read_bounded`.

Config files, ``database.url_file``, ``rpc.secret_file`` and ``jobs apply`` files are all
read by it, each with its own limit. It reads at most one byte past the limit, so that
``/dev/zero`` or an endless pipe ends with an error instead of eating the memory, and every
problem is one line that names the file (and the limit, when that is the problem).

It refuses what the operating system refuses (a directory, a missing file, a file it may
not read); a device or a pipe is read like a file, up to the limit, so that
``jobs apply /dev/stdin`` keeps working. A file that holds a secret is read with a
``check`` (``settings/private.py``): the open file's own status (``fstat``, so not a name
that changed in between) must pass it before a byte is read, and with ``follow=False`` a
symbolic link is refused.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from os import PathLike
from typing import Literal, overload

from qcluster.errors import ConfigError, QClusterError
from qcluster.settings.text import one_line

#: A check of an open file's status: why it may not be read, or None.
Check = Callable[[os.stat_result], str | None]


@overload
def read_bounded(
    path: str | PathLike[str], limit: int, what: str, *, source: str | None = None,
    error: type[QClusterError] = ConfigError, text: Literal[True] = True,
    check: Check | None = None, follow: bool = True,
) -> str: ...


@overload
def read_bounded(
    path: str | PathLike[str], limit: int, what: str, *, source: str | None = None,
    error: type[QClusterError] = ConfigError, text: Literal[False],
    check: Check | None = None, follow: bool = True,
) -> bytes: ...


def read_bounded(
    path: str | PathLike[str], limit: int, what: str, *, source: str | None = None,
    error: type[QClusterError] = ConfigError, text: bool = True,
    check: Check | None = None, follow: bool = True,
) -> str | bytes:
    """The contents of ``path``, at most ``limit`` bytes: UTF-8 text, or bytes if not
    ``text``. Anything else raises ``error`` (ConfigError by default) with one line:

    - a file given by itself (``source`` None), ``what`` says what it is:
      ``"jobs.toml: cannot read job file: larger than 67108864 bytes"``;
    - a file named by a setting, ``what`` is the setting's key and ``source`` the config
      file that sets it: ``"q.toml: rpc.secret_file: cannot read /etc/s: Permission denied"``.

    The reasons are the system's (``No such file or directory``, ``Is a directory``),
    ``larger than N bytes``, ``not UTF-8 text``, and what ``check`` says of the file
    (``q.toml: rpc.secret_file: cannot use /etc/s: it is owned by uid 1001, ...``)."""

    def refuse(reason: str, verb: str = "read") -> QClusterError:
        where = f"{path}: cannot {verb} {what}" if source is None else (
            f"{source}: {what}: cannot {verb} {path}")
        return error(one_line(f"{where}: {reason}"))

    try:
        if check is None:
            with open(path, "rb") as f:
                raw = f.read(limit + 1)
        else:
            raw = _read_checked(path, limit, check, follow, refuse)
    except OSError as e:
        if e.errno == errno.ELOOP and not follow:
            raise refuse("it is a symbolic link", "use") from None
        raise refuse(str(e.strerror or e)) from None
    except ValueError as e:  # a NUL byte in the name
        raise refuse(str(e)) from None
    if len(raw) > limit:
        raise refuse(f"larger than {limit} bytes")
    if not text:
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise refuse("not UTF-8 text") from None


def _read_checked(path: str | PathLike[str], limit: int, check: Check, follow: bool,
                  refuse: Callable[[str, str], QClusterError]) -> bytes:
    # O_NONBLOCK: a FIFO planted under the name is refused by the check, not waited on.
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        problem = check(os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    if problem:
        os.close(fd)
        raise refuse(f"it {problem}", "use")
    with open(fd, "rb") as f:
        return f.read(limit + 1)
