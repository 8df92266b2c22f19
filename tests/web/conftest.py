"""A dashboard served in this process (``WebServer`` in a thread) over an SQLite or
PostgreSQL database, and a small HTTP client that keeps cookies and follows nothing."""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import re
import urllib.parse
from collections.abc import Iterator
from http.cookies import SimpleCookie
from pathlib import Path

import pytest

from qcluster.settings import Settings, load_settings_from_mapping
from qcluster.settings.passwords import MIN_LOG2_N, hash_password
from qcluster.web.server import WebServer
from tests.helpers import TEST_SETTINGS, wait_for

PASSWORD = "correct horse battery staple"
TOKEN = "t0ken-" + "x7Qm2Lp9" * 4
# The cheapest cost the settings accept: a test logs in many times.
HASH = hash_password(PASSWORD, MIN_LOG2_N)
TOKEN_HASH = hash_password(TOKEN, MIN_LOG2_N)


def web_settings(db_url: str, **web: object) -> Settings:
    section = {"port": 0, "users": [
        {"name": "ops", "password_hash": HASH, "role": "operator"},
        {"name": "viewer", "password_hash": HASH, "role": "viewer"}],
        "tokens": [{"name": "robot", "token_hash": TOKEN_HASH, "role": "operator"}],
        **web}
    return load_settings_from_mapping({**TEST_SETTINGS, "database": {"url": db_url},
                                       "web": section}, "test.toml")


@dataclasses.dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: str
    set_cookies: list[str] = dataclasses.field(default_factory=list)

    @property
    def location(self) -> str:
        return self.headers.get("location", "")

    def field(self, name: str) -> str:
        m = re.search(rf'name="{name}" value="([^"]*)"', self.body)
        assert m is not None, f"no field {name!r} in the page"
        return m.group(1)


class Client:
    """HTTP/1.1 to the dashboard with a cookie jar; redirects are returned, not
    followed."""

    def __init__(self, port: int, source: str | None = None) -> None:
        self.port = port
        self.source = source  # a loopback address of its own (127.0.0.2): another peer
        self.cookies: dict[str, str] = {}

    def request(self, method: str, path: str, form: dict[str, str | list[str]] | None = None,
                headers: dict[str, str] | None = None, body: bytes | None = None) -> Response:
        conn = http.client.HTTPConnection(
            "127.0.0.1", self.port, timeout=30,
            source_address=None if self.source is None else (self.source, 0))
        h = {"Host": f"127.0.0.1:{self.port}", **(headers or {})}
        if self.cookies:
            h["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if form is not None:
            body = urllib.parse.urlencode(form, doseq=True).encode()
            h.setdefault("Content-Type", "application/x-www-form-urlencoded")
        try:
            conn.request(method, path, body=body, headers=h)
            r = conn.getresponse()
            text = r.read().decode("utf-8", "replace")
            set_cookies = r.headers.get_all("set-cookie") or []
            for value in set_cookies:
                jar: SimpleCookie = SimpleCookie()
                jar.load(value)
                for key, morsel in jar.items():
                    if morsel["max-age"] == "0" or not morsel.value.strip('"'):
                        self.cookies.pop(key, None)
                    else:
                        self.cookies[key] = morsel.value
            return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, text,
                            set_cookies)
        finally:
            conn.close()

    def get(self, path: str, **kw: object) -> Response:
        return self.request("GET", path, **kw)  # type: ignore[arg-type]

    def post(self, path: str, form: dict[str, str | list[str]], **kw: object) -> Response:
        return self.request("POST", path, form=form, **kw)  # type: ignore[arg-type]

    def login(self, user: str = "ops", password: str = PASSWORD) -> Response:
        page = self.get("/login")
        r = self.post("/login", {"csrf": page.field("csrf"), "user": user,
                                 "password": password, "next": "/jobs"})
        return r

    def csrf(self, path: str = "/jobs") -> str:
        return self.get(path).field("csrf")


@dataclasses.dataclass
class Served:
    server: WebServer
    settings: Settings

    @property
    def port(self) -> int:
        return self.server.port

    def client(self, source: str | None = None) -> Client:
        return Client(self.port, source)


@contextlib.contextmanager
def serving(settings: Settings) -> Iterator[Served]:
    """A dashboard over ``settings`` in a thread of this process, closed at the end."""
    from qcluster.client.admin import open_db

    open_db(settings).dispose()  # the embedded database, created
    server = WebServer(settings, port=0)
    server.start()
    wait_for(lambda: server.server.started, 10, what="the dashboard to serve")
    try:
        yield Served(server, settings)
    finally:
        server.close()


@pytest.fixture
def served(sqlite_url: str, tmp_path: Path) -> Iterator[Served]:
    with serving(web_settings(sqlite_url)) as s:
        yield s
