"""Private files: the checks of a file that holds a secret, and of the directory of an
embedded (SQLite) cluster. The one definition, used by ``rpc.secret_file``,
``database.url_file`` (:func:`operator_file_problem`), the embedded cluster's secret
(:func:`own_file_problem`, :func:`create_private`) and its database (:func:`check_directory`).

Rules, and why:

- A secret is at least :data:`MIN_SECRET_BYTES` bytes (:func:`secret_problem`): an HMAC key
  shorter than its 32-byte output is weaker than the construction, and short ones are
  guessed.
- A file we create (the embedded secret, the SQLite database) is created with
  ``O_CREAT|O_EXCL|O_NOFOLLOW``, mode 0600: never through a planted name or symlink.
- A file we created ourselves is used only if it is still a regular file, owned by this
  user, with no group or other permission bit (:func:`own_file_problem`).
- A file the operator gives (``secret_file``, ``url_file``) follows libpq's rule for a
  client key (:func:`operator_file_problem`): a regular file (symlinks are followed, as
  Kubernetes mounts secrets), owned by this user with no group/other bit, or owned by root
  and at most 0640 (root:qcluster 0640 is the usual way to give a service group a
  secret). It is refused otherwise, as an embedded secret is, rather than warned about:
  whoever can read the RPC secret can run code on every worker.
- A database directory that another user can write (a bit for others, or a bit for a
  group that is not this user's own private group) is refused unless it is sticky and
  owned by this user, and so is one that another user owns, or whose parent another user
  owns or can write without the sticky bit (:func:`check_directory`). In a sticky
  directory others still create names, so the files of the database found there must
  then be ours (:func:`check_planted`). ``/tmp`` is sticky and root's: only root may keep
  a database directly in it; other users get a message naming a private directory.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from qcluster.errors import ConfigError

MIN_SECRET_BYTES = 32
#: Fewer distinct characters than this is a placeholder (32 spaces), not a random secret:
#: 32 random base64 characters have about 24 distinct ones.
MIN_DISTINCT = 8
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def secret_problem(secret: str) -> str | None:
    """Why ``secret`` is too weak to be the RPC secret (a phrase that never shows it), or
    None."""
    size = len(secret.encode())
    if size < MIN_SECRET_BYTES:
        return (f"must be at least {MIN_SECRET_BYTES} bytes (got {size}); make one with"
                " `openssl rand -base64 32`")
    distinct = len(set(secret))
    if distinct < MIN_DISTINCT:
        return (f"has only {distinct} distinct characters: it looks like a placeholder, not"
                " a random secret; make one with `openssl rand -base64 32`")
    return None


def _kind(st: os.stat_result) -> str | None:
    """What ``st`` is when it is not a regular file, or None when it is one."""
    if stat.S_ISREG(st.st_mode):
        return None
    return next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


def own_file_problem(st: os.stat_result) -> str | None:
    """Why a file qcluster created for itself (``st`` from ``lstat``/``fstat``) may not be
    used: not a regular file, not ours, or open to the group or others. None if fine."""
    kind = _kind(st)
    if kind:
        return f"is {kind}, not a regular file"
    me = os.geteuid()
    if st.st_uid != me:
        return f"is owned by uid {st.st_uid}, not by this user (uid {me})"
    if st.st_mode & 0o077:
        return f"has group or other permission bits (mode {_mode(st)}); it must be 0600"
    return None


def operator_file_problem(st: os.stat_result) -> str | None:
    """Why a secret file the operator names may not be used (libpq's rule for a key, see
    the module), or None."""
    kind = _kind(st)
    if kind:
        return f"is {kind}, not a regular file"
    me = os.geteuid()
    if st.st_uid == 0:  # root's, whoever we are: root:qcluster 0640 shares it with a group
        if st.st_mode & 0o037:
            return (f"is owned by root with mode {_mode(st)}; root's may be at most 0640"
                    " (chmod 640 it)")
        return None
    if st.st_uid == me:
        if st.st_mode & 0o077:
            return (f"is readable or writable by group or others (mode {_mode(st)});"
                    " chmod 600 it")
        return None
    return f"is owned by uid {st.st_uid}, not by this user (uid {me}) or root"


def _private_group(gid: int) -> bool:
    """Whether ``gid`` is this user's own private group (the USERGROUPS convention: its
    name is the user's name, and nobody else is listed in it), so that a group-writable
    directory of it is as private as one only we can write."""
    import grp
    import pwd

    if gid != os.getegid():
        return False
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
        group = grp.getgrgid(gid)
    except KeyError:
        return False
    return group.gr_name == user and set(group.gr_mem) <= {user}


def _writable_by_others(st: os.stat_result) -> bool:
    return bool(st.st_mode & 0o002 or (st.st_mode & 0o020 and not _private_group(st.st_gid)))


def check_directory(directory: Path, what: str) -> bool:
    """Check that no other user can replace files in ``directory``, which holds ``what``
    (e.g. "the database"), as OpenSSH's StrictModes checks a key's path. The directory and
    every parent up to ``/`` must be owned by this user or root; the directory may be
    writable by another user only if it is sticky and ours, and a parent only if it is
    sticky (then no one else can rename what we or root own in it). Raise a one-line
    ConfigError otherwise. Return True when the directory itself is shared but allowed
    (sticky and ours): names there may then be planted, see :func:`check_planted`. A
    directory that cannot be examined (missing) is left to whoever opens files in it."""
    try:
        chain = [directory.resolve(strict=True)]
        chain += list(chain[0].parents)
        stats = [os.stat(p) for p in chain]
    except (OSError, ValueError, RuntimeError):
        return False
    me = os.geteuid()
    for i, (path, st) in enumerate(zip(chain, stats, strict=True)):
        whose = "this directory" if i == 0 else f"its parent {path}"
        if st.st_uid not in (me, 0):
            raise ConfigError(
                f"{directory}: cannot keep {what} here: {whose} is owned by uid {st.st_uid},"
                f" not by this user (uid {me}) or root, who can replace its files; use a"
                " directory of your own (e.g. mkdir -m 700 ~/qcluster)")
        if not _writable_by_others(st):
            continue
        sticky = bool(st.st_mode & stat.S_ISVTX)
        if i == 0 and sticky and st.st_uid == me:
            return True
        if i > 0 and sticky:
            continue
        state = (f"sticky, but owned by uid {st.st_uid}" if sticky else "not sticky")
        raise ConfigError(
            f"{directory}: cannot keep {what} here: other users can write {whose} (mode "
            f"{_mode(st)}, {state}); use a directory only you can write (e.g. mkdir -m 700 "
            f"{directory / 'qcluster'}), or a sticky one you own")
    return False


def check_planted(paths: Iterable[Path], what: str) -> None:
    """In a shared (sticky) directory: refuse any of ``paths`` that exists and is not a
    regular file of ours (planted by another user, or a symlink)."""
    for path in paths:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            continue  # whoever opens it reports that
        kind = _kind(st)
        me = os.geteuid()
        if kind or st.st_uid != me:
            problem = (f"is {kind}, not a regular file" if kind else
                       f"is owned by uid {st.st_uid}, not by this user (uid {me})")
            raise ConfigError(f"{path}: cannot use it for {what}: it {problem}, in a "
                              "directory other users can write; remove it")


def create_private(path: Path, data: bytes = b"") -> bool:
    """Create ``path`` with ``data``: ``O_CREAT|O_EXCL|O_NOFOLLOW``, mode 0600, written
    and fsynced before this returns. False (nothing written) when the name exists, whatever
    it is; OSError for any other failure, with the half-written file removed."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        return False
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)
    return True
