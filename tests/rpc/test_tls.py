"""Mutual TLS between nodes and the CLI, with certificates made in the test; and a cluster
on a shared database refuses to start without a real secret."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.helpers import (
    assert_cli_error,
    run_cli,
    runs_json,
    start_node,
    wait_for,
    write_config,
)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def make_ca(tmp: Path, name: str) -> tuple[Path, ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = tmp / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, key, cert


def make_cert(tmp: Path, name: str, ca_key: ec.EllipticCurvePrivateKey,
              ca_cert: x509.Certificate) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path = tmp / f"{name}.crt"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, _write_key(tmp / f"{name}.key", key)


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    ca, ca_key, ca_cert = make_ca(tmp_path, "cluster-ca")
    node_cert, node_key = make_cert(tmp_path, "node", ca_key, ca_cert)
    _, rogue_key, rogue_ca = make_ca(tmp_path, "rogue-ca")
    rogue_cert, rogue_key_path = make_cert(tmp_path, "rogue", rogue_key, rogue_ca)
    return {"ca": ca, "cert": node_cert, "key": node_key,
            "rogue_cert": rogue_cert, "rogue_key": rogue_key_path}


def _leader_port(config: Path) -> tuple[str, int]:
    status = run_cli("cluster", "status", "--json", config=config)
    import json

    uri = json.loads(status.stdout)["leader"]["uri"]
    host, port = uri.rsplit("@", 1)[1].rsplit(":", 1)
    return host, int(port)


def _tls_accepted(host: str, port: int, ca: Path, cert: tuple[Path, Path] | None) -> bool:
    """Whether the daemon keeps a TLS connection made with ``cert`` (None: no certificate)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    try:
        with socket.create_connection((host, port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as tls:
            # TLS 1.3 reports a refused client certificate on the first read. An accepted
            # client reads nothing: the daemon waits for its Pyro5 handshake.
            tls.settimeout(2)
            return tls.recv(1) != b""
    except TimeoutError:
        return True
    except (ssl.SSLError, ConnectionError):
        return False


def test_mutual_tls_cluster_runs_jobs_and_refuses_clients_without_a_valid_certificate(
    tmp_path: Path, pg_url: str, pki: dict[str, Any]
) -> None:
    tls = {"cert": str(pki["cert"]), "key": str(pki["key"]), "ca": str(pki["ca"]),
           "require_client_cert": True}
    config = write_config(tmp_path, pg_url, rpc={"tls": tls})
    run_cli("db", "upgrade", config=config)
    with start_node(config, node_id="n1", log_path=tmp_path / "n1.log") as node:
        wait_for(lambda: '"leader": {' in run_cli("cluster", "status", "--json",
                                                  config=config).stdout,
                 timeout=30, what="a leader")
        added = run_cli("jobs", "add", "t", "--func", "jobs.builtin:noop", "--every", "1s",
                        config=config)
        assert "via leader n1" in added.stdout
        wait_for(lambda: [r for r in runs_json(config) if r["status"] == "succeeded"],
                 timeout=30, what="a run over TLS")
        host, port = _leader_port(config)
        assert _tls_accepted(host, port, pki["ca"], (pki["cert"], pki["key"]))
        assert not _tls_accepted(host, port, pki["ca"], None)
        assert not _tls_accepted(host, port, pki["ca"], (pki["rogue_cert"], pki["rogue_key"]))
        # a CLI without TLS settings cannot talk to the leader: one clear error
        plain = write_config(tmp_path, pg_url, name="plain.toml")
        result = run_cli("jobs", "pause", "t", config=plain, check=False)
        assert_cli_error(result, "did not answer")
        assert node.running()
        assert "Traceback" not in node.log()


@pytest.mark.parametrize("secret", [None, "change-me"], ids=["no-secret", "example-secret"])
def test_cluster_on_a_shared_database_refuses_to_start_without_a_real_secret(
    tmp_path: Path, pg_url: str, secret: str | None
) -> None:
    rpc = None if secret is None else {"secret": secret}
    config = write_config(tmp_path, pg_url, rpc=rpc)
    result = run_cli("start", config=config, check=False, timeout=30)
    assert_cli_error(result, "secret")


def test_clients_trust_the_cluster_ca_only(pki: dict[str, Any],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Not the system store: even with SSL_CERT_FILE pointing at another CA, the client
    context of [rpc.tls] holds the cluster CA and nothing else (issue 13, point 8)."""
    from qcluster.rpc import tls
    from qcluster.settings import load_settings_from_text

    monkeypatch.setenv("SSL_CERT_FILE", str(pki["rogue_cert"]))
    text = (f'[rpc.tls]\ncert = "{pki["cert"]}"\nkey = "{pki["key"]}"\n'
            f'ca = "{pki["ca"]}"\n')
    settings = load_settings_from_text(text, "q.toml", {})
    tls.load(settings.rpc.tls)
    try:
        client = tls.client_context()
        assert client is not None
        subjects = [dict(x[0] for x in c["subject"])["commonName"]
                    for c in client.get_ca_certs()]
        assert subjects == ["cluster-ca"]
        assert client.check_hostname and client.verify_mode == ssl.CERT_REQUIRED
    finally:
        tls.load(None)
