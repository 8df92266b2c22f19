"""The secret of an embedded (one-host SQLite) cluster: a private file beside the database."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def embedded_secret(db_path: Path) -> str:
    """The secret of an embedded (one-host SQLite) cluster, kept in a 0600 file by the DB.

    Every process on the host that can read the database can read this file too, so it
    grants nothing new; it keeps other users of the machine off the RPC ports.
    """
    path = db_path.with_name(db_path.name + ".secret")
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    # Write a private temp file, then link it into place: readers never see it half
    # written, and of two racing processes exactly one wins.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_text().strip()
