from __future__ import annotations

from qcluster.cli import main

main()
