"""URLs that may carry a password: the one redactor, and :class:`SecretURL`.

:func:`redact_url` is what every log line, error message, listing and ``repr`` shows of a
database or Redis URL. It works on the text, without parsing the URL as any one driver
would, and hides whatever any of them could take for a password:

- the password of the user info: everything from the first ``:`` (the user name holds no
  ``:``, ``/`` or ``@``, as SQLAlchemy reads it) to the last ``@`` before the query, else,
  when there is none, to the first ``@`` after it (SQLAlchemy reads ``u:p?w@host`` as user
  ``u`` and password ``p?w``; urllib would end the user info at the ``?``). So a ``/``,
  ``?``, ``#`` or ``@`` written unencoded in a password is hidden too;
- the value of every query parameter whose name, percent-decoded and in any case, is
  ``password``, ends in ``password`` (``sslpassword``), or is ``pass``, ``pwd`` or
  ``passwd``: up to the next ``&``, so a ``#`` or ``;`` in it is hidden too.

Everything else is shown as written: the user name, IPv6 hosts in brackets, ports, the
database, other parameters (``sslkey`` and ``sslrootcert`` paths), so that an error still
says which server it is about. A string without ``://`` is shown as it is.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote_plus

from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema

from qcluster.settings.text import toml_type

_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_USER_RE = re.compile(r"[^:/@]*:")  # a user name, then the ":" that starts a password
_QUERY_KEY_RE = re.compile(r"[?&;]([^=&;]*)=")
_PASSWORD_KEYS = frozenset({"pass", "pwd", "passwd"})
HIDDEN = "***"


def redact_url(url: str) -> str:
    """``url`` with its passwords replaced by ``***`` (see the module for the rule)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    user = _USER_RE.match(rest)
    start = 0  # where the query is looked for: after the password
    if user:
        after = user.end()
        ends = [i for i in (rest.find("?", after), rest.find("#", after)) if i >= 0]
        at = rest.rfind("@", after, min(ends, default=len(rest)))
        if at < 0:
            at = rest.find("@", after)
        if at >= 0:
            rest = f"{rest[:after]}{HIDDEN}{rest[at:]}"
            start = after + len(HIDDEN)
    query = rest.find("?", start)
    if query >= 0:
        rest = rest[:query] + _hide_query(rest[query:])
    return f"{scheme}://{rest}"


def _hide_query(query: str) -> str:
    """``query`` (from its ``?``) with the value of each password parameter hidden."""
    out: list[str] = []
    pos = 0
    for m in _QUERY_KEY_RE.finditer(query):
        if m.start() < pos or not _is_password_key(m.group(1)):
            continue  # inside a value already hidden, or not a password
        end = query.find("&", m.end())
        end = len(query) if end < 0 else end
        out += [query[pos : m.end()], HIDDEN]
        pos = end
    out.append(query[pos:])
    return "".join(out)


def _is_password_key(key: str) -> bool:
    name = unquote_plus(key).strip().lower()
    return name.endswith("password") or name in _PASSWORD_KEYS


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

