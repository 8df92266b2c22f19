"""The dashboard: server-rendered pages (Starlette + Jinja2) over the shared database.

It reads the database directly (``web/queries.py``, one connection pool for the process)
and sends every change through :class:`~qcluster.client.api.Client`, as the CLI does: to
the leader's control API while a leader lives, else to the database, fenced. Pages:

- ``/``: the cluster: backend and phase, leader, members, a migration's progress;
- ``/jobs``: jobs by id, searched and filtered, with bulk pause/resume and run now;
- ``/jobs/{id}``: one job, its next fire times, its last 100 runs and their lateness;
- ``/runs``: recent failures and misses (any status on request), ``/runs/{id}``: one run
  and the output each attempt kept.

Every page needs a login (``web/auth.py``); changes need the operator role and the
session's CSRF token. ``web/static/refresh.js`` (our one script, no build step) reloads
the open page's main part every ``[web] refresh_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import socket
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qcluster import __version__
from qcluster.client import reads
from qcluster.client.admin import open_db, snapshot
from qcluster.client.api import Client
from qcluster.definitions.jobdefs import check_job_id
from qcluster.definitions.policy import FIELDS as POLICY_FIELDS
from qcluster.definitions.triggers import fire_times
from qcluster.errors import InputError, QClusterError
from qcluster.peers import Networks, trusted_networks, within
from qcluster.settings import Settings
from qcluster.settings.text import printable
from qcluster.store import bounds, catalog
from qcluster.store.db import Database
from qcluster.store.runs.states import RunStatus
from qcluster.web import auth, queries, words

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SESSION_COOKIE = "qc_session"
LOGIN_COOKIE = "qc_login"
MAX_BODY = 64 * 1024
MAX_HEAD = 16 * 1024  # a request's line and headers
MAX_FIELDS = 1000
PAGE_SIZE = 100
MAX_SEARCH = 200
NEXT_FIRES = 10
CLUSTER_CACHE_SECONDS = 1.0
BODY_SECONDS = 10.0  # to send a request's body

#: What a careful app sends with every response. The pages have no inline script or
#: style, so the policy allows our own files only.
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    # same-origin, not no-referrer: with no-referrer Chromium sends "Origin: null" on our
    # own forms, and the Origin check below could not tell them from a sandboxed page.
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=(), interest-cohort=()",
    "cache-control": "no-store",
}


class Guard:
    """ASGI middleware, before the app sees a request:

    - a head over :data:`MAX_HEAD` bytes is refused (431: h11 bounds only a head that
      arrives in pieces);
    - a ``Host`` that is not an IP address, ``localhost``, this machine's name or one of
      ``[web] allowed_hosts`` is refused (400), so that a page whose name was rebound to
      this address (DNS rebinding) cannot reach the login;
    - the body is read whole first, at most :data:`MAX_BODY` bytes (413 beyond, chunked
      or not) within :data:`BODY_SECONDS` (408), so the app never meets a slow or huge
      one;
    - from a peer in ``[web] trusted_proxies``, the client is the last address of
      ``X-Forwarded-For`` that is not one of them (what the nearest trusted proxy saw);
    - and every response gets the security headers (HSTS too under TLS)."""

    def __init__(self, app: ASGIApp, *, tls: bool, behind_tls_proxy: bool,
                 allowed_hosts: tuple[str, ...], trusted_proxies: tuple[str, ...]) -> None:
        self.app = app
        self.trusted = trusted_networks(trusted_proxies)
        self.behind_tls_proxy = behind_tls_proxy
        self.headers = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
        if tls or behind_tls_proxy:
            self.headers.append((b"strict-transport-security", b"max-age=31536000"))
        names = {"localhost", socket.gethostname(), socket.getfqdn(), *allowed_hosts}
        self.hosts = {n.lower().removesuffix(".") for n in names if n}

    def host_allowed(self, host: bytes | None) -> bool:
        if host is None:  # HTTP/1.0: no browser sends that
            return True
        text = host.decode("latin-1").strip().lower()
        if text.startswith("["):  # an IPv6 address, maybe with a port, and nothing more
            address, _, rest = text[1:].partition("]")
            port = rest.removeprefix(":")
            return (_is_ip(address) and (rest == "" or rest.startswith(":"))
                    and ((port == "" and rest == "") or (port.isascii() and port.isdigit())))
        name, _, port = text.rpartition(":") if ":" in text else (text, "", "")
        if port and not (port.isascii() and port.isdigit()):
            return False
        return _is_ip(name) or name.removesuffix(".") in self.hosts

    def refusal(self, scope: Scope) -> tuple[str, int] | None:
        """Why the request's head is refused, and the status; None if it is not."""
        headers = scope.get("headers", ())
        size = sum(len(k) + len(v) for k, v in headers)
        if size + len(scope.get("raw_path", b"")) + len(scope.get("query_string", b"")) > (
                MAX_HEAD):
            return "request header fields too large", 431
        fields = dict(headers)
        if b"transfer-encoding" in fields and b"content-length" in fields:
            # RFC 9112 6.3: a proxy in front may frame it by the other one (smuggling)
            return "request with both Content-Length and Transfer-Encoding", 400
        if not self.host_allowed(fields.get(b"host")):
            return ("unknown host name in the Host header (a name of this dashboard goes in "
                    "[web] allowed_hosts)", 400)
        length = fields.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return "request body too large", 413
        return None

    def as_the_client_sees_it(self, scope: Scope) -> None:
        """Behind a TLS proxy the scheme is https (so redirects stay on it); from a
        trusted proxy the client is the one it names."""
        if self.behind_tls_proxy:
            scope["scheme"] = "https"
        if self.trusted and scope.get("client"):
            scope["client"] = forwarded_client(scope, self.trusted)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *self.headers]
            await send(message)

        refused = self.refusal(scope)
        self.as_the_client_sees_it(scope)
        if refused is None:
            try:
                body: Message | None = await _whole_body(receive)
            except _Refused as e:
                refused = e.args
            else:
                if body is None:  # the peer went away
                    return
        if refused is not None:  # and the connection closed: what follows is not trusted
            await PlainTextResponse(*refused, headers={"connection": "close"})(
                scope, receive, send_with_headers)
            return

        async def replay() -> Message:
            nonlocal body
            if body is not None:
                message, body = body, None
                return message
            return await receive()

        await self.app(scope, replay, send_with_headers)


class _Refused(Exception):
    pass


async def _whole_body(receive: Receive) -> Message | None:
    """The request's body as one message, read within :data:`BODY_SECONDS` and at most
    :data:`MAX_BODY` bytes (:class:`_Refused` with the answer); None if the peer left."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BODY_SECONDS
    chunks: list[bytes] = []
    received, more = 0, True
    while more:
        try:
            message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.001))
        except TimeoutError:
            raise _Refused("request body too slow", 408) from None
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        received += len(chunk)
        if received > MAX_BODY:
            raise _Refused("request body too large", 413)
        chunks.append(chunk)
        more = message.get("more_body", False)
    return {"type": "http.request", "body": b"".join(chunks), "more_body": False}


def forwarded_client(scope: Scope, trusted: Networks) -> tuple[str, int]:
    """The request's client: its peer, or, from a trusted proxy, the last address of
    ``X-Forwarded-For`` that is not a trusted proxy's (the entries before it are the
    client's own word)."""
    peer: tuple[str, int] = tuple(scope["client"])
    if not within(peer[0], trusted):
        return peer
    values = [v.decode("latin-1") for k, v in scope.get("headers", ())
              if k == b"x-forwarded-for"]
    hops = [h.strip() for h in ",".join(values).split(",") if h.strip()]
    for hop in reversed(hops):
        if not _is_ip(hop):
            return peer  # a proxy of ours wrote nonsense: the proxy it is
        if not within(hop, trusted):
            return (hop, 0)
    return peer


def _is_ip(text: str) -> bool:
    if "%" in text:  # a zone id ("fe80::1%eth0"): no browser sends one in a Host
        return False
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _shown(value: Any) -> Any:
    """Jinja's finalize: text is shown with its control and bidirectional characters
    escaped (``\u202e``), as the CLI shows it, so an output cannot reorder the page."""
    if isinstance(value, str) and not hasattr(value, "__html__"):  # not Markup
        return printable(value)
    return value


class Dashboard:
    """The pages, over one database pool and the login state of this process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = Client(settings=settings)
        self.logins = auth.Logins(settings)
        self.sessions = auth.Sessions(settings.web.session_hours * 3600.0)
        self.login_forms = auth.LoginForms()
        self.throttle = auth.Throttle()
        self.secure_cookies = settings.web.tls or settings.web.behind_tls_proxy
        self._db: Database | None = None
        self._cluster: tuple[float, dict[str, Any]] | None = None
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True, undefined=jinja2.StrictUndefined, finalize=_shown)
        self.templates.filters.update(ago=words.ago, when=words.when, secs=words.seconds)

    @property
    def db(self) -> Database:
        if self._db is None:
            self._db = open_db(self.settings)
        return self._db

    def close(self) -> None:
        self.logins.close()
        if self._db is not None:
            self._db.dispose()
            self._db = None

    # -- rendering -----------------------------------------------------------------------

    def page(self, request: Request, name: str, session: auth.Session | None,
             status: int = 200, **context: Any) -> HTMLResponse:
        refreshing = request.headers.get("x-refresh") is not None  # refresh.js: <main> only
        html = self.templates.get_template(name).render(
            session=session, path=request.url.path, version=__version__,
            notice=session.take_notice() if session and not refreshing else "",
            cluster_name=self.settings.cluster.name,
            refresh=self.settings.web.refresh_seconds, now=time.time(), **context)
        return HTMLResponse(html, status)

    def refused(self, request: Request, session: auth.Session | None, message: str,
                status: int) -> HTMLResponse:
        return self.page(request, "error.html", session, status, message=message)

    # -- sessions ------------------------------------------------------------------------

    def same_origin(self, request: Request) -> bool:
        return _same_origin(request, self.settings.web.allowed_hosts)

    def session_of(self, request: Request) -> auth.Session | None:
        return self.sessions.get(request.cookies.get(SESSION_COOKIE))

    def to_login(self, request: Request) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse("/login?" + urllib.parse.urlencode({"next": target}), 303)

    def set_cookie(self, response: Response, name: str, value: str, max_age: int) -> None:
        response.set_cookie(name, value, max_age=max_age, path="/", httponly=True,
                            samesite="strict", secure=self.secure_cookies)

    # -- the pages -----------------------------------------------------------------------

    async def login_page(self, request: Request) -> Response:
        if not self.logins.configured:
            return self.refused(request, None, "No login is configured: add [web] users or "
                                "tokens (qcluster config hash-password makes a hash).", 503)
        cookie = request.cookies.get(LOGIN_COOKIE) or ""
        fresh = len(cookie) < 32 or len(cookie) > 128
        if fresh:
            cookie = self.login_forms.new_cookie()
        response = self.page(request, "login.html", None, form=self.login_forms.token(cookie),
                             next=_safe_next(request.query_params.get("next")), error=None)
        if fresh:
            self.set_cookie(response, LOGIN_COOKIE, cookie, 3600)
        return response

    async def login(self, request: Request) -> Response:
        form = await _form(request)
        cookie = request.cookies.get(LOGIN_COOKIE)
        if not self.same_origin(request) or not self.login_forms.check(cookie, form.get("csrf")):
            return self.refused(request, None, "The login form expired or came from another "
                                "site: open the login page again.", 403)
        name, password, token = (form.get(k, "") for k in ("user", "password", "token"))
        address = request.client.host if request.client else "?"
        limits = auth.login_limits(address, name)
        nxt = _safe_next(form.get("next"))

        def again(message: str, status: int) -> Response:
            assert cookie is not None
            return self.page(request, "login.html", None, status,
                             form=self.login_forms.token(cookie), next=nxt, error=message)

        if token and (name or password):
            return again("Give a user and password, or a token, not both.", 400)
        stamp = self.throttle.reserve(limits)  # counted before the check: see auth.py
        if stamp is None:
            return again(f"Too many failed logins: wait {auth.FAILURE_WINDOW:g} seconds.", 429)
        try:
            who = (await self.logins.check(name, password, token)
                   if token or (name and password and len(name) <= auth.MAX_NAME) else None)
        except auth.Busy:
            self.throttle.succeeded(limits, stamp)  # not checked, so not a failure
            return again("The dashboard is busy checking other logins: try again in a few "
                         "seconds.", 503)
        except ValueError:
            who = None
        if who is None:
            log.warning("dashboard: failed login from %s%s", address,
                        f" as {name[:auth.MAX_NAME]!r}" if name else " by token")
            return again("Wrong user, password or token.", 401)
        self.throttle.succeeded(limits, stamp)
        self.sessions.drop(request.cookies.get(SESSION_COOKIE))
        value, session = self.sessions.create(*who)
        log.info("dashboard: %s (%s) logged in from %s", session.user, session.role, address)
        response = RedirectResponse(nxt, 303)
        self.set_cookie(response, SESSION_COOKIE, value,
                        int(self.settings.web.session_hours * 3600))
        self.set_cookie(response, LOGIN_COOKIE, "", 0)
        return response

    async def logout(self, request: Request) -> Response:
        session = self.session_of(request)
        if session is not None:
            form = await _form(request)
            if not self.same_origin(request) or not auth.same_token(session.csrf,
                                                                form.get("csrf")):
                return self.refused(request, session, "Refused: the form's CSRF token is "
                                    "missing or wrong. Reload the page.", 403)
            self.sessions.drop(request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse("/login", 303)
        self.set_cookie(response, SESSION_COOKIE, "", 0)
        return response

    def cluster_view(self) -> dict[str, Any]:
        """The cluster's state, read at most once a second for all open pages (it asks
        the coordination backends)."""
        now = time.monotonic()
        if self._cluster is not None and now - self._cluster[0] < CLUSTER_CACHE_SECONDS:
            return self._cluster[1]
        state, info, members = snapshot(self.settings, self.db)
        with self.db.read() as conn:
            flight = queries.in_flight(conn)
            tags = queries.job_tags(conn)
        view = {
            "state": state,
            "leader": info,
            "members": [{**reads.member_view(m), "in_flight": flight.get(m.node_id, 0),
                         "tags": tags.get(m.node_id, [])} for m in members],
            "backend": reads.backend_view(state, members),
        }
        self._cluster = (now, view)
        return view

    async def cluster(self, request: Request) -> Response:
        return await self._read(request, lambda s: self.page(
            request, "cluster.html", s, **self.cluster_view()))

    async def jobs(self, request: Request) -> Response:
        params = request.query_params
        search = _search(params.get("q", ""))
        status = params.get("status", "all")
        if status not in queries.JOB_FILTERS:
            status = "all"
        page = _page_number(params.get("page"))

        def render(session: auth.Session) -> Response:
            with self.db.read() as conn:
                found = queries.jobs_page(conn, now=time.time(), search=search,
                                          status=status, offset=(page - 1) * PAGE_SIZE,
                                          limit=PAGE_SIZE)
            for job in found.jobs:
                job["words"] = words.trigger(job["trigger_spec"])
            pages = max(1, math.ceil(found.total / PAGE_SIZE))
            return self.page(request, "jobs.html", session, jobs=found.jobs,
                             total=found.total, search=search, chosen=status,
                             filters=queries.JOB_FILTERS, page=page, pages=pages)

        return await self._read(request, render)

    async def job(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]

        def render(session: auth.Session) -> Response:
            try:
                check_job_id(job_id)
                with self.db.read() as conn:
                    job = catalog.get_job(conn, job_id)
                    runs = queries.job_runs(conn, job_id, 100)
            except InputError:
                return self.refused(request, session, f"There is no job {job_id!r}.", 404)
            job["words"] = words.trigger(job["trigger_spec"])
            return self.page(request, "job.html", session, job=job, runs=runs,
                             policy_fields=POLICY_FIELDS,
                             fires=self._next_fires(job), chart=words.lateness_chart(runs))

        return await self._read(request, render)

    def _next_fires(self, job: Mapping[str, Any]) -> list[datetime]:
        if job["paused"] or job["next_run_time"] is None:
            return []
        start = datetime.fromisoformat(job["next_run_time"].replace("Z", "+00:00"))
        # Ten years on, by days: replace(year=) fails on 29 February (a 500 before).
        end = start + min(timedelta(days=3653), datetime.max.replace(tzinfo=start.tzinfo) - start)
        try:
            return fire_times(job["trigger_spec"], start, end, NEXT_FIRES)
        except (ValueError, OverflowError, QClusterError):
            return [start]

    async def runs(self, request: Request) -> Response:
        params = request.query_params
        wanted = [s for s in params.getlist("status") if s in tuple(RunStatus)]
        statuses = wanted or list(queries.TROUBLE)
        job = _search(params.get("job", ""))

        def render(session: auth.Session) -> Response:
            with self.db.read() as conn:
                runs = queries.runs_page(conn, statuses=statuses, job=job, limit=PAGE_SIZE)
            return self.page(request, "runs.html", session, runs=runs, job=job,
                             statuses=statuses, all_statuses=list(RunStatus),
                             trouble=list(queries.TROUBLE))

        return await self._read(request, render)

    async def run(self, request: Request) -> Response:
        text = request.path_params["run_id"]

        def render(session: auth.Session) -> Response:
            try:
                if not (text.isascii() and text.isdigit()):  # not "٣", "+3" or " 3"
                    raise ValueError(text)
                run_id = bounds.check_int(int(text), "a run id", bounds.RUN_ID)
                with self.db.read() as conn:
                    run = catalog.get_run(conn, run_id)
            except (ValueError, InputError):
                return self.refused(request, session, f"There is no run {text[:40]!r}.", 404)
            return self.page(request, "run.html", session, run=run)

        return await self._read(request, render)

    async def job_action(self, request: Request) -> Response:
        """POST /jobs/action: ``action`` pause, resume or run, for each ``job`` given."""
        session = self.session_of(request)
        if session is None:
            return self.refused(request, None, "Log in first.", 403)
        form = await _form_list(request)
        csrf = form.get("csrf", [""])[0]
        if not self.same_origin(request) or not auth.same_token(session.csrf, csrf):
            return self.refused(request, session, "Refused: the form's CSRF token is missing "
                                "or wrong. Reload the page.", 403)
        if not session.may_change:
            return self.refused(request, session, f"{session.user} is a viewer: only an "
                                "operator may change jobs.", 403)
        action = form.get("action", [""])[0]
        ids = form.get("job", [])
        back = _safe_next(form.get("back", ["/jobs"])[0])
        if action not in ("pause", "resume", "run") or not ids or len(ids) > PAGE_SIZE:
            return self.refused(request, session, "Choose pause, resume or run, and 1 to "
                                f"{PAGE_SIZE} jobs.", 400)
        done, failed = await run_in_threadpool(self._apply, action, ids)
        log.info("dashboard: %s (%s) %s %s", session.user, request.client.host
                 if request.client else "?", action, ", ".join(done) or "-")
        notice = f"{action}: {len(done)} done"
        if failed:
            notice += "; " + "; ".join(failed[:3]) + (" ..." if len(failed) > 3 else "")
        session.notice = notice[:600]  # shown on the next page; never taken from a URL
        return RedirectResponse(back, 303)

    def _apply(self, action: str, ids: list[str]) -> tuple[list[str], list[str]]:
        done: list[str] = []
        failed: list[str] = []
        for job_id in dict.fromkeys(ids):
            try:
                if action == "run":
                    self.client.run(job_id)
                else:
                    getattr(self.client, action)(job_id)
                done.append(job_id)
            except QClusterError as e:
                failed.append(f"{job_id[:80]}: {e}")
        self._cluster = None
        return done, failed

    async def _read(self, request: Request,
                    render: Callable[[auth.Session], Response]) -> Response:
        session = self.session_of(request)
        if session is None:
            return self.to_login(request)
        try:
            return await run_in_threadpool(render, session)
        except QClusterError as e:
            return self.refused(request, session, str(e), 503)


def _search(text: str) -> str:
    """A search box's text, without control characters (PostgreSQL refuses a NUL in a
    string: a 500 before), bounded."""
    return "".join(c for c in text if c >= " " and c != "\x7f")[:MAX_SEARCH]


def _page_number(text: str | None) -> int:
    if text is None or not (text.isascii() and text.isdigit()) or len(text) > 7:
        return 1
    return max(1, int(text))


def _safe_next(target: str | None) -> str:
    """A path on this site to go to after login, else ``/``: never another site's URL."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    parts = urllib.parse.urlsplit(target)
    if parts.scheme or parts.netloc or any(ord(c) < 32 for c in target):
        return "/"
    return target[:2000]


def _same_origin(request: Request, names: tuple[str, ...]) -> bool:
    """False when the browser says the request came from a page of another site: one
    whose origin is neither the ``Host`` asked for nor a name of ``[web] allowed_hosts``
    (a proxy in front may send its own Host)."""
    origin = request.headers.get("origin")
    if origin is None:  # not sent by every browser for a same-origin form: the token decides
        return True
    host = request.headers.get("host", "")
    parts = urllib.parse.urlsplit(origin)
    if parts.scheme not in ("http", "https"):
        return False
    return parts.netloc == host or (parts.hostname or "").lower() in names


async def _form_list(request: Request) -> dict[str, list[str]]:
    body = await request.body()
    if request.headers.get("content-type", "").split(";")[0].strip() != (
            "application/x-www-form-urlencoded"):
        return {}
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return {}
    if text.count("&") >= MAX_FIELDS:  # parse_qs would say only ValueError
        raise HTTPException(413, f"a form has at most {MAX_FIELDS} fields")
    try:
        return urllib.parse.parse_qs(text, max_num_fields=MAX_FIELDS, strict_parsing=False)
    except ValueError:
        return {}


async def _form(request: Request) -> dict[str, str]:
    return {k: v[0] for k, v in (await _form_list(request)).items()}


def build_app(settings: Settings) -> tuple[ASGIApp, Dashboard]:
    """The dashboard's ASGI app, and the object whose pages it serves (to close)."""
    d = Dashboard(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        d.close()

    routes = [
        Route("/login", d.login_page, methods=["GET"]),
        Route("/login", d.login, methods=["POST"]),
        Route("/logout", d.logout, methods=["POST"]),
        Route("/", d.cluster, methods=["GET"]),
        Route("/jobs", d.jobs, methods=["GET"]),
        Route("/jobs/action", d.job_action, methods=["POST"]),
        Route("/jobs/{job_id:path}", d.job, methods=["GET"]),
        Route("/runs", d.runs, methods=["GET"]),
        Route("/runs/{run_id}", d.run, methods=["GET"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={404: _not_found, 405: _not_allowed, 500: _error})
    web = settings.web
    return Guard(app, tls=web.tls, behind_tls_proxy=web.behind_tls_proxy,
                 allowed_hosts=web.allowed_hosts, trusted_proxies=web.trusted_proxies), d


async def _not_found(_request: Request, _exc: Exception) -> Response:
    return PlainTextResponse("not found", 404)


async def _not_allowed(_request: Request, _exc: Exception) -> Response:
    return PlainTextResponse("method not allowed", 405)


async def _error(_request: Request, exc: Exception) -> Response:
    log.error("dashboard: internal error: %s: %s", type(exc).__name__, exc)
    return PlainTextResponse("internal error", 500)

