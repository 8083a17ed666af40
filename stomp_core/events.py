"""Typed events that a connection produces from received bytes; a closed union the app dispatches with ``match``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from ._fastinit import fast_init

__all__ = [
    "AckMode",
    "ConnectRequested",
    "Send",
    "Subscribe",
    "Unsubscribe",
    "Ack",
    "Nack",
    "Begin",
    "Commit",
    "Abort",
    "Disconnect",
    "ProtocolViolation",
    "Connected",
    "MessageReceived",
    "ReceiptReceived",
    "ErrorReceived",
    "ServerEvent",
    "ClientEvent",
    "Event",
]

AckMode = Literal["auto", "client", "client-individual"]


# ---- events a server connection produces (frames from a client) ----


@fast_init
@dataclass(frozen=True, slots=True)
class ConnectRequested:
    """CONNECT or STOMP. The version is already negotiated; the app authenticates, then calls ``accept`` or
    ``send_error``."""

    version: str
    host: str | None
    login: str | None
    passcode: str | None
    heartbeat: tuple[int, int]  # the client's (cx, cy) in ms; (0, 0) when absent or in 1.0
    headers: Mapping[str, str]


@fast_init
@dataclass(frozen=True, slots=True)
class Send:
    destination: str
    headers: Mapping[str, str]  # every header as received (unescaped), including destination and receipt
    body: bytes
    transaction: str | None
    receipt: str | None


@fast_init
@dataclass(frozen=True, slots=True)
class Subscribe:
    destination: str
    id: str  # in 1.0 a missing id defaults to the destination
    ack: AckMode
    headers: Mapping[str, str]
    receipt: str | None


@fast_init
@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """``id`` is the ``id`` header; in 1.0 a missing id defaults to the ``destination`` (as for SUBSCRIBE), and then
    ``headers`` holds no ``id``. ``headers`` is every header as received (a broker may read extensions from it)."""

    id: str
    receipt: str | None
    headers: Mapping[str, str]


@fast_init
@dataclass(frozen=True, slots=True)
class Ack:
    """``ack_id`` is the 1.2 ``id`` header, or the 1.0/1.1 ``message-id``; ``subscription`` is set when sent."""

    ack_id: str
    subscription: str | None
    transaction: str | None
    receipt: str | None


@fast_init
@dataclass(frozen=True, slots=True)
class Nack:
    ack_id: str
    subscription: str | None
    transaction: str | None
    receipt: str | None
    requeue: bool  # ``requeue:false`` dead-letters at once; anything else requeues


@fast_init
@dataclass(frozen=True, slots=True)
class Begin:
    transaction: str
    receipt: str | None


@fast_init
@dataclass(frozen=True, slots=True)
class Commit:
    transaction: str
    receipt: str | None


@fast_init
@dataclass(frozen=True, slots=True)
class Abort:
    transaction: str
    receipt: str | None


@fast_init
@dataclass(frozen=True, slots=True)
class Disconnect:
    receipt: str | None


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """The peer broke the protocol or crossed a limit; always the last event of its list.

    On a server connection nothing is queued yet: the connection stops reading (state ``FAILING``) so that the app
    can first finish the valid frames that came before the bad one (their RECEIPTs included), then send the ERROR
    with ``send_error(message, body=detail, receipt_id=receipt_id, headers=dict(headers))`` and close. A client
    connection is closed at once and queues nothing."""

    message: str
    detail: str
    limit: bool = False  # True when a named limit was crossed
    receipt_id: str | None = None  # the bad frame's ``receipt`` header, for the ERROR's ``receipt-id``
    headers: tuple[tuple[str, str], ...] = ()  # extra ERROR headers (``version`` on a version mismatch)


ServerEvent = (
    ConnectRequested | Send | Subscribe | Unsubscribe | Ack | Nack | Begin | Commit | Abort | Disconnect | ProtocolViolation
)


# ---- events a client connection produces (frames from a server) ----


@fast_init
@dataclass(frozen=True, slots=True)
class Connected:
    version: str
    heartbeat: tuple[int, int]  # the server's (sx, sy)
    session: str | None
    server: str | None
    headers: Mapping[str, str]


@fast_init
@dataclass(frozen=True, slots=True)
class MessageReceived:
    destination: str
    subscription: str
    message_id: str
    ack: str | None  # the 1.2 ``ack`` header; 1.0/1.1 acknowledge with message_id
    headers: Mapping[str, str]
    body: bytes


@fast_init
@dataclass(frozen=True, slots=True)
class ReceiptReceived:
    receipt_id: str


@fast_init
@dataclass(frozen=True, slots=True)
class ErrorReceived:
    message: str
    headers: Mapping[str, str]
    body: bytes


ClientEvent = Connected | MessageReceived | ReceiptReceived | ErrorReceived | ProtocolViolation

Event = ServerEvent | ClientEvent
