"""The STOMP frame as a value: a command, ordered headers and a body."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["Frame", "CLIENT_COMMANDS", "SERVER_COMMANDS"]

CLIENT_COMMANDS = frozenset(
    {"CONNECT", "STOMP", "SEND", "SUBSCRIBE", "UNSUBSCRIBE", "ACK", "NACK", "BEGIN", "COMMIT", "ABORT", "DISCONNECT"}
)
SERVER_COMMANDS = frozenset({"CONNECTED", "MESSAGE", "RECEIPT", "ERROR"})


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame. ``headers`` keeps the first occurrence of a repeated header (the spec's rule) in wire order."""

    command: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
