"""A fault lab: every node in its own Linux network namespace, links cut by silent drops.

Layout of one lab (one per test process, so per xdist worker), all on 10.77.S.0/24, a
subnet that only the lab uses (S is taken under an flock, see :func:`_take_subnet`)::

    root namespace                 router namespace qcS-r           node namespaces
    (test process, CLI, servers)   (forwards, nothing else)
    qcS-up 10.77.S.1/30  <------>  up0 10.77.S.2/30
      + 10.77.S.200.. /32          v<seq> 10.77.S.4k+1/30  <---->  eth0 10.77.S.4k+2/30
        (PostgreSQL, ZooKeeper,
         Redis listen here)

Every packet between two nodes, or between a node and a server, is *forwarded* by the
router namespace. A cut is a pair of policy rules there, ``from A to B blackhole`` and
``from B to A blackhole``: the router drops forwarded packets silently (a blackhole sends
no ICMP, unlike ``unreachable`` or ``prohibit``), so neither end learns anything: a
connection hangs, a new connect times out, and after the heal TCP's retransmissions get
through again. Rules in the nodes' own namespaces would not do: a blackhole on the
sender's side fails ``connect`` at once with EINVAL, and the ``local`` rule (preference
0) delivers a packet for a local address before any rule we could add. The root
namespace gets one veth, its addresses and one route for 10.77.S.0/24; its rules and
sysctls are left alone (only the router namespace forwards).

Nodes reach the servers on their lab addresses; the RPC daemon of a node listens on its
own lab address, which qcluster allows only with ``[rpc.tls]`` (docs/SECURITY.md), so the
lab also makes a CA and a certificate per node whose subjectAltName is the node's address
(:class:`Pki`).

Needs root and iproute2's ``ip``; :func:`lab_problem` says what is missing (the fixtures
skip on a laptop, fail under CI=true). Everything the lab made is removed by
:meth:`Lab.close` and :meth:`Lab.remove_node`, and by the next lab that takes the same
subnet if a test run was killed (the flock is free once its holder is dead).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.servers import PostgresServer, RedisServer, ZooKeeperServer

log = logging.getLogger(__name__)

LOCK_DIR = Path("/run/qcluster-netns")
#: Subnets 10.77.S.0/24 that labs may take.
SUBNETS = range(10, 250)
#: Node k (1..MAX_NODES) has the /30 block 10.77.S.4k.
MAX_NODES = 49
#: Server i listens on 10.77.S.(200 + i).
SERVER_BASE = 200
RULE_PREF = 100
IP_TIMEOUT = 20.0


class LabError(RuntimeError):
    """An ``ip`` command failed."""


def lab_problem() -> str | None:
    """Why this machine cannot run a lab (None if it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's 'ip' not found: install the 'iproute2' package"
    return None


def ip(*args: str, check: bool = True) -> str:
    """Run ``ip ARGS``; return its stdout. LabError on failure when ``check``."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False,
                          timeout=IP_TIMEOUT, stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def _take_subnet() -> tuple[int, IO[str]]:
    """A subnet number S no live process holds, with its lock file held (flock)."""
    LOCK_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    start = os.getpid() % len(SUBNETS)
    for i in range(len(SUBNETS)):
        subnet = SUBNETS[(start + i) % len(SUBNETS)]
        f = open(LOCK_DIR / f"{subnet}.lock", "a+")  # noqa: SIM115 (held for the lab's life)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        return subnet, f
    raise LabError(f"every lab subnet 10.77.{SUBNETS[0]}-{SUBNETS[-1]}.0/24 is taken")


def _kill_namespace_processes(ns: str) -> None:
    pids = ip("netns", "pids", ns, check=False).split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + 5
    while pids and time.monotonic() < deadline:
        pids = ip("netns", "pids", ns, check=False).split()
        time.sleep(0.05)


def _delete_namespace(ns: str) -> None:
    _kill_namespace_processes(ns)
    ip("netns", "delete", ns, check=False)


def _sweep(subnet: int) -> None:
    """Remove what a dead lab on ``subnet`` left: its namespaces (and their processes),
    its uplink and, with it, its addresses and route."""
    prefix = f"qc{subnet}-"
    for line in ip("netns", "list", check=False).splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(prefix):
            _delete_namespace(name)
    ip("link", "delete", f"qc{subnet}-up", check=False)


@dataclass
class NetNode:
    """One node's namespace: ``ns`` (for ``ip netns exec``), its address, its veth."""

    name: str
    ns: str
    ip: str
    slot: int
    router_if: str

    @property
    def exec_prefix(self) -> list[str]:
        """The command prefix that runs a program in this namespace (it execs, so the
        program keeps the pid)."""
        return ["ip", "netns", "exec", self.ns]


@dataclass
class Lab:
    """A router namespace, an uplink to the root namespace, node namespaces and cuts."""

    subnet: int
    _lock: IO[str]
    router: str = ""
    uplink: str = ""
    nodes: dict[str, NetNode] = field(default_factory=dict)
    _free: list[int] = field(default_factory=list)
    _seq: int = 0
    _rules: set[tuple[str, str]] = field(default_factory=set)
    _addresses: list[str] = field(default_factory=list)
    _closed: bool = False

    @classmethod
    def create(cls) -> Lab:
        subnet, lock = _take_subnet()
        lab = cls(subnet, lock)
        try:
            lab._build()
        except BaseException:
            lab.close()
            raise
        return lab

    def addr(self, host: int) -> str:
        return f"10.77.{self.subnet}.{host}"

    @property
    def gateway(self) -> str:
        """The root namespace's address on the lab (the test process's source address)."""
        return self.addr(1)

    def _build(self) -> None:
        _sweep(self.subnet)
        self.router, self.uplink = f"qc{self.subnet}-r", f"qc{self.subnet}-up"
        self._free = list(range(1, MAX_NODES + 1))
        ip("netns", "add", self.router)
        ip("-n", self.router, "link", "set", "lo", "up")
        # Forwarding in the router namespace only: its sysctls are its own.
        subprocess.run(["ip", "netns", "exec", self.router, "sysctl", "-qw",
                        "net.ipv4.ip_forward=1"], check=True, capture_output=True)
        ip("link", "add", self.uplink, "type", "veth", "peer", "name", "up0",
           "netns", self.router)
        ip("addr", "add", f"{self.addr(1)}/30", "dev", self.uplink)
        ip("link", "set", self.uplink, "up")
        ip("-n", self.router, "addr", "add", f"{self.addr(2)}/30", "dev", "up0")
        ip("-n", self.router, "link", "set", "up0", "up")
        ip("route", "add", f"10.77.{self.subnet}.0/24", "via", self.addr(2),
           "dev", self.uplink)

    # -- servers ------------------------------------------------------------------------

    def server_address(self) -> str:
        """A new address in the root namespace for one server to listen on."""
        host = self.addr(SERVER_BASE + len(self._addresses))
        ip("addr", "add", f"{host}/32", "dev", self.uplink)
        ip("-n", self.router, "route", "add", f"{host}/32", "via", self.addr(1), "dev", "up0")
        self._addresses.append(host)
        return host

    @property
    def server_addresses(self) -> list[str]:
        return list(self._addresses)

    # -- nodes -------------------------------------------------------------------------

    def add_node(self, name: str) -> NetNode:
        """A new namespace for node ``name``, linked to the router."""
        if not self._free:
            raise LabError(f"a lab has room for {MAX_NODES} nodes at once")
        slot = self._free.pop(0)
        self._seq += 1
        ns = f"qc{self.subnet}-{self._seq}-{name}"[:60]
        router_if = f"v{self._seq}"
        node = NetNode(name, ns, self.addr(4 * slot + 2), slot, router_if)
        ip("netns", "add", ns)
        try:
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", self.router, "link", "add", router_if, "type", "veth", "peer",
               "name", "eth0", "netns", ns)
            ip("-n", self.router, "addr", "add", f"{self.addr(4 * slot + 1)}/30",
               "dev", router_if)
            ip("-n", self.router, "link", "set", router_if, "up")
            ip("-n", ns, "addr", "add", f"{node.ip}/30", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "route", "add", "default", "via", self.addr(4 * slot + 1))
        except BaseException:
            _delete_namespace(ns)
            self._free.append(slot)
            raise
        self.nodes[ns] = node
        return node

    def remove_node(self, node: NetNode) -> None:
        """Kill what runs in the node's namespace and delete it (its veth goes with it)."""
        self.heal(node.ip)
        _delete_namespace(node.ns)
        if self.nodes.pop(node.ns, None) is not None:
            self._free.append(node.slot)

    # -- cuts --------------------------------------------------------------------------

    def cut(self, a: str, others: Iterable[str]) -> None:
        """Silently drop every packet between address ``a`` and each of ``others``, both
        ways, from now on."""
        for b in others:
            for rule in ((a, b), (b, a)):
                if rule not in self._rules:
                    ip("-n", self.router, "rule", "add", "from", rule[0], "to", rule[1],
                       "blackhole", "pref", str(RULE_PREF))
                    self._rules.add(rule)

    def isolate(self, a: str) -> None:
        """Cut ``a`` from every other address of the lab."""
        self.cut(a, self.everyone_but(a))

    def everyone_but(self, a: str) -> list[str]:
        peers = [n.ip for n in self.nodes.values()] + self._addresses + [self.gateway]
        return [p for p in peers if p != a]

    def heal(self, a: str | None = None, others: Iterable[str] | None = None) -> None:
        """Undo cuts: all of them, those of ``a``, or those between ``a`` and ``others``."""
        wanted = None if others is None else set(others)
        for rule in sorted(self._rules):
            if a is not None and a not in rule:
                continue
            if wanted is not None and not ({rule[0], rule[1]} - {a}) & wanted:
                continue
            ip("-n", self.router, "rule", "del", "from", rule[0], "to", rule[1],
               "blackhole", "pref", str(RULE_PREF), check=False)
            self._rules.discard(rule)

    @property
    def cuts(self) -> set[tuple[str, str]]:
        return set(self._rules)

    # -- the end -----------------------------------------------------------------------

    def close(self) -> None:
        """Delete every namespace, veth, address and route of the lab; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            for node in list(self.nodes.values()):
                with contextlib.suppress(Exception):
                    self.remove_node(node)
            _sweep(self.subnet)
        finally:
            self._lock.close()


@contextlib.contextmanager
def lab() -> Iterator[Lab]:
    made = Lab.create()
    try:
        yield made
    finally:
        made.close()


# -- servers on lab addresses ---------------------------------------------------------------


class LabPostgres(PostgresServer):
    """A private PostgreSQL that listens on a lab address and trusts the lab's subnet."""

    def __init__(self, host: str, subnet: str) -> None:
        super().__init__()
        self.host = host
        self.subnet = subnet
        self.settings["listen_addresses"] = host

    def _prepare(self) -> None:
        super()._prepare()
        with open(self.data_dir / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {self.subnet} trust\n")


class LabZooKeeper(ZooKeeperServer):
    """A private ZooKeeper on a lab address."""

    def __init__(self, host: str) -> None:
        super().__init__()
        self.host = host
        self.config["clientPortAddress"] = host


class LabRedis(RedisServer):
    """A private Redis on a lab address."""

    def __init__(self, host: str) -> None:
        super().__init__()
        self.host = host


# -- certificates ------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class Pki:
    """A throw-away cluster CA in ``directory`` and certificates that it signs."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self._cert = (
            x509.CertificateBuilder().subject_name(_name("qcluster-lab-ca"))
            .issuer_name(_name("qcluster-lab-ca")).public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.ca = self.dir / "ca.pem"
        self.ca.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, addresses: Sequence[str]) -> tuple[Path, Path]:
        """(cert, key) for ``name`` whose subjectAltName holds ``addresses`` and
        127.0.0.1. Valid a day either side of now, so a node whose clock is skewed by
        libfaketime accepts it too."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        alt: list[x509.GeneralName] = [x509.DNSName("localhost")]
        alt += [x509.IPAddress(ipaddress.ip_address(a)) for a in (*addresses, "127.0.0.1")]
        cert = (
            x509.CertificateBuilder().subject_name(_name(name)).issuer_name(self._cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        cert_path, key_path = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        return cert_path, key_path

    def tls_section(self, name: str, addresses: Sequence[str]) -> dict[str, object]:
        """An ``[rpc.tls]`` table for ``name``."""
        cert, key = self.issue(name, addresses)
        return {"cert": str(cert), "key": str(key), "ca": str(self.ca),
                "require_client_cert": True}
