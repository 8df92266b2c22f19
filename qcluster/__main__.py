from __future__ import annotations

from qcluster.cli.main import main

main()
