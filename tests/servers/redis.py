"""A private Redis server."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.servers.base import (
    START_TIMEOUT,
    STOP_TIMEOUT,
    Server,
    ServerUnavailable,
    tcp_request,
)


def _redis_server() -> str:
    for found in (
        shutil.which("redis-server"),
        "/usr/bin/redis-server",
        "/usr/sbin/redis-server",
    ):
        if found and Path(found).is_file():
            return found
    raise ServerUnavailable("redis-server not found: install the 'redis-server' package")


class RedisServer(Server):
    """A Redis server. With ``persist=False`` (the default: no RDB, no AOF) a restart
    starts empty, as a real Redis without persistence would; ``persist=True`` turns on
    the append-only file so that data survives stop/start and kill/start."""

    kind = "redis"

    def __init__(
        self,
        *,
        port: int | None = None,
        persist: bool = False,
        start_timeout: float = START_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        self.program = _redis_server()
        super().__init__(port=port, start_timeout=start_timeout, stop_timeout=stop_timeout)
        self.persist = persist

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _prepare(self) -> None:
        """Nothing to create: redis-server makes its files in ``dir`` itself."""

    def _command(self) -> list[str]:
        return [
            self.program,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "yes" if self.persist else "no",
            "--appendfsync", "no",
            "--dir", str(self.dir),
            "--daemonize", "no",
            "--protected-mode", "no",
            "--logfile", "",
        ]  # fmt: skip

    def _ready(self) -> bool:
        # A Redis still loading its data answers "-LOADING", not "+PONG".
        try:
            answer = tcp_request(self.host, self.port, b"PING\r\n", until=b"\r\n", timeout=0.5)
        except OSError:
            return False
        return answer.startswith(b"+PONG")
