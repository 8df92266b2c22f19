"""A private standalone ZooKeeper server."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
from pathlib import Path

from tests.servers.base import (
    START_TIMEOUT,
    STOP_TIMEOUT,
    Server,
    ServerUnavailable,
    tcp_request,
)


def _zookeeper_classpath() -> str:
    """$ZOOKEEPER_HOME's jars (an Apache tarball), else Debian's zookeeper package."""
    if home := os.environ.get("ZOOKEEPER_HOME"):
        if not any(Path(home).glob("lib/zookeeper-*.jar")):
            raise ServerUnavailable(f"ZOOKEEPER_HOME={home} has no lib/zookeeper-*.jar")
        return os.pathsep.join([f"{home}/lib/*", f"{home}/*"])
    debian = Path("/usr/share/java/zookeeper.jar")
    if not debian.is_file():
        raise ServerUnavailable(
            "ZooKeeper not found: install the 'zookeeper' package or set ZOOKEEPER_HOME"
        )
    # The jar's manifest names its dependencies; slf4j-simple, when there, makes it log.
    jars = [debian, Path("/usr/share/java/slf4j-simple.jar")]
    return os.pathsep.join(str(jar) for jar in jars if jar.is_file())


def _java() -> str:
    if (home := os.environ.get("JAVA_HOME")) and Path(home, "bin", "java").is_file():
        return str(Path(home, "bin", "java"))
    if found := shutil.which("java"):
        return found
    raise ServerUnavailable("java not found: install a Java runtime (default-jre-headless)")


class ZooKeeperServer(Server):
    """A standalone ZooKeeper that allows short sessions (``min_session_timeout_ms``).

    Its data survives stop/start and kill/start. All four-letter words are enabled.
    """

    kind = "zookeeper"
    #: The password of ZooKeeper's "super" user, who passes every ACL (test cleanup).
    super_password = "qcluster-tests"

    def __init__(
        self,
        *,
        port: int | None = None,
        tick_time_ms: int = 500,
        min_session_timeout_ms: int = 1000,
        max_session_timeout_ms: int = 60000,
        heap_mb: int = 256,
        start_timeout: float = START_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        self.java = _java()
        self.classpath = _zookeeper_classpath()
        super().__init__(port=port, start_timeout=start_timeout, stop_timeout=stop_timeout)
        self.heap_mb = heap_mb
        self.config: dict[str, str] = {
            "tickTime": str(tick_time_ms),
            "dataDir": str(self.dir / "data"),
            "clientPort": str(self.port),
            "clientPortAddress": self.host,
            "minSessionTimeout": str(min_session_timeout_ms),
            "maxSessionTimeout": str(max_session_timeout_ms),
            "maxClientCnxns": "0",  # no per-IP limit: every test client comes from 127.0.0.1
            "admin.enableServer": "false",
            "4lw.commands.whitelist": "*",
            "forceSync": "no",
        }

    @property
    def hosts(self) -> str:
        """The connect string, "127.0.0.1:PORT"."""
        return f"{self.host}:{self.port}"

    @property
    def super_auth(self) -> tuple[str, str]:
        """kazoo ``auth_data`` entry of the super user: ``KazooClient(auth_data=[...])``."""
        return ("digest", f"super:{self.super_password}")

    def four_letter_word(self, word: str, timeout: float = 1.0) -> str:
        """Send a four-letter command ("ruok", "srvr", "cons", ...) and return the answer."""
        answer = tcp_request(self.host, self.port, word.encode(), timeout=timeout)
        return answer.decode(errors="replace")

    def _prepare(self) -> None:
        (self.dir / "data").mkdir()
        lines = [f"{key}={value}" for key, value in self.config.items()]
        (self.dir / "zoo.cfg").write_text("\n".join(lines) + "\n")

    def _command(self) -> list[str]:
        return [
            self.java,
            f"-Xmx{self.heap_mb}m",
            "-XX:+UseSerialGC",  # few threads and little memory on a small test machine
            "-XX:TieredStopAtLevel=1",  # faster start
            "-Djava.net.preferIPv4Stack=true",
            "-Dzookeeper.admin.enableServer=false",
            f"-Dzookeeper.DigestAuthenticationProvider.superDigest=super:{self._super_digest()}",
            "-Dorg.slf4j.simpleLogger.showDateTime=true",
            "-cp",
            self.classpath,
            "org.apache.zookeeper.server.ZooKeeperServerMain",
            str(self.dir / "zoo.cfg"),
        ]

    def _super_digest(self) -> str:
        # ZooKeeper's digest scheme: base64(sha1("user:password")).
        digest = hashlib.sha1(f"super:{self.super_password}".encode()).digest()
        return base64.b64encode(digest).decode()

    def _ready(self) -> bool:
        # "srvr" answers "not currently serving requests" until the server is up.
        try:
            return "Mode: standalone" in self.four_letter_word("srvr", timeout=0.5)
        except OSError:
            return False
