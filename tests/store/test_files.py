"""The files of an embedded (SQLite) cluster, made by real ``qcluster`` processes (issue
13, point 3): the database, its WAL and shared-memory files and the RPC secret are all
0600, and what another local user plants (the tests run as root; the other user is
uid 65534, nobody) is refused with one line, the planted file left as it was."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.helpers import assert_cli_error, run_cli, start_node, wait_for, write_config

NOBODY = 65534
#: Skip off CI only: under CI=true (root, as the test command runs) these must run.
as_root = pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true",
                             reason="plants files as another user (chown); not root")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    directory = tmp_path / "data"
    directory.mkdir(mode=0o700)
    return directory


def _config(tmp_path: Path, data: Path) -> Path:
    # No [rpc] secret: the embedded cluster makes its own beside the database.
    return write_config(tmp_path, f"sqlite:///{data / 'qc.db'}", rpc=None)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_a_node_creates_the_database_its_wal_and_its_secret_0600(tmp_path: Path,
                                                                  data: Path) -> None:
    config = _config(tmp_path, data)
    with start_node(config, node_id="n1", log_path=tmp_path / "n1.log") as node:
        wait_for(lambda: '"leader": {' in run_cli("cluster", "status", "--json",
                                                 config=config).stdout,
                 timeout=30, what="a leader", details=node.log_tail)
        run_cli("jobs", "add", "t", "--func", "jobs.examples:hello", "--every", "1h",
                config=config)
        names = {p.name for p in data.iterdir()}
        assert {"qc.db", "qc.db-wal", "qc.db-shm", "qc.db.secret"} <= names, names
        modes = {name: _mode(data / name) for name in sorted(names)}
        assert set(modes.values()) == {0o600}, modes
        node.terminate()
        node.wait()


@as_root
def test_a_secret_planted_by_another_user_stops_the_node_with_one_line(tmp_path: Path,
                                                                       data: Path) -> None:
    planted = data / "qc.db.secret"
    planted.write_text("chosen-by-the-attacker-0123456789abcdef\n")
    planted.chmod(0o600)
    os.chown(planted, NOBODY, NOBODY)
    result = run_cli("start", "--node-id", "n1", config=_config(tmp_path, data), check=False)
    assert_cli_error(result, str(planted), f"owned by uid {NOBODY}")
    assert planted.read_text() == "chosen-by-the-attacker-0123456789abcdef\n"
    assert os.stat(planted).st_uid == NOBODY


def test_a_symlink_planted_as_the_secret_stops_the_node_and_its_target_is_untouched(
    tmp_path: Path, data: Path
) -> None:
    target = tmp_path / "root-owned"
    target.write_text("root's own data\n")
    (data / "qc.db.secret").symlink_to(target)
    result = run_cli("start", "--node-id", "n1", config=_config(tmp_path, data), check=False)
    assert_cli_error(result, "is a symbolic link")
    assert target.read_text() == "root's own data\n"


def test_a_database_directory_others_can_write_is_refused_by_every_command(
    tmp_path: Path, data: Path
) -> None:
    data.chmod(0o777)
    config = _config(tmp_path, data)
    for args in (["jobs", "list"], ["start", "--node-id", "n1"]):
        result = run_cli(*args, config=config, check=False)
        assert_cli_error(result, f"{data}: cannot keep ", "other users can write this directory")
    assert list(data.iterdir()) == []
