"""Authenticated Pyro5 transport between the leader, the workers and the CLI."""
