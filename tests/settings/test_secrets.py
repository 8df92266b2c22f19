"""Secrets stay secret: the database password and the RPC secret appear in no output a
user or an operator sees — node logs, listings, status, config, error messages."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import run_cli, runs_json, start_node, wait_for, write_config

PASSWORD = "pw-Zq81xT0pSecret"
RPC_SECRET = "rpc-K7mN2vWq9Secret-at-least-32-bytes"


def _with_password(url: str) -> str:
    # the test server trusts loopback, so any password connects: it must just never show
    return url.replace("postgres@", f"postgres:{PASSWORD}@", 1)


def test_password_and_rpc_secret_never_appear_in_any_output(tmp_path: Path,
                                                            pg_url: str) -> None:
    url = _with_password(pg_url)
    assert PASSWORD in url
    config = write_config(tmp_path, url, rpc={"secret": RPC_SECRET})
    outputs = [run_cli("db", "upgrade", config=config)]
    with start_node(config, node_id="n1", log_path=tmp_path / "n1.log") as node:
        outputs.append(run_cli("jobs", "add", "t", "--func", "jobs.examples:flaky",
                               "--every", "1s", "--kwarg", "failure_rate=1.0", config=config))
        wait_for(lambda: runs_json(config), timeout=30, what="a run")
        for args in (["jobs", "list"], ["jobs", "show", "t"], ["runs", "list", "--json"],
                     ["cluster", "status"], ["cluster", "status", "--json"],
                     ["config", "show"], ["config", "show", "--json"], ["config", "check"]):
            outputs.append(run_cli(*args, config=config))
        node.terminate()
        node.wait()
        log = node.log()
    # an error that names the database: the server is gone
    down = write_config(tmp_path, url.replace(url.split("@")[1].split("/")[0],
                                              "127.0.0.1:1"), name="down.toml",
                        rpc={"secret": RPC_SECRET})
    outputs.append(run_cli("jobs", "list", config=down, check=False))
    assert outputs[-1].returncode != 0 and "127.0.0.1:1" in outputs[-1].stderr
    texts = [log] + [o.stdout + o.stderr for o in outputs]
    for text in texts:
        assert PASSWORD not in text
        assert RPC_SECRET not in text
    assert "***" in outputs[-1].stderr or "postgres@" in outputs[-1].stderr
