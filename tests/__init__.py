"""qcluster's tests. A package, so that ``from tests.servers import ...`` works under
both ``pytest`` and ``python -m pytest``."""
