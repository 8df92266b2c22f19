"""Small helpers for the one-line messages of the settings package."""

from __future__ import annotations

_TOML_TYPES = {"bool": "boolean", "int": "integer", "str": "string", "list": "array"}


def toml_type(value: object) -> str:
    """The TOML name of ``value``'s type (``integer``, ``array``), for error messages."""
    name = type(value).__name__
    return _TOML_TYPES.get(name, name)


def show(value: str) -> str:
    """``value`` quoted, cut to about 60 characters: a value in an error message."""
    return repr(value if len(value) <= 60 else value[:57] + "...")


def one_line(message: str) -> str:
    return " ".join(message.splitlines())
