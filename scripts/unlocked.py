"""Print the distributions installed in this environment that a lock file does not list.

Used by scripts/test.sh: such a package can hide a missing dependency (a test passes here
because of it and fails on a fresh machine). pip itself and this project are left out.
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import distributions
from pathlib import Path


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(lock: str) -> None:
    text = Path(lock).read_text()
    locked = {_norm(m[1]) for m in re.finditer(r"^([A-Za-z0-9][\w.-]*)==", text, re.M)}
    present = {_norm(d.metadata["Name"]) for d in distributions() if d.metadata["Name"]}
    print(" ".join(sorted(present - locked - {"pip", "qcluster"})))


if __name__ == "__main__":
    main(sys.argv[1])
