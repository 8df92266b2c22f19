"""One bounded reader (``qcluster/settings/files.read_bounded``) behind every file qcluster
is given: config files, ``database.url_file``, ``rpc.secret_file`` and ``jobs apply``
files. Each keeps its limit and its wording; each reads at most one byte past its limit
(so ``/dev/zero`` ends) and fails in one line that names the file. The two files that
hold secrets must also be private regular files (``settings/private.py``), so
``/dev/zero`` is refused there before a byte is read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from qcluster.definitions import jobfile
from qcluster.definitions.jobfile import load_job_file
from qcluster.errors import ConfigError, InputError
from qcluster.settings import load_settings, load_settings_from_text, loading, model, read_bounded
from tests.helpers import write_private

DEV_ZERO = Path("/dev/zero")
# Platform features, not servers: on a laptop without them the test skips; under CI=true
# (Linux) it runs, and a missing one fails.
needs_dev_zero = pytest.mark.skipif(not DEV_ZERO.exists() and os.environ.get("CI") != "true",
                                    reason="no /dev/zero")


def _one_line(e: pytest.ExceptionInfo[Exception]) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message


# --- the function ----------------------------------------------------------------------------


def test_a_file_of_exactly_the_limit_is_read_and_one_byte_more_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    assert read_bounded(path, 10, "thing") == "x" * 10
    assert read_bounded(path, 10, "thing", text=False) == b"x" * 10
    with pytest.raises(ConfigError) as info:
        read_bounded(path, 9, "thing")
    assert _one_line(info) == f"{path}: cannot read thing: larger than 9 bytes"


@needs_dev_zero
def test_an_endless_file_ends_at_the_limit() -> None:
    with pytest.raises(InputError) as info:
        read_bounded(DEV_ZERO, 1000, "job file", error=InputError, text=False)
    assert _one_line(info) == "/dev/zero: cannot read job file: larger than 1000 bytes"


def test_the_two_shapes_of_message(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError) as info:
        read_bounded(missing, 10, "config")
    assert _one_line(info) == f"{missing}: cannot read config: No such file or directory"
    with pytest.raises(ConfigError) as info:
        read_bounded(missing, 10, "rpc.secret_file", source="q.toml")
    assert _one_line(info) == (
        f"q.toml: rpc.secret_file: cannot read {missing}: No such file or directory")


def test_what_the_system_refuses_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        read_bounded(tmp_path, 10, "config")
    assert _one_line(info) == f"{tmp_path}: cannot read config: Is a directory"
    with pytest.raises(ConfigError) as info:
        read_bounded("a\0b", 10, "config")
    assert _one_line(info).startswith("a\0b: cannot read config: ")
    (tmp_path / "bin").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError) as info:
        read_bounded(tmp_path / "bin", 10, "config")
    assert _one_line(info) == f"{tmp_path / 'bin'}: cannot read config: not UTF-8 text"
    assert read_bounded(tmp_path / "bin", 10, "config", text=False) == b"\xff\xfe"


@pytest.mark.skipif(not hasattr(os, "mkfifo") and os.environ.get("CI") != "true",
                    reason="no FIFOs")
def test_a_pipe_is_read_like_a_file(tmp_path: Path) -> None:
    # As before: `jobs apply /dev/stdin` and `--config <(...)` are pipes.
    r, w = os.pipe()
    os.write(w, b"[[job]]\n")
    os.close(w)
    assert read_bounded(f"/dev/fd/{r}", 100, "job file") == "[[job]]\n"
    os.close(r)


# --- config files (1 MiB) ----------------------------------------------------------------------


@needs_dev_zero
def test_config_file_endless() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(DEV_ZERO, {})
    assert _one_line(info) == (
        f"/dev/zero: cannot read config: larger than {loading.MAX_CONFIG_FILE} bytes")
    assert loading.MAX_CONFIG_FILE == 1024 * 1024


def test_config_file_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path, {})
    assert _one_line(info) == f"{tmp_path}: cannot read config: Is a directory"
    path = tmp_path / "q.toml"
    path.write_text("[cluster]\nname = 'abc'\n")
    monkeypatch.setattr(loading, "MAX_CONFIG_FILE", len(path.read_bytes()))
    assert load_settings(path, {}).cluster.name == "abc"
    limit = len(path.read_bytes()) - 1
    monkeypatch.setattr(loading, "MAX_CONFIG_FILE", limit)
    with pytest.raises(ConfigError) as info:
        load_settings(path, {})
    assert _one_line(info) == f"{path}: cannot read config: larger than {limit} bytes"


# --- url_file and secret_file (64 KiB) ---------------------------------------------------------


def _url_file(path: Path | str) -> str:
    return f"[database]\nurl_file = {json.dumps(str(path))}\n"


def _secret_file(path: Path | str) -> str:
    return f"[rpc]\nsecret_file = {json.dumps(str(path))}\n"


@needs_dev_zero
def test_url_file_and_secret_file_endless() -> None:
    assert model.MAX_SECRET_FILE == 64 * 1024
    with pytest.raises(ConfigError) as info:
        load_settings_from_text(_url_file(DEV_ZERO), "q.toml", {})
    assert _one_line(info) == ("q.toml: database.url_file: cannot use /dev/zero: it is a"
                               " character device, not a regular file")
    s = load_settings_from_text(_secret_file(DEV_ZERO), "q.toml", {})
    with pytest.raises(ConfigError) as info:
        s.rpc_secret()
    assert _one_line(info) == ("q.toml: rpc.secret_file: cannot use /dev/zero: it is a"
                               " character device, not a regular file")


def test_url_file_and_secret_file_messages(tmp_path: Path) -> None:
    big = write_private(tmp_path / "big", "x" * (64 * 1024 + 1))
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xffpostgresql://h/db")
    binary.chmod(0o600)
    for path, verb, reason in ((big, "read", "larger than 65536 bytes"),
                               (binary, "read", "not UTF-8 text"),
                               (tmp_path, "use", "it is a directory, not a regular file"),
                               (tmp_path / "nope", "read", "No such file or directory")):
        with pytest.raises(ConfigError) as info:
            load_settings_from_text(_url_file(path), "q.toml", {})
        assert _one_line(info) == f"q.toml: database.url_file: cannot {verb} {path}: {reason}"
        s = load_settings_from_text(_secret_file(path), "q.toml", {})
        with pytest.raises(ConfigError) as info:
            s.rpc_secret()
        assert _one_line(info) == f"q.toml: rpc.secret_file: cannot {verb} {path}: {reason}"


def test_a_url_file_of_exactly_the_limit_is_read(tmp_path: Path) -> None:
    url = "sqlite:///" + "a" * (64 * 1024 - len("sqlite:///") - 1) + "\n"
    write_private(tmp_path / "url", url)
    s = load_settings_from_text(_url_file(tmp_path / "url"), "q.toml", {})
    assert s.database_url() == url.strip()


# --- jobs apply files (64 MiB) -----------------------------------------------------------------


@needs_dev_zero
def test_job_file_endless() -> None:
    assert jobfile.MAX_FILE_BYTES == 64 * 1024 * 1024
    with pytest.raises(InputError) as info:
        load_job_file(DEV_ZERO, allow=["jobs.*"], default_tz="UTC")
    assert _one_line(info) == "/dev/zero: cannot read job file: larger than 67108864 bytes"


def test_job_file_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def error(path: Path) -> str:
        with pytest.raises(InputError) as info:
            load_job_file(path, allow=["jobs.*"], default_tz="UTC")
        return _one_line(info)

    assert error(tmp_path / "nope") == (
        f"{tmp_path / 'nope'}: cannot read job file: No such file or directory")
    assert error(tmp_path) == f"{tmp_path}: cannot read job file: Is a directory"
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff[[job]]\n")
    assert error(binary).startswith(f"{binary}: invalid TOML: 'utf-8' codec can't decode")
    path = tmp_path / "jobs.toml"
    path.write_text('[[job]]\nid = "a"\nfunc = "jobs.examples:hello"\nevery = "1s"\n')
    monkeypatch.setattr(jobfile, "MAX_FILE_BYTES", len(path.read_bytes()))
    assert [j.id for j in load_job_file(path, allow=["jobs.*"], default_tz="UTC")] == ["a"]
    monkeypatch.setattr(jobfile, "MAX_FILE_BYTES", len(path.read_bytes()) - 1)
    assert error(path) == (
        f"{path}: cannot read job file: larger than {len(path.read_bytes()) - 1} bytes")
