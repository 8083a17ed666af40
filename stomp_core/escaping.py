"""Header escaping per STOMP version: none in 1.0, ``\\n \\c \\\\`` in 1.1, plus ``\\r`` in 1.2.

CONNECT and CONNECTED frames are never escaped in any version (passwords may hold ``:`` or ``\\``); the
parser and the serializer decide that with :data:`RAW_COMMANDS`, these functions only know the version.
"""

from __future__ import annotations

import re

from .errors import ProtocolError, UsageError

__all__ = ["RAW_COMMANDS", "escape", "unescape", "can_carry"]

RAW_COMMANDS = frozenset({"CONNECT", "CONNECTED"})

_UNESCAPE_11 = {"n": "\n", "c": ":", "\\": "\\"}
_UNESCAPE_12 = {**_UNESCAPE_11, "r": "\r"}
_ESCAPE_11 = str.maketrans({"\\": "\\\\", "\n": "\\n", ":": "\\c"})
_ESCAPE_12 = str.maketrans({"\\": "\\\\", "\n": "\\n", ":": "\\c", "\r": "\\r"})
_ESCAPE_SEQUENCE = re.compile(r"\\(.?)", re.DOTALL)


def unescape(value: str, version: str) -> str:
    """Decode a received header name or value; an undefined escape is ``ProtocolError("Invalid header")``."""
    if "\\" not in value or version == "1.0":
        return value
    table = _UNESCAPE_11 if version == "1.1" else _UNESCAPE_12

    def replace(match: re.Match[str]) -> str:
        char = table.get(match.group(1))
        if char is None:
            raise ProtocolError("Invalid header", f"Undefined escape sequence {match.group(0)!r} in STOMP {version}")
        return char

    return _ESCAPE_SEQUENCE.sub(replace, value)


def escape(value: str, version: str) -> str:
    """Encode a header name or value for sending.

    A character the version cannot carry (NUL in any, LF or CR in 1.0, CR in 1.1) is a ``UsageError``: it would
    break the frame.
    """
    if "\0" in value:
        raise UsageError(f"No STOMP version can carry a NUL in a header: {value!r}")
    if version == "1.0":
        if "\n" in value or "\r" in value:
            raise UsageError(f"STOMP 1.0 cannot carry a line break in a header: {value!r}")
        return value
    if version == "1.1":
        if "\r" in value:
            raise UsageError(f"STOMP 1.1 cannot carry a carriage return in a header: {value!r}")
        if "\\" in value or "\n" in value or ":" in value:
            return value.translate(_ESCAPE_11)
        return value
    if "\\" in value or "\n" in value or ":" in value or "\r" in value:
        return value.translate(_ESCAPE_12)
    return value


def can_carry(name: str, value: str, version: str) -> bool:
    """Whether a header can travel on a ``version`` connection: never a NUL (it would end the frame early and let
    the rest be read as a forged frame); in 1.0 no line break and no ':' in the name; in 1.1 no CR."""
    if "\0" in value or "\0" in name:
        return False
    if version == "1.2":
        return True
    if "\r" in value or "\r" in name:
        return False
    if version == "1.1":
        return True
    return "\n" not in value and "\n" not in name and ":" not in name
