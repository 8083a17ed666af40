"""The REST API's request and response bodies (snake_case throughout)."""

from __future__ import annotations

from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ENVELOPE_MEDIA_TYPE",
    "JSON_OBJECT_SCHEMA",
    "DestinationKind",
    "PublishEnvelope",
    "Published",
    "DestinationInfo",
    "QueuedMessage",
    "Purged",
    "ConnectionInfo",
    "SubscriptionInfo",
    "Readiness",
    "Liveness",
]

ENVELOPE_MEDIA_TYPE = "application/vnd.stompgate.envelope+json"

# A raw application/json body as the OpenAPI document names it. Any JSON value is taken; an object is what SDK
# generators can type (JSON of another kind can go as text/plain with its own content-type header, or in an envelope).
JSON_OBJECT_SCHEMA: dict[str, object] = {
    "title": "JsonObject",
    "type": "object",
    "additionalProperties": True,
    "description": "A JSON message body, stored as sent, with content-type application/json.",
}


class DestinationKind(str, Enum):
    queue = "queue"
    topic = "topic"


class PublishEnvelope(BaseModel):
    """The body of a publish with Content-Type ``application/vnd.stompgate.envelope+json``."""

    model_config = ConfigDict(extra="forbid")

    headers: dict[str, str] = Field(default_factory=dict, description="STOMP headers of the message (priority, expires, content-type, your own).")
    body: str = Field("", description="The message body, as text or base64 (see body_encoding).")
    body_encoding: Literal["utf-8", "base64"] = Field("utf-8", description="How body is encoded.")


class Published(BaseModel):
    """The message is durably stored."""

    message_id: str = Field(description="The id consumers see in the message-id header.")
    destination: str = Field(description="The full destination, e.g. /queue/orders.")


class DestinationInfo(BaseModel):
    destination: str = Field(description="The full destination, e.g. /queue/orders.")
    kind: DestinationKind
    name: str = Field(description="The name after the kind, e.g. orders.")
    depth: int = Field(description="Queue: messages ready for delivery. Topic: always 0 (topics keep no backlog per consumer).")
    unacked: int = Field(description="Queue: messages delivered and not yet acknowledged. Topic: 0.")
    consumers: int = Field(description="Subscriptions on this gateway.")
    publish_rate: float = Field(description="Messages per second published here, over the last minute, seen by this gateway.")
    deliver_rate: float = Field(description="MESSAGE frames per second sent from here, over the last minute, by this gateway.")


class QueuedMessage(BaseModel):
    message_id: str
    destination: str
    headers: dict[str, str]
    body: str = Field(description="The body as text when it is valid UTF-8, else base64 (see body_encoding).")
    body_encoding: Literal["utf-8", "base64"]
    priority: int = Field(description="0-9; higher is delivered first.")
    published_at: int = Field(description="Epoch milliseconds.")
    expires_at: int | None = Field(description="Epoch milliseconds after which the message is never delivered.")
    deliveries: int = Field(description="Times it has been handed to a consumer so far.")


class Purged(BaseModel):
    destination: str
    purged: int = Field(description="Messages deleted.")


class ConnectionInfo(BaseModel):
    session_id: str
    transport: str = Field(description="tcp or websocket.")
    peer: str = Field(description="The client's address.")
    user: str | None = Field(description="The authenticated user, null before CONNECT.")
    client_id: str | None
    stomp_version: str | None = Field(description="Negotiated STOMP version, null before CONNECT.")
    connected_for: float = Field(description="Seconds since the connection opened.")
    subscriptions: int
    frames_received: int
    messages_sent: int


class SubscriptionInfo(BaseModel):
    session_id: str
    subscription_id: str
    destination: str
    ack: str = Field(description="auto, client or client-individual.")
    prefetch: int
    selector: str | None
    unacked: int = Field(description="Delivered and not yet acknowledged.")
    user: str | None


class Readiness(BaseModel):
    status: Literal["ready"]


class Liveness(BaseModel):
    status: Literal["ok"]
