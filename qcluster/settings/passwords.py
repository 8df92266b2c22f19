"""The hashes of the dashboard's passwords and tokens (``[web] users`` and ``tokens``).

A config never holds a password, only its scrypt hash (RFC 7914, ``hashlib.scrypt``), in
the modular format ``scrypt$N$r$p$salt$hash`` (salt and hash unpadded base64). The cost is
OWASP's recommendation for scrypt (N = 2**17, r = 8, p = 1: 128 MiB and about a quarter of
a second per check here), with a 16-byte random salt and a 32-byte key. ``qcluster config
hash-password`` makes one. A hash with a lower N than :data:`MIN_LOG2_N` is refused at
load, so that a config cannot quietly make logins cheap to guess offline.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re

SCHEME = "scrypt"
LOG2_N = 17
MIN_LOG2_N = 14
MAX_LOG2_N = 20
R = 8
P = 1
SALT_BYTES = 16
KEY_BYTES = 32
#: The most a password or token may be: scrypt reads it whole, and a form field is bounded.
MAX_PASSWORD_BYTES = 1024
_FORMAT = re.compile(r"scrypt\$(\d{1,7})\$(\d{1,2})\$(\d{1,2})\$([A-Za-z0-9+/]{16,88})"
                     r"\$([A-Za-z0-9+/]{32,88})", re.ASCII)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _maxmem(n: int, r: int) -> int:
    return 128 * n * r + 16 * 1024 * 1024


def hash_password(password: str, log2_n: int = LOG2_N) -> str:
    """The stored form of ``password`` (``log2_n`` below the default only for tests)."""
    if not MIN_LOG2_N <= log2_n <= MAX_LOG2_N:
        raise ValueError(f"log2_n must be from {MIN_LOG2_N} to {MAX_LOG2_N}")
    secret = _bytes(password)
    salt = os.urandom(SALT_BYTES)
    n = 1 << log2_n
    key = hashlib.scrypt(secret, salt=salt, n=n, r=R, p=P, dklen=KEY_BYTES,
                         maxmem=_maxmem(n, R))
    return f"{SCHEME}${n}${R}${P}${_b64(salt)}${_b64(key)}"


def hash_problem(stored: str) -> str | None:
    """Why ``stored`` is not a hash :func:`verify` accepts (a phrase), or None."""
    m = _FORMAT.fullmatch(stored)
    if m is None:
        return ("must be a hash made by `qcluster config hash-password` "
                "(scrypt$N$r$p$salt$hash), not a password")
    n, r, p = (int(g) for g in m.group(1, 2, 3))
    if n & (n - 1) or not (1 << MIN_LOG2_N) <= n <= (1 << MAX_LOG2_N):
        return f"has N={n}: use a power of two from 2**{MIN_LOG2_N} to 2**{MAX_LOG2_N}"
    if not (1 <= r <= 16 and 1 <= p <= 4):
        return f"has r={r}, p={p}: use r from 1 to 16 and p from 1 to 4"
    try:
        salt, key = _unb64(m.group(4)), _unb64(m.group(5))
    except (binascii.Error, ValueError):
        return "has a salt or hash that is not base64"
    if len(salt) < 16 or len(key) < 32:
        return "has a salt shorter than 16 bytes or a hash shorter than 32"
    return None


def verify(password: str, stored: str) -> bool:
    """Whether ``password`` is the one ``stored`` was made from (constant time in the
    password); False for a malformed ``stored`` (the settings refuse those at load)."""
    try:
        secret = _bytes(password)
    except ValueError:
        return False
    if hash_problem(stored) is not None:
        return False
    _scheme, n_text, r_text, p_text, salt_text, key_text = stored.split("$")
    n, r, p = int(n_text), int(r_text), int(p_text)
    key = _unb64(key_text)
    found = hashlib.scrypt(secret, salt=_unb64(salt_text), n=n, r=r, p=p, dklen=len(key),
                           maxmem=_maxmem(n, r))
    return hmac.compare_digest(found, key)


def _bytes(password: str) -> bytes:
    data = password.encode("utf-8", "surrogatepass")
    if not data or len(data) > MAX_PASSWORD_BYTES:
        raise ValueError(f"a password is 1 to {MAX_PASSWORD_BYTES} bytes")
    return data


def dummy_hash(like: str | None = None) -> str:
    """A hash of a random password, at the cost of ``like`` (a stored hash) or the
    default: an unknown user name is checked against it, so that a login takes as long
    whether the name exists or not."""
    log2_n = LOG2_N
    if like is not None and hash_problem(like) is None:
        log2_n = int(like.split("$")[1]).bit_length() - 1
    return hash_password(_b64(os.urandom(24)), log2_n)
