"""Small helpers for the one-line messages of the settings package."""

from __future__ import annotations

import re

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


# C0 and C1 controls but newline and tab, and the bidirectional formatting characters,
# which reorder what a terminal shows (a "Trojan Source" line).
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e"
                     r"\u2066-\u2069]")


def printable(text: str, *, newlines: bool = True) -> str:
    """``text`` with the control characters a terminal or a page would act on (escape sequences,
    carriage returns, bidirectional overrides) shown as ``\\x1b``, ``\\u202e`` and the
    like; tabs kept, and newlines unless ``newlines`` is False."""
    def shown(m: re.Match[str]) -> str:
        c = ord(m.group())
        return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"

    text = CONTROL.sub(shown, text)
    return text if newlines else text.replace("\n", "\\n")
