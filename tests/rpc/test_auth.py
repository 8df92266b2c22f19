"""The RPC handshake against real ``qcluster start`` nodes, attacked as issue 13 did.

A network observer records a leader's handshake and replays it, to the same daemon, to
another, and to the same one after a restart; a peer posing as a member relays a
handshake between the leader and a real daemon; silent clients, with and without TLS,
sit on the port beside a legitimate one; a client sends megabytes before it has
authenticated; a daemon is asked to listen off loopback without TLS. The protocol is in
``docs/SECURITY.md``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import Pyro5.core
import Pyro5.errors
import pytest
import sqlalchemy as sa

from qcluster.rpc.handshake import client_handshake, derive_key, recv_exact
from qcluster.rpc.pyro import configure_pyro, proxy
from qcluster.rpc.server import HANDSHAKE_SECONDS, LOG_BURST, LOG_EVERY, PENDING_PER_PEER
from tests.conftest import unavailable
from tests.helpers import (
    TEST_SECRET,
    NodeProcess,
    assert_cli_error,
    run_cli,
    start_node,
    wait_for,
    write_config,
)
from tests.rpc.test_tls import make_ca, make_cert

pytestmark = pytest.mark.cluster
WORKER = "qcluster.worker.runner"


@pytest.fixture(autouse=True)
def _pyro() -> None:
    configure_pyro(serializer="msgpack", timeout=5.0, max_message_bytes=1 << 20)


@dataclass
class Node:
    process: NodeProcess
    uri: str
    host: str
    port: int

    def ping(self) -> int:
        with proxy(self.uri, TEST_SECRET, 5.0) as p:
            return int(p.ping()["capacity"])

    def peak_kib(self, reset: bool = False) -> int:
        if reset:
            Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0])


def _member_uri(url: str, node_id: str) -> str | None:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT uri FROM qc_members WHERE node_id = :n"),
                                {"n": node_id}).scalar()
    except sa.exc.OperationalError:
        return None  # no tables yet
    finally:
        engine.dispose()


@contextlib.contextmanager
def running(tmp: Path, url: str, node_id: str, *, port: int = 0) -> Iterator[Node]:
    config = write_config(tmp, url, name=f"{node_id}.toml",
                          worker={"concurrency": 2, "port": port})
    with start_node(config, node_id=node_id, role="worker",
                    log_path=tmp / f"{node_id}.log") as process:

        def serving() -> Node | None:
            assert process.running(), process.log_tail()
            found = _member_uri(url, node_id)
            if found is None:
                return None
            u = Pyro5.core.URI(found)
            node = Node(process, found, u.host, u.port)
            with contextlib.suppress(Pyro5.errors.CommunicationError):
                node.ping()  # the row may be a previous process's
                return node
            return None

        yield wait_for(serving, 30, what=f"{node_id} serving", details=process.log_tail)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'qcluster.db'}"


class Recorder:
    """A socket that keeps a copy of everything sent on it: what an observer captures."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.sent = sock, bytearray()

    def sendall(self, data: bytes) -> None:
        self.sent.extend(data)
        self.sock.sendall(data)

    def recv(self, n: int) -> bytes:
        return self.sock.recv(n)

    def settimeout(self, t: float | None) -> None:
        self.sock.settimeout(t)


def _until_closed(s: socket.socket, timeout: float = 10.0) -> bytes:
    s.settimeout(timeout)
    got = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(65536):
            got += chunk
    return got


def _hello_len(node: Node) -> int:
    return 37 + len(f"{node.host}:{node.port}")


def replay(node: Node, captured: bytes) -> bytes:
    """Send a captured client stream to ``node`` on a new connection; return all the
    node sends after its hello."""
    with socket.create_connection((node.host, node.port), timeout=5) as s:
        recv_exact(s, _hello_len(node), time.monotonic() + 5)  # type: ignore[arg-type]
        with contextlib.suppress(OSError):
            s.sendall(captured)
            s.shutdown(socket.SHUT_WR)
        return _until_closed(s)


def test_a_captured_handshake_is_refused_by_this_daemon_another_and_after_a_restart(
    tmp_path: Path, url: str
) -> None:
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    b_port = free.getsockname()[1]
    free.close()
    with running(tmp_path, url, "a") as a:
        with running(tmp_path, url, "b", port=b_port) as b:
            # The leader's side of a real handshake with B, then a call, as captured.
            with socket.create_connection((b.host, b.port), timeout=5) as raw:
                wire = Recorder(raw)
                client_handshake(wire, derive_key(TEST_SECRET),  # type: ignore[arg-type]
                                 f"{b.host}:{b.port}", WORKER, time.monotonic() + 5)
            captured = bytes(wire.sent)
            assert len(captured) == 32 + 1 + len(WORKER) + 32
            assert replay(b, captured) == b"", "B took a replayed handshake"
            assert replay(a, captured) == b"", "A took B's handshake"
        # B again, same address, a new process: the old capture is still worth nothing.
        with running(tmp_path, url, "b", port=b_port) as b2:
            assert replay(b2, captured) == b"", "a restarted B took an old handshake"
            assert b2.ping() == 2
            assert "refused RPC connection from 127.0.0.1" in b2.process.log()
        assert a.ping() == 2
        assert "authentication failed" in a.process.log()


@dataclass
class Relay:
    """A peer at its own address that forwards bytes to a real daemon, optionally
    rewriting the daemon's identity in its hello to its own (a fake member row points
    the leader here). It records what the daemon sent back beyond its hello."""

    target: Node
    rewrite: bool
    sock: socket.socket = field(default_factory=socket.socket)
    from_daemon: bytearray = field(default_factory=bytearray)

    def __post_init__(self) -> None:
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def uri(self) -> str:
        return f"PYRO:{WORKER}@127.0.0.1:{self.port}"

    def _serve(self) -> None:
        client, _ = self.sock.accept()
        with client, socket.create_connection((self.target.host, self.target.port)) as up:
            hello = recv_exact(up, _hello_len(self.target), time.monotonic() + 5)
            if self.rewrite:
                me = f"127.0.0.1:{self.port}".encode()
                hello = hello[:36] + bytes([len(me)]) + me
            client.sendall(hello)
            threading.Thread(target=self._pump, args=(client, up, None), daemon=True).start()
            self._pump(up, client, self.from_daemon)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, keep: bytearray | None) -> None:
        with contextlib.suppress(OSError):
            while chunk := src.recv(65536):
                if keep is not None:
                    keep.extend(chunk)
                dst.sendall(chunk)
            dst.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize("rewrite", [False, True], ids=["forwarded", "identity-rewritten"])
def test_a_relay_posing_as_a_member_gets_no_authenticated_connection(
    tmp_path: Path, url: str, rewrite: bool
) -> None:
    with running(tmp_path, url, "a") as a:
        relay = Relay(a, rewrite)
        with pytest.raises(Pyro5.errors.CommunicationError) as refused, \
                proxy(relay.uri, TEST_SECRET, 5.0) as p:
            p.submit(1, [])
        why = "calls itself" if not rewrite else "refused the handshake"
        assert why in str(refused.value)
        time.sleep(0.5)
        assert bytes(relay.from_daemon) == b"", "the daemon proved itself through a relay"
        assert a.ping() == 2


def _silent(n: int, node: Node, sources: list[str] | None = None) -> list[socket.socket]:
    out = []
    for i in range(n):
        s = socket.socket()
        if sources:
            s.bind((sources[i % len(sources)], 0))
        s.connect((node.host, node.port))
        out.append(s)
    return out


def _closed_by_peer(s: socket.socket, timeout: float) -> bool:
    s.settimeout(timeout)
    try:
        while s.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("spread", [False, True], ids=["one-address", "many-addresses"])
def test_silent_connections_beside_a_legit_client(tmp_path: Path, url: str,
                                                  spread: bool) -> None:
    """Before: 16 silent connections filled the pool and the 17th stalled the accept
    thread. Now the silent ones are capped (per address, and in all), the rest are closed
    at once, and a legitimate client connects while they sit there."""
    with running(tmp_path, url, "a") as a:
        # The legitimate client is 127.0.0.1; the silent ones come from elsewhere.
        sources = [f"127.0.0.{i}" for i in range(2, 40)] if spread else ["127.0.0.2"]
        silent = _silent(40, a, sources)
        try:
            assert a.ping() == 2  # while every silent connection is still open
            early = sum(_closed_by_peer(s, 0.2) for s in silent)
            assert early >= 40 - max(PENDING_PER_PEER, 16 // 2), early  # over the caps
            assert a.ping() == 2
            assert all(_closed_by_peer(s, HANDSHAKE_SECONDS * 3) for s in silent)
        finally:
            for s in silent:
                s.close()
        assert a.ping() == 2
        log = a.process.log()
        assert ("still in their handshake" in log) != spread
        assert ("to make room" in log) == spread
        assert "Traceback" not in log


def test_megabytes_before_authentication_are_not_read(tmp_path: Path, url: str) -> None:
    """Before: 4 MiB of empty msgpack arrays before the handshake cost the daemon about
    300 MB. Now it reads the handshake's fixed fields (a few dozen bytes) and hangs up."""
    with running(tmp_path, url, "a") as a:
        before = a.peak_kib(reset=True)
        for junk in (b"\x90" * (4 << 20), b"\xdd\xff\xff\xff\xff" * (1 << 20)):
            with socket.create_connection((a.host, a.port), timeout=5) as s, \
                    contextlib.suppress(OSError):
                s.sendall(junk)
                _until_closed(s)
        grown = a.peak_kib() - before
        assert grown < 2048, f"peak memory grew by {grown} KiB"
        assert a.ping() == 2


def _non_loopback_address() -> str | None:
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=False)
    for word in out.stdout.split():
        with contextlib.suppress(ValueError):
            ip = ipaddress.ip_address(word)
            if ip.version == 4 and not ip.is_loopback:
                return word
    return None


def test_a_daemon_off_loopback_needs_tls(tmp_path: Path, url: str) -> None:
    host = _non_loopback_address()
    if host is None:
        unavailable("this machine has no non-loopback IPv4 address to test")
    config = write_config(tmp_path, url, worker={"host": host})
    result = run_cli("start", "--role", "worker", config=config, check=False, timeout=30)
    assert_cli_error(result, "not a loopback address", "[rpc.tls]")
    ca, ca_key, ca_cert = make_ca(tmp_path, "ca")
    cert, key = make_cert(tmp_path, "node", ca_key, ca_cert)
    tls = {"cert": str(cert), "key": str(key), "ca": str(ca)}
    config = write_config(tmp_path, url, name="tls.toml", worker={"host": host},
                          rpc={"tls": tls})
    with start_node(config, node_id="tls", role="worker", log_path=tmp_path / "t.log") as n:
        wait_for(lambda: "node tls started" in n.log() or not n.running(), 30,
                 what="the TLS node to start", details=n.log_tail)
        assert n.running(), n.log_tail()


def test_a_silent_tls_client_does_not_stop_a_tls_daemon(tmp_path: Path, url: str) -> None:
    """Before: with [rpc.tls], one TCP connection that never sent a ClientHello stopped
    the daemon from accepting anyone for as long as it stayed open."""
    ca, ca_key, ca_cert = make_ca(tmp_path, "ca")
    cert, key = make_cert(tmp_path, "node", ca_key, ca_cert)
    tls = {"cert": str(cert), "key": str(key), "ca": str(ca)}
    config = write_config(tmp_path, url, rpc={"tls": tls})
    run_cli("db", "upgrade", config=config)
    with start_node(config, node_id="n1", log_path=tmp_path / "n1.log") as node:
        wait_for(lambda: '"leader": {' in run_cli("cluster", "status", "--json",
                                                  config=config).stdout,
                 timeout=30, what="a leader")
        uri = _member_uri(url, "n1")
        assert uri is not None
        host, port = uri.rsplit("@", 1)[1].rsplit(":", 1)
        silent = [socket.create_connection((host, int(port))) for _ in range(3)]
        try:
            added = run_cli("jobs", "add", "t", "--func", "jobs.builtin:noop", "--every", "1h",
                            config=config)
            assert "via leader n1" in added.stdout  # a TLS client served beside them
            assert all(_closed_by_peer(s, HANDSHAKE_SECONDS * 3) for s in silent)
        finally:
            for s in silent:
                s.close()
        assert "TLS handshake failed" in node.log()
        assert "Traceback" not in node.log()


def test_refusals_are_logged_with_the_address_and_capped_in_all(tmp_path: Path,
                                                                url: str) -> None:
    """One line per refusal with the peer's address; from 120 addresses at once, at most
    LOG_BURST lines, and the next line says how many were left out (outsider review F5)."""
    with running(tmp_path, url, "a") as a:
        with proxy(a.uri, TEST_SECRET, 5.0) as p, \
                pytest.raises(ValueError, match="is not confirmed"):
            run = {"run_id": 1, "job_id": "j", "func": "jobs.builtin:noop", "args": "[]",
                   "kwargs": "{}", "scheduled_at": time.time(), "attempt": 1,
                   "epoch": 2**63 - 1, "recover": False}
            p.submit(2**63 - 1, [run])  # a member's lie: logged with its address
        log = a.process.log()
        assert "refused RPC call from 127.0.0.1:" in log and "submit: epoch" in log
        for i in range(120):
            with socket.socket() as s:
                s.bind((f"127.0.1.{i + 1}", 0))
                s.connect((a.host, a.port))
                recv_exact(s, _hello_len(a), time.monotonic() + 5)  # type: ignore[arg-type]
                s.sendall(bytes(100))  # a wrong answer
                _until_closed(s)
        lines = [line for line in a.process.log().splitlines()
                 if "refused RPC connection from 127.0.1." in line]
        assert 1 <= len(lines) <= LOG_BURST, len(lines)
        time.sleep(LOG_EVERY + 0.5)
        with socket.socket() as s:
            s.bind(("127.0.2.1", 0))
            s.connect((a.host, a.port))
            s.sendall(bytes(100))
            _until_closed(s)
        wait_for(lambda: "refused RPC connection from 127.0.2.1" in a.process.log(), 10,
                 what="the line after the quiet ones")
        last = [line for line in a.process.log().splitlines() if "127.0.2.1" in line][-1]
        assert f"({120 - len(lines)} more refused and not logged" in last, last
        assert a.ping() == 2
