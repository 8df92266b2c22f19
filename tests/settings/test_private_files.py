"""Files that hold secrets, and the directory of an embedded cluster (issue 13, points 3
and 8), with the attacks of another local user reproduced: the tests run as root, so
"another user" is uid 65534 (nobody), whose files are planted with ``os.chown``.

- The embedded secret ``<db>.secret`` is refused unless it is a regular file of ours,
  mode 0600, of at least 32 bytes; its temp file is created ``O_EXCL|O_NOFOLLOW``, so a
  planted symlink is refused and its target left untouched; processes that start at once
  all get the one secret.
- ``rpc.secret_file`` and ``database.url_file`` follow libpq's rule for a key file.
- A secret shorter than 32 bytes is refused wherever it comes from.
- A directory that others can write is refused unless sticky and ours.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from qcluster.errors import ConfigError
from qcluster.rpc.secret_file import embedded_secret
from qcluster.settings import load_settings_from_text, operator_file_problem, own_file_problem
from qcluster.store.db import Database
from tests.helpers import assert_cli_error, run_cli, write_config, write_private

NOBODY = 65534
#: Skip off CI only: under CI=true (root, as the test command runs) these must run.
as_root = pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true",
                             reason="plants files as another user (chown); not root")
LONG = "0123456789abcdef0123456789abcdef-long-enough"


def _one_line(info: pytest.ExceptionInfo[Exception]) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    directory = tmp_path / "data"
    directory.mkdir(mode=0o700)
    return directory / "qcluster.db"


def _secret(db: Path) -> Path:
    return db.with_name(db.name + ".secret")


def _precious(tmp_path: Path) -> Path:
    """A root-owned file that an attacker wants overwritten."""
    target = tmp_path / "precious"
    target.write_text("root's own data\n")
    target.chmod(0o644)
    return target


# -- the embedded secret --------------------------------------------------------------------


def test_the_embedded_secret_is_created_0600_and_read_back(db_path: Path) -> None:
    secret = embedded_secret(db_path)
    assert len(secret) >= 32
    st = os.lstat(_secret(db_path))
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert embedded_secret(db_path) == secret
    assert sorted(p.name for p in db_path.parent.iterdir()) == ["qcluster.db.secret"]


@as_root
def test_a_secret_planted_by_another_user_is_refused_and_left_alone(db_path: Path) -> None:
    path = _secret(db_path)
    write_private(path, LONG + "\n")
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(ConfigError) as info:
        embedded_secret(db_path)
    assert _one_line(info) == (
        f"{path}: cannot use the embedded cluster's RPC secret: it is owned by uid "
        f"{NOBODY}, not by this user (uid 0)")
    assert path.read_text() == LONG + "\n" and os.stat(path).st_uid == NOBODY


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_a_secret_with_group_or_other_bits_is_refused(db_path: Path, mode: int) -> None:
    path = write_private(_secret(db_path), LONG + "\n")
    path.chmod(mode)
    with pytest.raises(ConfigError) as info:
        embedded_secret(db_path)
    assert _one_line(info) == (
        f"{path}: cannot use the embedded cluster's RPC secret: it has group or other "
        f"permission bits (mode {mode:04o}); it must be 0600")


def test_a_symlink_planted_as_the_secret_is_refused_and_its_target_untouched(
    tmp_path: Path, db_path: Path
) -> None:
    target = _precious(tmp_path)
    path = _secret(db_path)
    path.symlink_to(target)
    with pytest.raises(ConfigError) as info:
        embedded_secret(db_path)
    assert _one_line(info) == (
        f"{path}: cannot use the embedded cluster's RPC secret: it is a symbolic link")
    assert target.read_text() == "root's own data\n"


def test_a_symlink_planted_as_the_temp_file_is_refused_and_its_target_untouched(
    tmp_path: Path, db_path: Path
) -> None:
    target = _precious(tmp_path)
    tmp = db_path.with_name(f".qcluster.db.secret.{os.getpid()}.tmp")
    tmp.symlink_to(target)
    with pytest.raises(ConfigError) as info:
        embedded_secret(db_path)
    assert _one_line(info) == (
        f"{tmp}: cannot create the embedded cluster's RPC secret: this temp file exists and "
        "is a symbolic link, not a regular file; remove it")
    assert target.read_text() == "root's own data\n"
    assert not _secret(db_path).exists() and tmp.is_symlink()


def test_a_dangling_symlink_as_the_temp_file_creates_nothing_through_it(
    tmp_path: Path, db_path: Path
) -> None:
    target = tmp_path / "would-be-created"
    tmp = db_path.with_name(f".qcluster.db.secret.{os.getpid()}.tmp")
    tmp.symlink_to(target)
    with pytest.raises(ConfigError):
        embedded_secret(db_path)
    assert not target.exists()


def test_a_stale_temp_file_of_our_own_is_replaced(db_path: Path) -> None:
    tmp = db_path.with_name(f".qcluster.db.secret.{os.getpid()}.tmp")
    write_private(tmp, "half a secret")
    assert len(embedded_secret(db_path)) >= 32
    assert not tmp.exists()


def test_a_fifo_or_a_directory_as_the_secret_is_refused_at_once(db_path: Path) -> None:
    path = _secret(db_path)
    os.mkfifo(path, 0o600)
    with pytest.raises(ConfigError, match=r"it is a FIFO, not a regular file$"):
        embedded_secret(db_path)  # does not wait for a writer
    path.unlink()
    path.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match=r"it is a directory, not a regular file$"):
        embedded_secret(db_path)


def test_a_short_embedded_secret_is_refused(db_path: Path) -> None:
    write_private(_secret(db_path), "short\n")
    with pytest.raises(ConfigError) as info:
        embedded_secret(db_path)
    assert "must be at least 32 bytes (got 5)" in _one_line(info)


def test_processes_that_start_at_once_all_get_the_one_secret(db_path: Path) -> None:
    code = ("import sys; from pathlib import Path; from qcluster.rpc.secret_file import "
            "embedded_secret; print(embedded_secret(Path(sys.argv[1])))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(db_path)],
                              stdout=subprocess.PIPE, text=True) for _ in range(8)]
    secrets = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(secrets) == 1 and len(secrets.pop()) >= 32
    assert sorted(p.name for p in db_path.parent.iterdir()) == ["qcluster.db.secret"]


# -- the database directory -----------------------------------------------------------------


def test_a_directory_others_can_write_is_refused(db_path: Path) -> None:
    db_path.parent.chmod(0o777)
    for attempt in (lambda: embedded_secret(db_path), lambda: Database(f"sqlite:///{db_path}")):
        with pytest.raises(ConfigError) as info:
            attempt()
        message = _one_line(info)
        assert message.startswith(f"{db_path.parent}: cannot keep ")
        assert "other users can write this directory (mode 0777, not sticky)" in message
    assert list(db_path.parent.iterdir()) == []


@as_root
def test_a_group_writable_directory_of_a_shared_group_is_refused(db_path: Path) -> None:
    os.chown(db_path.parent, 0, NOBODY)
    db_path.parent.chmod(0o770)
    with pytest.raises(ConfigError, match="mode 0770, not sticky"):
        Database(f"sqlite:///{db_path}")


@as_root
@as_root
def test_a_directory_another_user_owns_is_refused_whatever_its_mode(db_path: Path) -> None:
    """Its owner can rename or swap the database and the secret (outsider review, F1)."""
    db_path.parent.chmod(0o755)
    os.chown(db_path.parent, NOBODY, NOBODY)
    with pytest.raises(ConfigError) as info:
        Database(f"sqlite:///{db_path}")
    assert _one_line(info).endswith(
        f"this directory is owned by uid {NOBODY}, not by this user (uid 0) or root, who can "
        "replace its files; use a directory of your own (e.g. mkdir -m 700 ~/qcluster)")
    assert not db_path.exists()


def test_a_private_directory_in_a_parent_others_can_write_is_refused(tmp_path: Path) -> None:
    """Anyone may rename a directory inside a world-writable, non-sticky parent, and put
    their own in its place."""
    parent = tmp_path / "open"
    parent.mkdir()
    parent.chmod(0o777)
    mine = parent / "mine"
    mine.mkdir(mode=0o700)
    with pytest.raises(ConfigError) as info:
        Database(f"sqlite:///{mine / 'q.db'}")
    assert f"other users can write its parent {parent} (mode 0777, not sticky)" in (
        _one_line(info))
    parent.chmod(0o1777)  # sticky: no one else can rename what we own in it
    Database(f"sqlite:///{mine / 'q.db'}").dispose()
    assert (mine / "q.db").exists()


def test_a_sticky_directory_of_another_user_is_refused(db_path: Path) -> None:
    os.chown(db_path.parent, NOBODY, NOBODY)
    db_path.parent.chmod(0o1777)
    with pytest.raises(ConfigError, match=f"this directory is owned by uid {NOBODY}, not by"):
        Database(f"sqlite:///{db_path}")


def test_roots_sticky_directory_is_refused_to_another_user(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``/tmp`` for anyone but root: sticky, but another user's (root's) directory."""
    db_path.parent.chmod(0o1777)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ConfigError, match="mode 1777, sticky, but owned by uid 0"):
        Database(f"sqlite:///{db_path}")


@as_root
def test_a_sticky_directory_of_ours_is_used_but_files_planted_in_it_are_refused(
    tmp_path: Path, db_path: Path
) -> None:
    db_path.parent.chmod(0o1777)
    Database(f"sqlite:///{db_path}").dispose()
    assert stat.S_IMODE(os.stat(db_path).st_mode) == 0o600
    assert len(embedded_secret(db_path)) >= 32
    other = db_path.with_name("other.db")
    for planted in (Path(f"{other}-wal"), other):
        planted.write_text("")
        os.chown(planted, NOBODY, NOBODY)
        with pytest.raises(ConfigError) as info:
            Database(f"sqlite:///{other}")
        assert _one_line(info) == (
            f"{planted}: cannot use it for the database: it is owned by uid {NOBODY}, not by "
            "this user (uid 0), in a directory other users can write; remove it")
        planted.unlink()
    target = _precious(tmp_path)
    other.symlink_to(target)
    with pytest.raises(ConfigError, match="it is a symbolic link, not a regular file"):
        Database(f"sqlite:///{other}")
    assert target.read_text() == "root's own data\n"


def test_the_database_file_is_created_0600_and_an_open_one_warns(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    Database(f"sqlite:///{db_path}").dispose()
    assert stat.S_IMODE(os.stat(db_path).st_mode) == 0o600
    old = db_path.with_name("old.db")
    old.write_text("")
    old.chmod(0o644)
    Database(f"sqlite:///{old}").dispose()
    assert stat.S_IMODE(os.stat(old).st_mode) == 0o644  # the operator's file: not changed
    assert any("can be read by other users (mode 0644)" in r.getMessage()
               for r in caplog.records)


# -- secret_file and url_file -----------------------------------------------------------------


def _load_secret_file(path: Path) -> str | None:
    return load_settings_from_text(f"[rpc]\nsecret_file = {json.dumps(str(path))}\n", "q.toml",
                                   {}).rpc_secret()


def _load_url_file(path: Path) -> str:
    return load_settings_from_text(f"[database]\nurl_file = {json.dumps(str(path))}\n",
                                   "q.toml", {}).database_url()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_secret_and_url_files_open_to_others_are_refused(
    tmp_path: Path, mode: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = write_private(tmp_path / "secret", LONG)
    url = write_private(tmp_path / "url", "postgresql://u:hunter2@h/db")
    if os.geteuid() == 0:  # as a service user: root's own files have a rule of their own
        for path in (secret, url):
            os.chown(path, 1000, 1000)
        monkeypatch.setattr(os, "geteuid", lambda: 1000)
    for path, load, key in ((secret, _load_secret_file, "rpc.secret_file"),
                            (url, _load_url_file, "database.url_file")):
        path.chmod(mode)
        with pytest.raises(ConfigError) as info:
            load(path)
        assert _one_line(info) == (
            f"q.toml: {key}: cannot use {path}: it is readable or writable by group or "
            f"others (mode {mode:04o}); chmod 600 it")
        path.chmod(0o600)
        assert load(path)


@as_root
def test_secret_and_url_files_of_another_user_are_refused(tmp_path: Path) -> None:
    secret = write_private(tmp_path / "secret", LONG)
    os.chown(secret, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=f"it is owned by uid {NOBODY}, not by this user "
                                          r"\(uid 0\) or root$"):
        _load_secret_file(secret)


def test_a_symlink_to_a_private_secret_file_is_followed(tmp_path: Path) -> None:
    """Kubernetes mounts each secret as a symlink: the file it names is what is checked."""
    real = write_private(tmp_path / "real", LONG)
    link = tmp_path / "link"
    link.symlink_to(real)
    assert _load_secret_file(link) == LONG
    real.chmod(0o644)
    with pytest.raises(ConfigError, match="mode 0644"):
        _load_secret_file(link)


def test_a_fifo_as_the_secret_file_is_refused_without_waiting(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(ConfigError, match=r"it is a FIFO, not a regular file$"):
        _load_secret_file(fifo)


def _stat(mode: int, uid: int) -> os.stat_result:
    """A regular file's status with ``mode`` and owner ``uid`` (the rest made up)."""
    return os.stat_result((stat.S_IFREG | mode, 1, 1, 1, uid, 0, 64, 0, 0, 0))


def test_roots_files_may_be_group_readable_as_libpq_allows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As a service user (uid 1000): root's 0640 file is fine, root's 0644 one is not; its
    own must be 0600; another user's never. The embedded secret must be its own, 0600."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert operator_file_problem(_stat(0o640, 0)) is None
    assert operator_file_problem(_stat(0o644, 0)) == (
        "is owned by root with mode 0644; root's may be at most 0640 (chmod 640 it)")
    assert operator_file_problem(_stat(0o600, 1000)) is None
    assert operator_file_problem(_stat(0o640, 1000)) == (
        "is readable or writable by group or others (mode 0640); chmod 600 it")
    assert operator_file_problem(_stat(0o600, 1001)) == (
        "is owned by uid 1001, not by this user (uid 1000) or root")
    assert own_file_problem(_stat(0o600, 0)) == "is owned by uid 0, not by this user (uid 1000)"
    assert own_file_problem(_stat(0o600, 1000)) is None


# -- secrets of at least 32 bytes (issue 13, point 8) ---------------------------------------------


@pytest.mark.parametrize("secret", ["a", "change-me", "x" * 31, "é" * 15])
def test_a_secret_shorter_than_32_bytes_is_refused_wherever_it_comes_from(
    tmp_path: Path, secret: str
) -> None:
    size = len(secret.encode())
    tail = f"must be at least 32 bytes (got {size}); make one with `openssl rand -base64 32`"
    with pytest.raises(ConfigError) as info:
        load_settings_from_text(f"[rpc]\nsecret = {json.dumps(secret)}\n", "q.toml", {})
    assert _one_line(info) == f"q.toml: rpc.secret: {tail}"
    with pytest.raises(ConfigError) as info:
        load_settings_from_text("", "q.toml", {"QCLUSTER_RPC_SECRET": secret})
    assert _one_line(info) == f"q.toml: QCLUSTER_RPC_SECRET {tail}"
    path = write_private(tmp_path / "secret", secret + "\n")
    with pytest.raises(ConfigError) as info:
        _load_secret_file(path)
    assert _one_line(info) == f"q.toml: rpc.secret_file: the secret in {path} {tail}"
    just = "0123456789abcdef" * 2  # 32 bytes, 16 distinct characters
    exactly = load_settings_from_text(f"[rpc]\nsecret = '{just}'\n", "q.toml", {})
    assert exactly.rpc_secret() == just


@pytest.mark.parametrize("secret", [" " * 36, "a" * 40, "ab" * 20, "1234567" * 6])
def test_a_long_placeholder_secret_is_refused(secret: str) -> None:
    """The attack of the outsider review: 36 spaces passed the length rule."""
    with pytest.raises(ConfigError) as info:
        load_settings_from_text(f"[rpc]\nsecret = {json.dumps(secret)}\n", "q.toml", {})
    distinct = len(set(secret))
    assert _one_line(info) == (
        f"q.toml: rpc.secret: has only {distinct} distinct characters: it looks like a "
        "placeholder, not a random secret; make one with `openssl rand -base64 32`")


def test_roots_group_readable_file_is_fine_when_qcluster_runs_as_root(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """root:qcluster 0640 is root's file whoever reads it, root included."""
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert operator_file_problem(_stat(0o640, 0)) is None
    assert operator_file_problem(_stat(0o600, 0)) is None
    assert operator_file_problem(_stat(0o644, 0)) == (
        "is owned by root with mode 0644; root's may be at most 0640 (chmod 640 it)")


def test_the_cli_refuses_a_short_secret_in_one_line(tmp_path: Path, sqlite_url: str) -> None:
    config = write_config(tmp_path, sqlite_url, rpc={"secret": "hunter2"})
    result = run_cli("config", "show", config=config, check=False)
    assert_cli_error(result, "rpc.secret: must be at least 32 bytes (got 7)")
    assert "hunter2" not in result.stdout + result.stderr
    env_result = run_cli("jobs", "list", config=write_config(tmp_path, sqlite_url, rpc=None,
                                                             name="q2.toml"),
                         env={"QCLUSTER_RPC_SECRET": "hunter2"}, check=False)
    assert_cli_error(env_result, "QCLUSTER_RPC_SECRET must be at least 32 bytes")
