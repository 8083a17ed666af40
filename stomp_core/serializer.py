"""Frames to bytes: escaping per version (never for CONNECT/CONNECTED) and a ``content-length`` on every body.

``content-length`` is computed here and replaces one the caller passed. It is always written on SEND, MESSAGE and
ERROR (``content-length:0`` for an empty body) and on any other frame that has a body. Frames end with a bare NUL.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .errors import UsageError
from .escaping import RAW_COMMANDS, can_carry, escape
from .frame import Frame

__all__ = ["serialize", "encode_frame", "encode_message", "encode_message_head", "encode_receipt"]

_BODY_COMMANDS = frozenset({"SEND", "MESSAGE", "ERROR"})
_MESSAGE_RESERVED = frozenset({"destination", "subscription", "message-id", "ack", "content-length"})


def _raw(value: str) -> str:
    if "\n" in value or "\r" in value:
        raise UsageError(f"CONNECT/CONNECTED headers cannot carry line breaks: {value!r}")
    return value


def encode_frame(command: str, headers: Iterable[tuple[str, str]], body: bytes, version: str) -> bytes:
    """Encode one frame from (name, value) pairs, in order; ``content-length`` pairs are dropped and recomputed."""
    parts = [command]
    if command in RAW_COMMANDS:
        for name, value in headers:
            if name != "content-length":
                if ":" in name:
                    raise UsageError(f"CONNECT/CONNECTED header names cannot hold ':': {name!r}")
                parts.append(f"{_raw(name)}:{_raw(value)}")
    elif version == "1.0":
        for name, value in headers:
            if name != "content-length":
                if ":" in name:
                    raise UsageError(f"STOMP 1.0 header names cannot hold ':': {name!r}")
                parts.append(f"{escape(name, version)}:{escape(value, version)}")
    else:
        for name, value in headers:
            if name != "content-length":
                parts.append(f"{escape(name, version)}:{escape(value, version)}")
    if body or command in _BODY_COMMANDS:
        parts.append(f"content-length:{len(body)}")
    parts.append("\n")
    return "\n".join(parts).encode() + body + b"\0"


def serialize(frame: Frame, version: str = "1.2") -> bytes:
    """The wire form of ``frame`` for a connection speaking ``version``."""
    return encode_frame(frame.command, frame.headers.items(), frame.body, version)


def encode_receipt(receipt_id: str, version: str) -> bytes:
    """The RECEIPT hot path: the bytes of ``encode_frame("RECEIPT", (("receipt-id", receipt_id),), b"", version)``
    (one per SEND that asks for it), without the general loop."""
    return f"RECEIPT\nreceipt-id:{escape(receipt_id, version)}\n\n\0".encode()


def encode_message(
    destination: str,
    subscription: str,
    message_id: str,
    ack: str | None,
    headers: Mapping[str, str],
    body: bytes,
    version: str,
) -> bytes:
    """The MESSAGE hot path. ``ack`` is written only when given and the version is 1.2; extra ``headers`` never
    override the core ones, and those the version cannot carry (:func:`~stomp_core.escaping.can_carry`) are left out."""
    return b"".join((encode_message_head(destination, subscription, message_id, ack, headers, len(body), version), body, b"\0"))


def encode_message_head(
    destination: str,
    subscription: str,
    message_id: str,
    ack: str | None,
    headers: Mapping[str, str],
    body_length: int,
    version: str,
) -> bytes:
    """A MESSAGE up to its body (through the blank line); the body and a NUL follow. Lets a large body be written
    as it is, never copied into a frame."""
    head = (
        f"MESSAGE\ndestination:{escape(destination, version)}\nmessage-id:{escape(message_id, version)}\n"
        f"subscription:{escape(subscription, version)}\n"
    )
    if ack is not None and version == "1.2":
        head += f"ack:{escape(ack, version)}\n"
    if headers:
        lines = []
        for name, value in headers.items():
            if name not in _MESSAGE_RESERVED:
                lines.append(f"{name}:{value}\n")
        plain = "".join(lines)
        count = len(lines)
        # The usual case, checked on the whole text at once: no name or value holds ':', LF, CR, '\\' or NUL, so
        # every version carries them as they are (one ':' and one LF per line are the separators).
        quick = plain.count(":") == count and plain.count("\n") == count
        if quick and "\\" not in plain and "\r" not in plain and "\0" not in plain:
            head += plain
        else:
            extra = []
            for name, value in headers.items():
                # A header this connection's version cannot carry is left out of this MESSAGE (other consumers
                # still get it): one producer's header must never stop a delivery.
                if name not in _MESSAGE_RESERVED and can_carry(name, value, version):
                    extra.append(f"{escape(name, version)}:{escape(value, version)}\n")
            head += "".join(extra)
    return f"{head}content-length:{body_length}\n\n".encode()
