"""The one way qcluster reads a file it is given: :func:`read_bounded`.

Config files, ``database.url_file``, ``rpc.secret_file`` and ``jobs apply`` files are all
read by it, each with its own limit. It reads at most one byte past the limit, so that
``/dev/zero`` or an endless pipe ends with an error instead of eating the memory, and every
problem is one line that names the file (and the limit, when that is the problem).

It refuses what the operating system refuses (a directory, a missing file, a file it may
not read); a device or a pipe is read like a file, up to the limit, so that
``jobs apply /dev/stdin`` keeps working.
"""

from __future__ import annotations

from os import PathLike
from typing import Literal, overload

from qcluster.errors import ConfigError, QClusterError
from qcluster.settings.text import one_line


@overload
def read_bounded(
    path: str | PathLike[str], limit: int, what: str, *, source: str | None = None,
    error: type[QClusterError] = ConfigError, text: Literal[True] = True,
) -> str: ...


@overload
def read_bounded(
    path: str | PathLike[str], limit: int, what: str, *, source: str | None = None,
    error: type[QClusterError] = ConfigError, text: Literal[False],
) -> bytes: ...


def read_bounded(
    path: str | PathLike[str], limit: int, what: str, *, source: str | None = None,
    error: type[QClusterError] = ConfigError, text: bool = True,
) -> str | bytes:
    """The contents of ``path``, at most ``limit`` bytes: UTF-8 text, or bytes if not
    ``text``. Anything else raises ``error`` (ConfigError by default) with one line:

    - a file given by itself (``source`` None), ``what`` says what it is:
      ``"jobs.toml: cannot read job file: larger than 67108864 bytes"``;
    - a file named by a setting, ``what`` is the setting's key and ``source`` the config
      file that sets it: ``"q.toml: rpc.secret_file: cannot read /etc/s: Permission denied"``.

    The reasons are the system's (``No such file or directory``, ``Is a directory``),
    ``larger than N bytes`` and ``not UTF-8 text``."""

    def refuse(reason: str) -> QClusterError:
        where = f"{path}: cannot read {what}" if source is None else (
            f"{source}: {what}: cannot read {path}")
        return error(one_line(f"{where}: {reason}"))

    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as e:
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
