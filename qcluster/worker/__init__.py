"""The worker: checks, claims and runs what the leader sends, and writes the outcomes."""
