"""URLs that may carry a password: the one redactor, and :class:`SecretURL`.

:func:`redact_url` is what every log line, error message, listing and ``repr`` shows of a
database or Redis URL, and :func:`redact_text` what every database-driver message shown to
a user goes through. They work on the text, without parsing the URL as any one driver
would, and hide whatever any of them could take for a password:

- the password of the user info: everything from the first ``:`` of the user info (the
  user name holds no ``:`` or ``/``, as SQLAlchemy reads it) to the *last* ``@`` of the
  URL that is not inside a hidden parameter value (``?sslpassword=a@b``). So a ``/``,
  ``?``, ``#`` or ``@`` written unencoded in a password is hidden too.
  (A URL with an ``@`` in a query value and a user info or port shows less than it could:
  ``u:pw@host/db?application_name=a@b`` is shown ``u:***@b``; hiding too much is the safe
  side of an ambiguity that drivers resolve differently);
- the value of every query parameter named like a password: percent-decoded and in any
  case, ``pass``, ``pwd``, ``key``, a name that contains ``password``, ``passwd``,
  ``secret`` or ``token``, or ends in ``_key`` or ``apikey`` (``sslpassword``,
  ``access_token``, not ``sslkey``, which is a path): up to the next ``&``, so a ``#``,
  ``@`` or ``;`` in it is hidden too.

Everything else is shown as written: the user name, IPv6 hosts in brackets, ports, the
database, other parameters (``sslkey`` and ``sslrootcert`` paths), so that an error still
says which server it is about. A string without ``://`` is shown as it is.

A driver reports what it understood of a URL, and a password with an unencoded ``@``
makes SQLAlchemy take part of it for the host ("failed to resolve host 'ss#w'"). So
:func:`redact_text` also hides every piece of the URL's passwords (:func:`url_secrets`)
wherever it appears in the message, and any URL or ``password=...`` pair in it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote, unquote_plus

from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema

from qcluster.settings.text import toml_type

_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_QUERY_KEY_RE = re.compile(r"[?&;]([^=&;?]*)=")
_PASSWORD_KEYS = frozenset({"pass", "pwd", "key"})
_PASSWORD_PARTS = ("password", "passwd", "secret", "token")
_PASSWORD_ENDS = ("_key", "-key", "apikey")
HIDDEN = "***"
#: A URL inside a message: up to a space or a quote.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
#: ``key=value`` in a message (libpq's conninfo: ``password=x``, ``password='a b'``).
_PAIR_RE = re.compile(
    r"""([A-Za-z_][\w.-]*)(\s*=\s*)('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^\s,;&)]+)""")
_PIECE_SPLIT = re.compile(r"([@#?/&:;=])")
MIN_PIECE = 3  # shorter pieces of a password are not hunted in messages (they would hide words)
MAX_PIECES = 24


def redact_url(url: str) -> str:
    """``url`` with its passwords replaced by ``***`` (see the module for the rule)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    for begin, end in reversed(_merged(_hidden_spans(rest))):
        rest = f"{rest[:begin]}{HIDDEN}{rest[end:]}"
    return f"{scheme}://{rest}"


def _hidden_spans(rest: str) -> list[tuple[int, int]]:
    """Where the passwords are in ``rest`` (the URL after ``://``): the value of each
    password parameter, and the user info's password. That one ends at the last ``@``
    that is not inside such a value (``?sslpassword=a@b``), else at the last ``@``."""
    spans = []
    for m in _QUERY_KEY_RE.finditer(rest):
        if _is_password_key(m.group(1)):
            end = rest.find("&", m.end())
            spans.append((m.end(), len(rest) if end < 0 else end))
    ats = [i for i, c in enumerate(rest) if c == "@"]
    outside = [i for i in ats if not any(b <= i < e for b, e in spans)]
    at = (outside or ats or [-1])[-1]
    colon = rest.find(":", 0, at) if at >= 0 else -1
    if colon >= 0 and "/" not in rest[:colon]:  # else no password, or a path
        spans.append((colon + 1, at))  # ("sqlite:////tmp/a@b:c.db" is a path)
    return spans


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``spans`` sorted, overlapping ones joined."""
    out: list[tuple[int, int]] = []
    for begin, end in sorted(spans):
        if out and begin <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((begin, end))
    return out


def _is_password_key(key: str) -> bool:
    name = unquote_plus(key).strip().lower()
    return (name in _PASSWORD_KEYS or any(p in name for p in _PASSWORD_PARTS)
            or name.endswith(_PASSWORD_ENDS))


def url_secrets(url: str) -> list[str]:
    """Every text that a message about ``url`` must not show: each password that
    :func:`redact_url` hides, as written and percent-decoded, and each run of its pieces
    between URL delimiters (``@ # ? / & : ; =``) of at least :data:`MIN_PIECE` characters,
    which is what a driver that split the URL elsewhere may show. Longest first."""
    _, sep, rest = url.partition("://")
    if not sep:
        return []
    spans = _hidden_spans(rest)
    values = [rest[b:e] for b, e in spans + _merged(spans)]
    found: set[str] = set()
    for value in values:
        for text in {value, unquote(value), unquote_plus(value)}:
            found.update(_runs(text))
    return sorted((f for f in found if len(f) >= MIN_PIECE), key=len, reverse=True)


def _runs(text: str) -> Iterable[str]:
    """``text`` and every run of consecutive pieces of it between delimiters."""
    yield text
    parts = _PIECE_SPLIT.split(text)[: 2 * MAX_PIECES]  # pieces at even, delimiters at odd
    for i in range(0, len(parts), 2):
        for j in range(i, len(parts), 2):
            yield "".join(parts[i : j + 1])


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """A driver's (or any) message, as it may be shown: each of ``secrets`` (from
    :func:`url_secrets`) replaced by ``***`` wherever it appears, then every URL in it
    redacted (:func:`redact_url`), then the value of every ``key=value`` pair whose key is
    named like a password."""
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, HIDDEN)
    text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group()), text)
    return _PAIR_RE.sub(
        lambda m: m.group(1) + m.group(2) + HIDDEN if _is_password_key(m.group(1))
        else m.group(), text)


class SecretURL:
    """A URL that may carry a password. ``str``/``repr``/serialisation show it redacted."""

    __slots__ = ("_url",)

    def __init__(self, url: str) -> None:
        self._url = url

    def get_secret_value(self) -> str:
        """The whole URL, password included. Give it to a driver, never to a log."""
        return self._url

    @property
    def scheme(self) -> str:
        """The lower-cased scheme (``postgresql+psycopg``), or "" when not a URL."""
        m = _SCHEME_RE.match(self._url)
        return m.group(1).lower() if m else ""

    @property
    def has_password(self) -> bool:
        return redact_url(self._url) != self._url

    def __str__(self) -> str:
        return redact_url(self._url)

    def __repr__(self) -> str:
        return f"SecretURL({redact_url(self._url)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretURL) and other._url == self._url

    def __hash__(self) -> int:
        return hash(self._url)

    @classmethod
    def _coerce(cls, value: object) -> SecretURL:
        if isinstance(value, SecretURL):
            return value
        if isinstance(value, str) and value:
            return cls(value)
        raise ValueError(f"must be a non-empty URL string (got {toml_type(value)})")

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls._coerce, serialization=core_schema.plain_serializer_function_ser_schema(str)
        )

