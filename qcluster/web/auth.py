"""Who may use the dashboard: logins against the hashes of ``[web] users`` and ``tokens``,
server-side sessions, CSRF tokens and a throttle on failed logins.

The constructions are the standard ones (OWASP's session, CSRF and password cheat sheets):

- **Sessions** live in this process only: the cookie is 32 random bytes
  (``secrets.token_urlsafe``), and the store keeps its SHA-256, never the value, so a
  memory dump gives no usable cookie. A session ends ``[web] session_hours`` after login
  or at logout, and a new id is issued at login (no fixation). A restart logs everyone
  out. At most :data:`MAX_SESSIONS` are kept (the oldest go first).
- **CSRF**: each session has its own random token; every change (a POST) must carry it in
  the form, compared in constant time. The login form, before any session, uses the
  signed double-submit pattern: a random pre-login cookie and, in the form, its HMAC
  under a key made at start. Cookies are also ``SameSite=Strict``, and a POST whose
  ``Origin`` is another site is refused whatever it carries.
- **Logins**: scrypt (``settings/passwords.py``); an unknown name is checked against a
  dummy hash, so the time does not tell which names exist. Checks run on a pool of their
  own, :data:`CONCURRENT_CHECKS` at once (each takes 128 MiB), so that a flood of logins
  never holds the threads the pages are read on; beyond :data:`MAX_WAITING_CHECKS`
  waiting, a login is refused at once (503).
- **Throttle** (:class:`Throttle`): an attempt is counted *before* its check, and
  forgotten when it succeeds, so that logins sent in parallel cannot all be checked
  before the first failure counts. In :data:`FAILURE_WINDOW` seconds there may be
  :data:`PAIR_FAILURES` failures for one name from one address, :data:`ADDRESS_FAILURES`
  from one address (a password tried on many names) and :data:`NAME_FAILURES` for one
  name (guessed from many addresses). The right password from another address is not
  locked out by a guesser's 5 failures; locking out a name takes a flood that the log
  shows. Behind a proxy the address is the client's, from ``X-Forwarded-For``, only when
  the peer is one of ``[web] trusted_proxies``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Sequence

from qcluster.peers import client_key
from qcluster.settings import Settings
from qcluster.settings.passwords import dummy_hash, verify

MAX_SESSIONS = 10_000
CONCURRENT_CHECKS = 2
MAX_WAITING_CHECKS = 16
PAIR_FAILURES = 5
ADDRESS_FAILURES = 30
NAME_FAILURES = 100
FAILURE_WINDOW = 60.0
MAX_THROTTLED_KEYS = 50_000
MAX_NAME = 64  # a login name is a Word: longer is refused unchecked

VIEWER = "viewer"
OPERATOR = "operator"


@dataclasses.dataclass
class Session:
    user: str
    role: str
    csrf: str
    expires: float
    notice: str = ""  # shown once, on the next page (what a change did)

    def take_notice(self) -> str:
        notice, self.notice = self.notice, ""
        return notice

    @property
    def may_change(self) -> bool:
        return self.role == OPERATOR


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


class Sessions:
    """The live sessions, by the SHA-256 of their cookie."""

    def __init__(self, lifetime: float) -> None:
        self.lifetime = lifetime
        self._lock = threading.Lock()
        self._by_digest: collections.OrderedDict[str, Session] = collections.OrderedDict()

    def create(self, user: str, role: str) -> tuple[str, Session]:
        cookie = secrets.token_urlsafe(32)
        session = Session(user, role, secrets.token_urlsafe(32),
                          time.monotonic() + self.lifetime)
        with self._lock:
            self._by_digest[_digest(cookie)] = session
            while len(self._by_digest) > MAX_SESSIONS:
                self._by_digest.popitem(last=False)
        return cookie, session

    def get(self, cookie: str | None) -> Session | None:
        if not cookie or len(cookie) > 128:
            return None
        key = _digest(cookie)
        with self._lock:
            session = self._by_digest.get(key)
            if session is not None and session.expires <= time.monotonic():
                del self._by_digest[key]
                return None
            return session

    def drop(self, cookie: str | None) -> None:
        if cookie and len(cookie) <= 128:
            with self._lock:
                self._by_digest.pop(_digest(cookie), None)


class LoginForms:
    """The login form's CSRF token: the HMAC of a random pre-login cookie under a key
    made when the process started (signed double-submit)."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)

    def new_cookie(self) -> str:
        return secrets.token_urlsafe(32)

    def token(self, cookie: str) -> str:
        return hmac.new(self._key, cookie.encode(), hashlib.sha256).hexdigest()

    def check(self, cookie: str | None, token: str | None) -> bool:
        if not cookie or not token or len(cookie) > 128 or len(token) > 128:
            return False
        return hmac.compare_digest(self.token(cookie), token)


def same_token(expected: str, given: str | None) -> bool:
    return given is not None and len(given) <= 128 and hmac.compare_digest(
        expected.encode(), given.encode())


class Busy(Exception):
    """More logins wait for a check than :data:`MAX_WAITING_CHECKS`."""


Limits = Sequence[tuple[str, int]]


def login_limits(address: str, name: str) -> Limits:
    """The throttle's keys and their limits for a login as ``name`` (empty: by token)
    from ``address``."""
    address = client_key(address)
    name = name[:MAX_NAME]
    who = f"user:{name}" if name else "token"
    return ((f"pair:{address}:{who}", PAIR_FAILURES),
            (f"address:{address}", ADDRESS_FAILURES),
            *(((f"user:{name}", NAME_FAILURES),) if name else ()))


class Throttle:
    """Login attempts per key in the last :data:`FAILURE_WINDOW` seconds: :meth:`reserve`
    counts one before it is checked, :meth:`succeeded` forgets it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # By the time of each key's last attempt, oldest first: the keys whose last
        # attempt left the window are at the front, and go (:meth:`_sweep`).
        self._attempts: collections.OrderedDict[str, collections.deque[float]] = (
            collections.OrderedDict())

    def _sweep(self, now: float) -> None:
        while self._attempts:
            times = next(iter(self._attempts.values()))
            if times and times[-1] > now - FAILURE_WINDOW:
                return
            self._attempts.popitem(last=False)

    def _recent(self, key: str, now: float) -> collections.deque[float] | None:
        times = self._attempts.get(key)
        while times and times[0] <= now - FAILURE_WINDOW:
            times.popleft()
        return times

    def reserve(self, limits: Limits) -> float | None:
        """Count an attempt under every key, and return its stamp; None (nothing
        counted) if a key is at its limit."""
        now = time.monotonic()
        with self._lock:
            self._sweep(now)
            if any(len(self._recent(k, now) or ()) >= limit for k, limit in limits):
                return None
            for k, _limit in limits:
                self._attempts.setdefault(k, collections.deque()).append(now)
                self._attempts.move_to_end(k)
            while len(self._attempts) > MAX_THROTTLED_KEYS:  # the least recent go first
                self._attempts.popitem(last=False)
        return now

    def succeeded(self, limits: Limits, stamp: float) -> None:
        """Forget the attempt :meth:`reserve` stamped: it was not a failure."""
        with self._lock:
            for k, _limit in limits:
                times = self._attempts.get(k)
                if times is not None and stamp in times:
                    times.remove(stamp)


class Logins:
    """Checks a user/password or a token against the config's hashes."""

    def __init__(self, settings: Settings) -> None:
        web = settings.web
        self._users = {u.name: (u.password_hash, u.role) for u in web.users}
        self._tokens: list[tuple[str, str, str]] = [(t.name, t.token_hash, t.role)
                                                    for t in web.tokens]
        hashes = [u.password_hash for u in web.users] + [t.token_hash for t in web.tokens]
        self._dummy = dummy_hash(hashes[0] if hashes else None)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            CONCURRENT_CHECKS, thread_name_prefix="qc-web-login")
        self._waiting = 0  # checks running or waiting; changed on the event loop only

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def configured(self) -> bool:
        return bool(self._users or self._tokens)

    async def check(self, name: str, password: str, token: str) -> tuple[str, str] | None:
        """(name, role) for a login by ``token``, else by ``name`` and ``password``; None
        if it is wrong. Checked on this object's own pool; :class:`Busy` when too many
        already wait."""
        if self._waiting >= CONCURRENT_CHECKS + MAX_WAITING_CHECKS:
            raise Busy
        self._waiting += 1
        try:
            loop = asyncio.get_running_loop()
            if token:
                return await loop.run_in_executor(self._pool, self.token, token)
            return await loop.run_in_executor(self._pool, self.user, name, password)
        finally:
            self._waiting -= 1

    def user(self, name: str, password: str) -> tuple[str, str] | None:
        """(name, role) if ``password`` is ``name``'s, else None."""
        stored, role = self._users.get(name, (self._dummy, ""))
        ok = verify(password, stored)
        return (name, role) if ok and role else None

    def token(self, token: str) -> tuple[str, str] | None:
        """(name, role) of the token's entry, else None. Every entry is checked, so the
        time does not tell how far down the list a token matched."""
        found = None
        for name, stored, role in self._tokens or [("", self._dummy, "")]:
            if verify(token, stored) and role and found is None:
                found = (name, role)
        return found
