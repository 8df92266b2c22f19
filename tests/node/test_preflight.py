"""``qcluster config check`` refuses what ``qcluster start`` would refuse (outsider review
of issue 13, F2): a badly kept or example secret, TLS files that do not go together, and
an address off loopback without TLS, each in one ``error:`` line with a non-zero exit."""

from __future__ import annotations

from pathlib import Path

import pytest

from qcluster.node import EXAMPLE_SECRETS
from tests.helpers import assert_cli_error, run_cli, write_config, write_private
from tests.rpc.test_tls import make_ca, make_cert


def test_a_good_config_is_ok(tmp_path: Path, sqlite_url: str) -> None:
    config = write_config(tmp_path, sqlite_url)
    assert run_cli("config", "check", config=config).stdout.startswith("ok: ")


def test_a_secret_file_others_can_read_is_refused(tmp_path: Path, sqlite_url: str) -> None:
    secret = write_private(tmp_path / "secret", "0123456789abcdefghijklmnopqrstuvwxyz")
    secret.chmod(0o644)
    config = write_config(tmp_path, sqlite_url, rpc={"secret": None,
                                                     "secret_file": str(secret)})
    for command in (("config", "check"), ("start",)):
        result = run_cli(*command, config=config, check=False, timeout=30)
        assert_cli_error(result, "rpc.secret_file", "mode 0644")


def test_the_example_secret_is_refused(tmp_path: Path, pg_url: str) -> None:
    example = max(EXAMPLE_SECRETS, key=len)  # the one long enough to pass the length rule
    config = write_config(tmp_path, pg_url, rpc={"secret": example})
    result = run_cli("config", "check", config=config, check=False)
    assert_cli_error(result, "example value")


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_an_address_off_loopback_without_tls_is_refused(tmp_path: Path, sqlite_url: str,
                                                        host: str) -> None:
    config = write_config(tmp_path, sqlite_url, worker={"host": host})
    result = run_cli("config", "check", config=config, check=False)
    assert_cli_error(result, "not a loopback address", "[rpc.tls]")


def test_tls_files_that_do_not_go_together_are_refused(tmp_path: Path,
                                                       sqlite_url: str) -> None:
    ca, ca_key, ca_cert = make_ca(tmp_path, "ca")
    cert, _ = make_cert(tmp_path, "one", ca_key, ca_cert)
    _, other_key = make_cert(tmp_path, "two", ca_key, ca_cert)
    tls = {"cert": str(cert), "key": str(other_key), "ca": str(ca)}
    config = write_config(tmp_path, sqlite_url, worker={"host": "0.0.0.0"}, rpc={"tls": tls})
    result = run_cli("config", "check", config=config, check=False)
    assert_cli_error(result, "cannot load the [rpc.tls] cert, key or ca")
