"""The dashboard's access control and bad input, over real HTTP to a real uvicorn server
(issue 17, item 4): every page asks for a login, changes need the operator role and the
session's CSRF token, failed logins are throttled, and a slow or huge peer is dropped
without stalling anyone else."""

from __future__ import annotations

import concurrent.futures
import contextlib
import socket
import threading
import time

import pytest

from qcluster.client.api import Client as Api
from qcluster.web import auth
from qcluster.web import server as web_server
from qcluster.web.app import MAX_FIELDS, SECURITY_HEADERS, SESSION_COOKIE
from tests.helpers import closed_by_peer, wait_for
from tests.web.conftest import PASSWORD, TOKEN, Served, serving, web_settings

PAGES = ["/", "/jobs", "/jobs/tick", "/runs", "/runs/1", "/runs?status=failed"]


def add_tick(served: Served) -> Api:
    api = Api(settings=served.settings)
    api.add("tick", "jobs.builtin:noop", every="1h")
    return api


def test_without_a_login_every_page_redirects_to_it_and_every_change_is_refused(
        served: Served) -> None:
    api = add_tick(served)
    c = served.client()
    for path in PAGES:
        r = c.get(path)
        assert r.status == 303, path
        assert r.location.startswith("/login?next="), (path, r.location)
    r = c.post("/jobs/action", {"action": "pause", "job": "tick", "csrf": "x"})
    assert r.status == 403
    r = c.post("/logout", {})
    assert r.status == 303 and c.get("/jobs").status == 303
    assert api.show("tick")["paused"] is False


def test_a_login_sets_a_strict_httponly_session_cookie_and_goes_where_it_was_asked(
        served: Served) -> None:
    c = served.client()
    r = c.login()
    assert r.status == 303 and r.location == "/jobs"
    [cookie] = [c for c in r.set_cookies if c.startswith(SESSION_COOKIE + "=")]
    assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
    assert "Secure" not in cookie  # plain HTTP on loopback: a Secure one is not sent back
    page = c.get("/jobs")
    assert page.status == 200 and 'id="user">ops<' in page.body
    for path in PAGES[:4]:
        assert c.get(path).status in (200, 404), path


def test_wrong_passwords_unknown_users_and_bad_tokens_are_refused(served: Served) -> None:
    for user, password in [("ops", "wrong password"), ("nobody", PASSWORD), ("ops", "")]:
        c = served.client()
        r = c.login(user, password)
        assert r.status == 401 and "Wrong user, password or token" in r.body, user
        assert SESSION_COOKIE not in c.cookies
        assert c.get("/jobs").status == 303
    c = served.client()
    page = c.get("/login")
    r = c.post("/login", {"csrf": page.field("csrf"), "token": "not-the-token"})
    assert r.status == 401 and SESSION_COOKIE not in c.cookies
    r = c.post("/login", {"csrf": page.field("csrf"), "token": TOKEN})
    assert r.status == 303 and SESSION_COOKIE in c.cookies
    assert 'id="user">robot<' in c.get("/jobs").body


def test_failed_logins_are_throttled_per_address_and_name(served: Served) -> None:
    c = served.client()
    for _ in range(auth.PAIR_FAILURES):
        assert c.login("ops", "wrong password").status == 401
    r = c.login("ops", PASSWORD)  # the right one too, from there, until the window passed
    assert r.status == 429 and "Too many failed logins" in r.body
    assert SESSION_COOKIE not in c.cookies
    # A guesser's failures do not lock the name out for everyone: ops, from another
    # address, logs in; and the guesser's address may still log in as another name.
    other = served.client("127.0.0.2")
    assert other.login("ops", PASSWORD).status == 303
    assert served.client().login("viewer", PASSWORD).status == 303


def test_the_throttle_counts_parallel_logins_before_their_checks(
        served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    """200 wrong passwords sent at once were all checked (the failure was counted after
    the check): now an attempt is counted before, so at most PAIR_FAILURES of the 14 sent
    at once are checked, while a page is still served to a user logged in before."""
    reader = served.client("127.0.0.3")
    reader.login()
    release = threading.Event()
    checked: list[str] = []
    running = [0, 0]  # now, most at once
    lock = threading.Lock()

    def slow_verify(password: str, stored: str) -> bool:
        with lock:
            checked.append(password)
            running[0] += 1
            running[1] = max(running)
        release.wait(30)
        with lock:
            running[0] -= 1
        return False

    monkeypatch.setattr(auth, "verify", slow_verify)
    n = web_server.MAX_PER_ADDRESS - 2  # at once from one address: under its cap
    clients = [served.client() for _ in range(n)]
    forms = [c.get("/login").field("csrf") for c in clients]

    def attempt(i: int) -> int:
        return clients[i].post("/login", {"csrf": forms[i], "user": "ops",
                                          "password": f"guess {i}"}).status

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        statuses = pool.map(attempt, range(n))
        wait_for(lambda: len(checked) >= auth.CONCURRENT_CHECKS, 10, what="checks")
        # Every check is held, yet the pages are read: they do not wait for the checks.
        assert reader.get("/jobs").status == 200
        release.set()
        counted = sorted(statuses)
    assert counted.count(401) == auth.PAIR_FAILURES, counted
    assert counted.count(429) == n - auth.PAIR_FAILURES, counted
    assert len(checked) == auth.PAIR_FAILURES and running[1] <= auth.CONCURRENT_CHECKS


def test_logins_beyond_the_waiting_checks_are_refused_at_once(
        served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    monkeypatch.setattr(auth, "verify", lambda _p, _s: release.wait(30) and False)
    count = auth.CONCURRENT_CHECKS + auth.MAX_WAITING_CHECKS + 6
    # One name each, from addresses of their own: no throttle stops them first.
    clients = [served.client(f"127.0.1.{i + 1}") for i in range(count)]
    forms = [c.get("/login").field("csrf") for c in clients]

    def attempt(i: int) -> int:
        return clients[i].post("/login", {"csrf": forms[i], "user": f"u{i}",
                                          "password": "guess"}).status

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(attempt, i) for i in range(count)]
        # While every check is held, those beyond the running and waiting ones are
        # answered at once.
        wait_for(lambda: sum(f.done() for f in futures) >= 6, 20, what="refusals")
        assert all(f.result() == 503 for f in futures if f.done())
        release.set()
        statuses = sorted(f.result(30) for f in futures)
    assert statuses == [401] * (count - 6) + [503] * 6, statuses


def test_the_login_form_needs_its_csrf_token_and_our_origin(served: Served) -> None:
    c = served.client()
    page = c.get("/login")
    r = c.post("/login", {"user": "ops", "password": PASSWORD})
    assert r.status == 403 and SESSION_COOKIE not in c.cookies
    r = c.post("/login", {"csrf": page.field("csrf"), "user": "ops", "password": PASSWORD},
               headers={"Origin": "https://evil.example"})
    assert r.status == 403 and SESSION_COOKIE not in c.cookies
    other = served.client()  # another browser's cookie, this one's token: refused
    other.get("/login")
    c.cookies["qc_login"] = other.cookies["qc_login"]
    r = c.post("/login", {"csrf": page.field("csrf"), "user": "ops", "password": PASSWORD})
    assert r.status == 403


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example/",
                                    "/\\evil.example", "javascript:alert(1)", "jobs"])
def test_after_login_it_never_goes_to_another_site(served: Served, target: str) -> None:
    c = served.client()
    page = c.get("/login")
    r = c.post("/login", {"csrf": page.field("csrf"), "user": "ops", "password": PASSWORD,
                          "next": target})
    assert r.status == 303 and r.location == "/"


def test_a_change_needs_the_sessions_csrf_token_and_our_origin(served: Served) -> None:
    api = add_tick(served)
    c = served.client()
    c.login()
    for form, headers in [
        ({"action": "pause", "job": "tick"}, {}),
        ({"action": "pause", "job": "tick", "csrf": "forged"}, {}),
        ({"action": "pause", "job": "tick", "csrf": c.csrf()}, {"Origin": "http://evil"}),
        ({"action": "pause", "job": "tick", "csrf": c.csrf()}, {"Origin": "null"}),
    ]:
        r = c.post("/jobs/action", form, headers=headers)
        assert r.status == 403 and "CSRF" in r.body, (form, headers)
    assert api.show("tick")["paused"] is False
    r = c.post("/jobs/action", {"action": "pause", "job": "tick", "csrf": c.csrf(),
                                "back": "/jobs"})
    assert r.status == 303 and r.location == "/jobs"
    assert api.show("tick")["paused"] is True
    assert "pause: 1 done" in c.get(r.location).body
    r = c.post("/jobs/action", {"action": "resume", "job": "tick", "csrf": c.csrf()})
    assert r.status == 303 and api.show("tick")["paused"] is False


def test_a_viewer_reads_but_cannot_change(served: Served) -> None:
    api = add_tick(served)
    c = served.client()
    c.login("viewer")
    page = c.get("/jobs")
    assert page.status == 200 and "tick" in page.body
    assert 'name="job"' not in page.body and "bulk-pause" not in page.body
    r = c.post("/jobs/action", {"action": "pause", "job": "tick", "csrf": c.csrf()})
    assert r.status == 403 and "viewer" in r.body
    assert api.show("tick")["paused"] is False


def test_bad_actions_and_unknown_jobs_are_refused_in_one_line(served: Served) -> None:
    api = add_tick(served)
    c = served.client()
    c.login()
    token = c.csrf()
    assert c.post("/jobs/action", {"action": "remove", "job": "tick",
                                   "csrf": token}).status == 400
    assert c.post("/jobs/action", {"action": "pause", "csrf": token}).status == 400
    many = [f"j{i}" for i in range(101)]
    assert c.post("/jobs/action", {"action": "pause", "job": many,
                                   "csrf": token}).status == 400
    r = c.post("/jobs/action", {"action": "pause", "job": ["tick", "nope"], "csrf": token})
    assert r.status == 303
    notice = c.get(r.location).body
    assert "pause: 1 done" in notice and "nope" in notice
    assert api.show("tick")["paused"] is True
    # Not a form at all, or a form that is not UTF-8: nothing is done.
    r = c.request("POST", "/jobs/action", body=b"\xff\xfe", headers={
        "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 403


@pytest.mark.parametrize("path", ["/runs/abc", "/runs/99999999999999999999999", "/runs/-1",
                                  "/jobs/no-such-job", "/jobs/%00", "/nowhere",
                                  "/static/../app.py"])
def test_unknown_pages_are_404_without_a_traceback(served: Served, path: str) -> None:
    c = served.client()
    c.login()
    r = c.get(path)
    assert r.status == 404, (path, r.status)
    assert "Traceback" not in r.body and "File \"" not in r.body


def test_odd_query_parameters_fall_back_to_the_defaults(served: Served) -> None:
    add_tick(served)
    c = served.client()
    c.login()
    for query in ["page=-1", "page=99999999999999", "status=bogus", "q=" + "%" * 500,
                  "q=%25", "q=_", "status=failing&q=ti"]:
        r = c.get(f"/jobs?{query}")
        assert r.status == 200, query
    assert "tick" not in c.get("/jobs?q=%25").body.split("<tbody>")[1].split("</tbody>")[0]
    assert c.get("/runs?status=nonsense&job=%27%3B--").status == 200
    # A superscript two is a digit to str.isdigit, not to int (a 500 before); a NUL is
    # refused by PostgreSQL (a 500) and is dropped from the search.
    for path in ["/jobs?page=%C2%B2", "/jobs?q=%00", "/runs?job=%00ti", "/jobs?q=ti%00ck"]:
        assert c.get(path).status == 200, path
    assert "tick" in c.get("/jobs?q=ti%00ck").body


def test_every_response_carries_the_security_headers(served: Served) -> None:
    c = served.client()
    responses = [c.get("/login"), c.get("/jobs"), c.get("/nowhere"),
                 c.get("/static/style.css")]
    c.login()
    responses += [c.get("/"), c.get("/jobs"), c.get("/runs")]
    for r in responses:
        for name, value in SECURITY_HEADERS.items():
            assert r.headers.get(name) == value, (name, r.status)
        assert "server" not in r.headers
    assert "<script" in c.get("/jobs").body and "onclick" not in c.get("/jobs").body


def test_a_huge_body_is_refused_before_it_is_read(served: Served) -> None:
    c = served.client()
    c.login()
    r = c.request("POST", "/jobs/action", body=b"a=" + b"x" * (65 * 1024),
                  headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 413
    r = c.request("POST", "/login", headers={"Content-Length": "999999999999",
                                             "Content-Type": "text/plain"}, body=b"")
    assert r.status == 413


def test_a_silent_peer_is_dropped_and_stalls_nobody(served: Served,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(web_server, "HEAD_SECONDS", 1.0)
    silent = [socket.create_connection(("127.0.0.1", served.port))
              for _ in range(web_server.MAX_PER_ADDRESS - 4)]
    half = socket.create_connection(("127.0.0.1", served.port))
    half.sendall(b"GET /jobs HTTP/1.1\r\nHost: x\r\n")  # never ends its head
    try:
        started = time.monotonic()
        assert served.client().get("/login").status == 200  # served meanwhile
        assert time.monotonic() - started < 5
        for s in [*silent, half]:  # each closed by the server, within its head's time
            s.settimeout(10)
            assert s.recv(65536) == b""
        assert time.monotonic() - started < 8
    finally:
        for s in [*silent, half]:
            s.close()


def test_logout_ends_the_session_on_the_server(served: Served) -> None:
    c = served.client()
    c.login()
    cookie = c.cookies[SESSION_COOKIE]
    token = c.csrf()
    assert c.post("/logout", {}).status == 403  # without the token: refused
    assert c.get("/jobs").status == 200
    assert c.post("/logout", {"csrf": token}).status == 303
    replay = served.client()
    replay.cookies[SESSION_COOKIE] = cookie  # the old cookie, kept by an attacker
    assert replay.get("/jobs").status == 303


@pytest.mark.parametrize("cap", [1, 500])
def test_the_runs_search_finds_the_same_runs_by_job_ids_or_beyond_the_cap_by_like(
        served: Served, monkeypatch: pytest.MonkeyPatch, cap: int) -> None:

    from qcluster.store import schema
    from qcluster.web import queries

    api = Api(settings=served.settings)
    for job_id in ("tick-a", "tick-b", "other"):
        api.add(job_id, "jobs.builtin:noop", every="1h")
    engine = served.server.dashboard.db.engine
    rows = [{"job_id": job_id, "scheduled_at": 1000.0 + i, "func": "jobs.builtin:noop",
             "args": "[]", "kwargs": "{}", "status": "failed", "epoch": 1, "leader": "n1",
             "created_at": 1000.0}
            for i, job_id in enumerate(["tick-a", "tick-b", "other", "tick-gone"])]
    with engine.begin() as conn:
        conn.execute(schema.runs.insert(), rows)
    monkeypatch.setattr(queries, "MAX_MATCHED_JOBS", cap)
    with engine.connect() as conn:
        def found(job: str) -> list[str]:
            return [r["job_id"] for r in queries.runs_page(conn, statuses=["failed"],
                                                           job=job)]
        # 2 stored jobs match "tick": beyond a cap of 1 the LIKE on the runs finds the
        # removed job's run too; under the cap, the stored jobs' runs alone.
        assert found("tick") == (["tick-gone", "tick-b", "tick-a"] if cap == 1
                                 else ["tick-b", "tick-a"])
        assert found("tick-gone") == ["tick-gone"]  # a removed job, by its whole id
        assert found("other") == ["other"] and found("nothing") == []


def test_behind_a_trusted_proxy_logins_are_throttled_per_client(sqlite_url: str) -> None:
    settings = web_settings(sqlite_url, trusted_proxies=["127.0.0.1"])
    with serving(settings) as served:
        guesser = {"X-Forwarded-For": "203.0.113.7"}
        c = served.client()
        for _ in range(auth.PAIR_FAILURES):
            page = c.get("/login")
            assert c.post("/login", {"csrf": page.field("csrf"), "user": "ops",
                                     "password": "wrong"}, headers=guesser).status == 401
        page = c.get("/login")
        assert c.post("/login", {"csrf": page.field("csrf"), "user": "ops",
                                 "password": PASSWORD}, headers=guesser).status == 429
        # Another client behind the same proxy is not the guesser.
        ops = served.client()
        page = ops.get("/login")
        assert ops.post("/login", {"csrf": page.field("csrf"), "user": "ops",
                                   "password": PASSWORD},
                        headers={"X-Forwarded-For": "198.51.100.2"}).status == 303
        # A peer that is not a trusted proxy cannot pick its address by the header.
        liar = served.client("127.0.0.2")
        for i in range(auth.PAIR_FAILURES):
            page = liar.get("/login")
            assert liar.post("/login", {"csrf": page.field("csrf"), "user": "ops",
                                        "password": "wrong"},
                             headers={"X-Forwarded-For": f"192.0.2.{i}"}).status == 401
        page = liar.get("/login")
        assert liar.post("/login", {"csrf": page.field("csrf"), "user": "ops",
                                    "password": PASSWORD}).status == 429


@pytest.mark.parametrize(("host", "status"), [
    ("evil.example", 400), ("evil.example:{port}", 400), ("127.0.0.1.nip.io", 400),
    ("localhost.evil.example", 400), ("127.0.0.1:{port}", 200), ("localhost:{port}", 200),
    ("[::1]:{port}", 200), ("LOCALHOST", 200), ("dash.example.org", 200),
    ("dash.example.org:443", 200), ("127.0.0.1:x", 400), ("[::1]evil.example", 400),
    ("[::1]:80evil", 400), ("[::1]", 200), ("[::1%evil.example]", 400),
    ("[fe80::1%25evil.example]", 400)])
def test_a_host_header_of_a_name_not_ours_is_refused(sqlite_url: str, host: str,
                                                     status: int) -> None:
    """DNS rebinding: a page of evil.example whose name now points at 127.0.0.1 sends
    ``Host: evil.example``; it gets no login page to post to."""
    with serving(web_settings(sqlite_url, allowed_hosts=["dash.example.org"])) as served:
        r = served.client().get("/login", headers={"Host": host.format(port=served.port)})
        assert r.status == status, (host, r.body)
        if status == 400:
            assert "allowed_hosts" in r.body and "csrf" not in r.body


def test_a_huge_head_a_chunked_huge_body_and_too_many_fields_are_refused(
        served: Served) -> None:
    c = served.client()
    c.login()
    r = c.get("/jobs", headers={"X-Padding": "x" * 100_000})
    assert r.status == 431
    # Chunked (no Content-Length): counted as it comes, and refused before the app.
    conn = socket.create_connection(("127.0.0.1", served.port), timeout=10)
    try:
        conn.sendall(f"POST /jobs/action HTTP/1.1\r\nHost: 127.0.0.1:{served.port}\r\n"
                     "Content-Type: application/x-www-form-urlencoded\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b"a" * 16384
        with contextlib.suppress(OSError):  # the server may close before all is sent
            for _ in range(6):
                conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            conn.sendall(b"0\r\n\r\n")
        head = conn.recv(65536).decode()
    finally:
        conn.close()
    assert head.startswith("HTTP/1.1 413"), head[:200]
    form = {f"f{i}": "1" for i in range(MAX_FIELDS + 5)}
    form.update(action="pause", job="tick", csrf=c.csrf())
    r = c.post("/jobs/action", form)
    assert r.status == 413 and "fields" in r.body and "CSRF" not in r.body


def test_a_notice_is_the_sessions_own_and_shown_once(served: Served) -> None:
    api = add_tick(served)
    c = served.client()
    c.login()
    assert "Call +1" not in c.get("/jobs?notice=Call+%2B1+555+0100").body  # not from a URL
    r = c.post("/jobs/action", {"action": "pause", "job": "tick", "csrf": c.csrf(),
                                "back": "/jobs/tick"})
    assert r.status == 303 and r.location == "/jobs/tick"
    assert api.show("tick")["paused"] is True
    assert 'id="notice">pause: 1 done<' in c.get("/jobs/tick").body
    assert 'id="notice"' not in c.get("/jobs/tick").body  # once
    other = served.client()
    other.login()
    assert 'id="notice"' not in other.get("/jobs").body


def test_control_and_bidi_characters_are_shown_escaped(served: Served) -> None:
    c = served.client()
    c.login()
    body = c.get("/jobs?q=abc%E2%80%AEfed").body  # U+202E, RIGHT-TO-LEFT OVERRIDE
    assert "\u202e" not in body and "abc\\u202efed" in body


def test_one_address_cannot_hold_every_connection(served: Served,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(web_server, "HEAD_SECONDS", 60.0)
    held = [socket.create_connection(("127.0.0.1", served.port))
            for _ in range(web_server.MAX_PER_ADDRESS + 8)]
    try:
        assert closed_by_peer(held) == 8  # the ones beyond the address's share, at once
        assert served.client("127.0.0.2").get("/login").status == 200
    finally:
        for s in held:
            s.close()
    wait_for(lambda: served.client().get("/login").status == 200, 10, what="room again")


def test_a_second_request_head_trickled_in_is_cut(served: Served,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(web_server, "HEAD_SECONDS", 1.0)
    conn = socket.create_connection(("127.0.0.1", served.port), timeout=10)
    try:
        conn.sendall(f"GET /login HTTP/1.1\r\nHost: 127.0.0.1:{served.port}\r\n\r\n"
                     .encode())
        assert conn.recv(65536).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        with contextlib.suppress(OSError):
            for _ in range(40):  # a byte every 0.25 s: the keep-alive timer never fires
                conn.sendall(b"X")
                time.sleep(0.25)
        assert time.monotonic() - started < 9  # cut at HEAD_SECONDS (1 s), not after 10
    finally:
        conn.close()


@pytest.mark.parametrize(("header", "client"), [
    (None, "10.0.0.5"), ("203.0.113.7", "203.0.113.7"),
    ("198.51.100.1, 203.0.113.7", "203.0.113.7"),  # the first is the client's own word
    ("203.0.113.7, 10.0.0.9", "203.0.113.7"),  # a second proxy of ours in between
    ("not-an-address", "10.0.0.5"), ("10.0.0.8", "10.0.0.5")])
def test_the_client_behind_trusted_proxies_is_the_last_untrusted_hop(
        header: str | None, client: str) -> None:
    from qcluster.peers import trusted_networks
    from qcluster.web.app import forwarded_client

    headers = [] if header is None else [(b"x-forwarded-for", header.encode())]
    trusted = trusted_networks(("10.0.0.0/24",))
    assert forwarded_client({"client": ("10.0.0.5", 4000), "headers": headers},
                            trusted)[0] == client
    assert forwarded_client({"client": ("192.0.2.1", 4000), "headers": headers},
                            trusted)[0] == "192.0.2.1"  # not a proxy of ours: ignored



@pytest.mark.parametrize("cron", ["0 0 29 2 *", "0 20 28 2 *"])
def test_a_job_whose_next_fire_is_on_29_february_shows(served: Served, cron: str) -> None:
    """Ten years on by replace(year=) fails on 29 February: the job's page was a 500."""
    api = Api(settings=served.settings)
    api.add("leap", "jobs.builtin:noop", cron=cron, tz="America/New_York")
    api.add("leap-at", "jobs.builtin:noop", at="2028-02-29T12:00:00Z")
    c = served.client()
    c.login()
    for job in ("leap", "leap-at"):
        r = c.get(f"/jobs/{job}")
        assert r.status == 200 and "-02-29" in r.body, (job, r.status)


def test_the_throttle_forgets_old_keys_and_stays_bounded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "MAX_THROTTLED_KEYS", 50)
    throttle = auth.Throttle()
    for i in range(500):
        assert throttle.reserve(auth.login_limits(f"10.0.{i // 250}.{i % 250}", f"u{i}"))
    assert len(throttle._attempts) <= 50  # the least recent went
    monkeypatch.setattr(auth, "FAILURE_WINDOW", 0.05)
    time.sleep(0.1)
    throttle.reserve(auth.login_limits("10.9.9.9", "late"))
    assert len(throttle._attempts) == 3  # the window passed: only the new attempt's keys
    keys = auth.login_limits("::1", "x" * 60_000)
    assert all(len(k) < 200 for k, _ in keys)


@pytest.mark.parametrize(("address", "key"), [
    ("2001:db8::1", "2001:db8::/64"), ("2001:DB8:0::1", "2001:db8::/64"),
    ("2001:db8::ffff:1", "2001:db8::/64"), ("::ffff:192.0.2.1", "192.0.2.1"),
    ("192.0.2.1", "192.0.2.1"), ("not an address", "not an address")])
def test_every_spelling_of_an_address_and_every_address_of_a_64_counts_as_one(
        address: str, key: str) -> None:
    from qcluster.peers import client_key

    assert client_key(address) == key


def test_a_login_with_a_huge_name_is_refused_unchecked(
        served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    checked: list[str] = []
    monkeypatch.setattr(auth, "verify", lambda p, s: checked.append(p) or False)
    c = served.client()
    assert c.login("x" * 60_000, "some password").status == 401
    assert checked == []


def test_content_length_with_transfer_encoding_is_refused_and_the_connection_closed(
        served: Served) -> None:
    conn = socket.create_connection(("127.0.0.1", served.port), timeout=10)
    try:
        conn.sendall(f"POST /login HTTP/1.1\r\nHost: 127.0.0.1:{served.port}\r\n"
                     "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                     f"GET /static/style.css HTTP/1.1\r\nHost: 127.0.0.1:{served.port}\r\n"
                     "\r\n".encode())
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    finally:
        conn.close()
    assert answer.startswith(b"HTTP/1.1 400") and answer.count(b"HTTP/1.1") == 1, answer[:300]


def test_behind_a_tls_proxy_hsts_is_sent_and_redirects_stay_on_https(
        sqlite_url: str) -> None:
    with serving(web_settings(sqlite_url, behind_tls_proxy=True)) as served:
        r = served.client().get("/static")
        assert r.headers.get("strict-transport-security") == "max-age=31536000"
        assert r.status in (301, 307, 308) and r.location.startswith("https://"), r.location


def test_a_proxy_that_sends_its_own_host_lets_the_public_origin_log_in(
        sqlite_url: str) -> None:
    settings = web_settings(sqlite_url, allowed_hosts=["qc.example.com"])
    with serving(settings) as served:
        c = served.client()
        page = c.get("/login")
        form = {"csrf": page.field("csrf"), "user": "ops", "password": PASSWORD}
        assert c.post("/login", form, headers={"Origin": "https://evil.example"}).status == 403
        r = c.post("/login", form, headers={"Origin": "https://qc.example.com"})
        assert r.status == 303 and SESSION_COOKIE in c.cookies
