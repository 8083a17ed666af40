"""stomp_core: a sans-I/O STOMP 1.0/1.1/1.2 implementation (bytes in, events out; calls in, bytes out)."""

from __future__ import annotations

from .connection import ClientConnection, ServerConnection
from .errors import LimitExceeded, ProtocolError, UsageError
from .events import (
    Abort,
    Ack,
    AckMode,
    Begin,
    ClientEvent,
    Commit,
    ConnectRequested,
    Connected,
    Disconnect,
    ErrorReceived,
    Event,
    MessageReceived,
    Nack,
    ProtocolViolation,
    ReceiptReceived,
    Send,
    ServerEvent,
    Subscribe,
    Unsubscribe,
)
from .frame import Frame
from .heartbeat import HeartbeatPlan, negotiate
from .limits import DEFAULT_LIMITS, Limits
from .negotiation import SUPPORTED_VERSIONS
from .parser import FrameParser
from .serializer import serialize
from .states import State

__all__ = [
    # connections
    "ServerConnection",
    "ClientConnection",
    "State",
    # frames
    "Frame",
    "FrameParser",
    "serialize",
    "SUPPORTED_VERSIONS",
    # limits and errors
    "Limits",
    "DEFAULT_LIMITS",
    "ProtocolError",
    "LimitExceeded",
    "UsageError",
    # heart-beats
    "HeartbeatPlan",
    "negotiate",
    # events
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
