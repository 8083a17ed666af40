"""Between STOMP frames and stored messages: which headers are kept, priority, expiry, delivery headers."""

from __future__ import annotations

from collections.abc import Mapping

from app.datasources.interface import NewMessage, StoredMessage

__all__ = ["HeaderError", "CONTROL_HEADERS", "new_message", "delivery_headers", "DEFAULT_PRIORITY"]

DEFAULT_PRIORITY = 4
# Headers that steer one frame and must not travel with the message.
CONTROL_HEADERS = frozenset({"destination", "receipt", "transaction", "content-length", "message-id", "subscription", "ack"})


class HeaderError(ValueError):
    """A SEND header has a value the broker cannot use; the message names the header."""


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    raw = headers.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw.strip())
    except ValueError:
        raise HeaderError(f"header {name!r} must be an integer, got {raw!r}") from None


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
    if expires:
        deadlines.append(expires)
    expiration = _int_header(headers, "expiration")
    if expiration is not None:
        if expiration < 0:
            raise HeaderError(f"header 'expiration' must not be negative, got {expiration}")
        deadlines.append(now_ms + expiration)
    kept = {k: v for k, v in headers.items() if k not in CONTROL_HEADERS}
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
    """Application headers plus what a consumer needs to know about this delivery."""
    if message.deliveries <= 1 and message.original_destination is None:
        return message.headers
    headers = dict(message.headers)
    if message.deliveries > 1:
        headers["redelivered"] = "true"
        headers["x-delivery-count"] = str(message.deliveries)
    if message.original_destination is not None:
        headers["x-original-destination"] = message.original_destination
    return headers
