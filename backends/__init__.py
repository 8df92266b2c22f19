"""Coordination backends: one module each, behind :mod:`backends.base`."""
