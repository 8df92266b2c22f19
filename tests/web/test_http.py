"""The dashboard's access control and bad input, over real HTTP to a real uvicorn server
(issue 17, item 4): every page asks for a login, changes need the operator role and the
session's CSRF token, failed logins are throttled, and a slow or huge peer is dropped
without stalling anyone else."""

from __future__ import annotations

import socket
import time

import pytest

from qcluster.client.api import Client as Api
from qcluster.web import server as web_server
from qcluster.web.app import SECURITY_HEADERS, SESSION_COOKIE
from tests.web.conftest import PASSWORD, TOKEN, Served

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


def test_failed_logins_are_throttled_per_address(served: Served) -> None:
    c = served.client()
    for _ in range(5):
        assert c.login("ops", "wrong password").status == 401
    r = c.login("ops", PASSWORD)  # the right one too, until the window has passed
    assert r.status == 429 and "Too many failed logins" in r.body
    assert SESSION_COOKIE not in c.cookies


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
    assert r.status == 303 and r.location.startswith("/jobs?notice=")
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
    silent = [socket.create_connection(("127.0.0.1", served.port)) for _ in range(20)]
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
