"""Between STOMP frames and stored messages: which headers are kept, priority, expiry, delivery headers."""

from __future__ import annotations

from collections.abc import Mapping

from app.datasources.interface import NewMessage, StoredMessage

__all__ = [
    "HeaderError",
    "CONTROL_HEADERS",
    "BROKER_HEADERS",
    "DROPPED_HEADERS",
    "new_message",
    "delivery_headers",
    "DEFAULT_PRIORITY",
]

DEFAULT_PRIORITY = 4
# Headers that steer one frame and must not travel with the message.
CONTROL_HEADERS = frozenset({"destination", "receipt", "transaction", "content-length", "message-id", "subscription", "ack"})
# Headers only the broker sets on a delivery (redelivery, dead-lettering, a durable subscriber's gap). A producer's
# value would lie to consumers ("redelivered:true" on a first delivery, a fake DLQ origin), so it is dropped on SEND
# and REST publish. Dropped, not refused, as RabbitMQ and ActiveMQ do: a consumer that forwards a message it received
# copies these headers along, and that must keep working.
BROKER_HEADERS = frozenset({"redelivered", "x-delivery-count", "x-original-destination", "x-missed-from", "x-missed-to"})
# Everything a producer may send that is not stored with the message: the single list both SEND and REST go through.
DROPPED_HEADERS = CONTROL_HEADERS | BROKER_HEADERS


class HeaderError(ValueError):
    """A SEND header has a value the broker cannot use; the message names the header."""


# The largest time the broker stores, in epoch ms: 2**53 - 1, the largest integer every datasource and JSON client
# holds exactly (SQLite and MongoDB store 64-bit integers; JavaScript numbers are exact up to 2**53). It is about
# 285,000 years from now, so no real deadline is refused, and an absurd one fails at SEND, never in a group commit
# where it would fail other clients' writes with it.
MAX_TIME_MS = 2**53 - 1


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    raw = headers.get(name)
    if raw is None or raw == "":
        return None
    text = raw.strip()
    if len(text) > 20:  # no header we read needs more digits (and int() refuses over 4300 with a ValueError)
        raise HeaderError(f"header {name!r} must be an integer of at most 20 digits, got {raw[:32]!r}...")
    try:
        value = int(text)
    except ValueError:
        raise HeaderError(f"header {name!r} must be an integer, got {raw[:64]!r}") from None
    if not -MAX_TIME_MS <= value <= MAX_TIME_MS:
        raise HeaderError(f"header {name!r} must be between {-MAX_TIME_MS} and {MAX_TIME_MS}, got {raw[:64]!r}")
    return value


def new_message(
    *, message_id: str, destination: str, headers: Mapping[str, str], body: bytes, now_ms: int
) -> NewMessage:
    """Build the stored form of a SEND (or REST publish). ``expires`` is absolute epoch ms (ActiveMQ; 0 means
    never), ``expiration`` is relative ms (RabbitMQ); when both are given the earlier deadline wins."""
    priority = _int_header(headers, "priority")
    if priority is None:
        priority = DEFAULT_PRIORITY
    elif not 0 <= priority <= 9:
        raise HeaderError(f"header 'priority' must be between 0 and 9, got {priority}")
    deadlines = []
    expires = _int_header(headers, "expires")
    if expires is not None and expires < 0:
        raise HeaderError(f"header 'expires' must not be negative, got {expires}")
    if expires:
        deadlines.append(expires)
    expiration = _int_header(headers, "expiration")
    if expiration is not None:
        if expiration < 0:
            raise HeaderError(f"header 'expiration' must not be negative, got {expiration}")
        deadlines.append(min(now_ms + expiration, MAX_TIME_MS))
    kept = {}  # a loop, not a comprehension: Python 3.11 builds a function object for every comprehension
    for name, value in headers.items():
        if name not in DROPPED_HEADERS:
            kept[name] = value
    return NewMessage(
        message_id=message_id,
        destination=destination,
        headers=kept,
        body=body,
        priority=priority,
        expires_at=min(deadlines) if deadlines else None,
        published_at=now_ms,
    )


def delivery_headers(message: StoredMessage) -> Mapping[str, str]:
    """Application headers plus what a consumer needs to know about this delivery. ``redelivered`` is on every
    MESSAGE, ``false`` on a first delivery (queue or topic), as RabbitMQ writes it: its clients test for it."""
    if message.deliveries <= 1 and message.original_destination is None:
        return {**message.headers, "redelivered": "false"}
    headers = dict(message.headers)
    if message.deliveries > 1:
        headers["redelivered"] = "true"
        headers["x-delivery-count"] = str(message.deliveries)
    else:
        headers["redelivered"] = "false"
    if message.original_destination is not None:
        headers["x-original-destination"] = message.original_destination
    return headers
