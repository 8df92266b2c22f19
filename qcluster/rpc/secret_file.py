"""The secret of an embedded (one-host SQLite) cluster: a private file beside the database.

Promises (the checks are ``settings/private.py``'s):

- The file ``<db>.secret`` is used only if it is a regular file (not a symlink, FIFO or
  directory), owned by this user, with no group or other permission bit, holding at least
  32 bytes. Anything else is refused with one ConfigError line that names the file and
  what is wrong, and is left as it is.
- It is created through a temp file ``.<db>.secret.<pid>.tmp`` made with
  ``O_CREAT|O_EXCL|O_NOFOLLOW``, mode 0600, written and fsynced, then hard-linked to the
  final name. ``link`` never replaces an existing name, so of processes that start at
  once exactly one wins, and every other one reads the winner's complete secret (a reader
  never sees a file half written: the name appears only once the data is on disk).
- The directory is checked first, as the database's is (``check_directory``): if others
  can write it, it must be sticky and ours.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from qcluster.errors import ConfigError
from qcluster.settings import (
    check_directory,
    create_private,
    own_file_problem,
    read_bounded,
    secret_problem,
)

MAX_SECRET_BYTES = 4096
_WHAT = "the embedded cluster's RPC secret"


def secret_path(db_path: Path) -> Path:
    """Where the secret of the database ``db_path`` is kept."""
    return db_path.with_name(db_path.name + ".secret")


def embedded_secret(db_path: Path) -> str:
    """The secret of an embedded (one-host SQLite) cluster, kept in a 0600 file by the DB.

    Every process on the host that can read the database can read this file too, so it
    grants nothing new; it keeps other users of the machine off the RPC ports.
    """
    path = secret_path(db_path)
    check_directory(path.parent, _WHAT)  # a planted file is refused by _read's check
    try:
        os.lstat(path)
    except FileNotFoundError:
        _create(path)
    except OSError as e:
        raise ConfigError(f"{path}: cannot use {_WHAT}: {e.strerror or e}") from None
    return _read(path)


def _read(path: Path) -> str:
    secret = read_bounded(path, MAX_SECRET_BYTES, _WHAT, check=own_file_problem,
                          follow=False).strip()
    problem = secret_problem(secret)
    if problem:
        raise ConfigError(f"{path}: cannot use {_WHAT}: it {problem}")
    return secret


def _create(path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = (secrets.token_urlsafe(32) + "\n").encode()
    try:
        created = create_private(tmp, data)
        if not created and _stale(tmp):  # our own, left by a crash of a process of this pid
            tmp.unlink()
            created = create_private(tmp, data)
    except OSError as e:
        raise ConfigError(f"{tmp}: cannot create {_WHAT}: {e.strerror or e}") from None
    if not created:
        try:
            problem = own_file_problem(os.lstat(tmp)) or "is in the way"
        except OSError:
            problem = "was in the way"
        raise ConfigError(f"{tmp}: cannot create {_WHAT}: this temp file exists and {problem};"
                          " remove it")
    try:
        os.link(tmp, path, follow_symlinks=False)
    except FileExistsError:
        pass  # another process won: its secret is complete, read it
    except OSError as e:
        raise ConfigError(f"{path}: cannot create {_WHAT}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    _sync_directory(path.parent)


def _stale(tmp: Path) -> bool:
    try:
        return own_file_problem(os.lstat(tmp)) is None
    except OSError:
        return False


def _sync_directory(directory: Path) -> None:
    """Make the new name durable (best effort: not every file system can)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
