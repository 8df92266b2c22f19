"""The web dashboard (issue 17): ``qcluster web``, or ``[web] port`` in a node's config.

- ``app.py``: the pages, the security headers, bounded requests;
- ``auth.py``: logins, sessions, CSRF, the throttle on failed logins;
- ``queries.py``: what the pages read from the shared database;
- ``words.py``: triggers in words, times, the lateness chart;
- ``server.py``: uvicorn on a socket bound at start, with bounded peers.

Changes go through :class:`~qcluster.client.api.Client` (the leader's control API, as
the CLI's do), never straight to the tables.
"""
