"""Publish to and inspect destinations: ``/destinations/{kind}/{name}`` where kind is ``queue`` or ``topic``, and a
queue's backlog at ``/messages/queue/{name}``.

``POST /destinations/queue/orders`` publishes to ``/queue/orders``. Names may hold ``/`` (``/destinations/queue/eu/orders``
is ``/queue/eu/orders``), so the name is always the last part of a URL: a route that put anything after it (as
``/destinations/queue/orders/messages`` once did for the backlog) would make some names unreachable.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response
from pydantic import ValidationError

from app.api.auth import AdminPrincipal, CurrentPrincipal, broker_of, check_read, check_write
from app.api.errors import ProblemError, problem_responses
from app.api.models import (
    ENVELOPE_MEDIA_TYPE,
    DestinationInfo,
    DestinationKind,
    PublishEnvelope,
    Published,
    Purged,
    QueuedMessage,
)
from app.api.rates import DELIVERED_COUNTER, PUBLISHED_COUNTER, RateTracker
from app.broker.broker import Broker
from app.broker.metrics import OTHER
from app.broker.destinations import Destination, InvalidDestination, parse_destination
from app.broker.messages import HeaderError
from app.broker.selectors import SelectorError, compile_selector
from app.datasources.interface import PEEK_SCAN_LIMIT, StoredMessage

__all__ = ["router", "destination_infos"]

router = APIRouter(tags=["destinations"])

STOMP_HEADER_PREFIX = "x-stomp-"
MAX_PEEK = 1000  # messages per page of a backlog peek
_ENVELOPE_OVERHEAD = 64 * 1024  # JSON syntax and headers around an envelope's body

_PUBLISH_DESCRIPTION = f"""Publish one message; the answer comes once it is durably stored (as a STOMP RECEIPT would).

Two ways to send it:

* **raw**: the request body is the message body, of any media type (`text/plain`, `application/json`,
  `application/octet-stream`, ...), and its `Content-Type` becomes the message's `content-type` header.
  Other STOMP headers travel as `X-Stomp-<name>` request headers, e.g. `X-Stomp-Priority: 9`,
  `X-Stomp-Expiration: 60000` (names arrive lower-case, as HTTP does not keep case).
* **envelope**: `Content-Type: {ENVELOPE_MEDIA_TYPE}` with a JSON body
  `{{"headers": {{...}}, "body": "...", "body_encoding": "utf-8" | "base64"}}`.

A message whose body is larger than the gateway's `max_frame_bytes` is refused with 413 (headers have their own
limits, `max_headers` and `max_header_line_bytes`, as on STOMP)."""


def _destination(kind: DestinationKind, name: str) -> Destination:
    try:
        return parse_destination(f"/{kind.value}/{name}")
    except InvalidDestination as exc:
        raise ProblemError(400, "invalid-destination", str(exc), title="Invalid destination") from None


# ---- publishing ----


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = ProblemError(
        413, "too-large", f"the message is larger than max_frame_bytes={limit}", title="Message too large"
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _http_header_text(value: str) -> str:
    """Starlette decodes header bytes as latin-1; a UTF-8 value reads better decoded as UTF-8."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value


def _bad_header(detail: str) -> ProblemError:
    return ProblemError(400, "invalid-header", detail, title="Invalid header")


def _check_headers(headers: Mapping[str, str], max_headers: int, max_line: int) -> int:
    """Validate STOMP headers; return their encoded size."""
    if len(headers) > max_headers:
        raise _bad_header(f"{len(headers)} headers are more than max_headers={max_headers}")
    size = 0
    for name, value in headers.items():
        if not name or any(c in name for c in ":\r\n\0"):
            raise _bad_header(f"header name {name!r} is empty or holds ':', CR, LF or NUL")
        if any(c in value for c in "\r\n\0"):
            raise _bad_header(f"header {name!r} holds CR, LF or NUL")
        line = len(name.encode()) + 1 + len(value.encode())
        if line > max_line:
            raise _bad_header(f"header {name!r} is longer than max_header_line_bytes={max_line}")
        size += line + 1
    return size


def _envelope(raw: bytes) -> tuple[dict[str, str], bytes]:
    try:
        envelope = PublishEnvelope.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise ProblemError(
            400, "invalid-envelope", f"{where + ': ' if where else ''}{first['msg']}", title="Invalid envelope"
        ) from None
    if envelope.body_encoding == "base64":
        try:
            body = base64.b64decode(envelope.body, validate=True)
        except (binascii.Error, ValueError):
            raise ProblemError(400, "invalid-envelope", "body is not valid base64", title="Invalid envelope") from None
    else:
        body = envelope.body.encode()
    return dict(envelope.headers), body


@router.post(
    "/destinations/{kind}/{name:path}",
    status_code=201,
    summary="Publish a message",
    description=_PUBLISH_DESCRIPTION,
    operation_id="publish",
    responses=problem_responses(400, 401, 403, 413, 503),
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {
                ENVELOPE_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/PublishEnvelope"}},
                "application/json": {"schema": {"$ref": "#/components/schemas/JsonObject"}},
                "text/plain": {"schema": {"type": "string"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
)
async def publish(
    request: Request, response: Response, kind: DestinationKind, name: str, principal: CurrentPrincipal
) -> Published:
    broker = broker_of(request)
    destination = str(_destination(kind, name))
    check_write(request, principal, destination)
    limit = broker.config.limits.max_frame_bytes
    content_type = request.headers.get("content-type")
    media_type = content_type.split(";", 1)[0].strip().lower() if content_type else None
    if media_type == ENVELOPE_MEDIA_TYPE:
        headers, body = _envelope(await _read_body(request, 2 * limit + _ENVELOPE_OVERHEAD))
    else:
        body = await _read_body(request, limit)
        headers = {
            key[len(STOMP_HEADER_PREFIX) :]: _http_header_text(value)
            for key, value in request.headers.items()
            if key.startswith(STOMP_HEADER_PREFIX) and len(key) > len(STOMP_HEADER_PREFIX)
        }
        if content_type is not None:
            headers.setdefault("content-type", _http_header_text(content_type))
    limits = broker.config.limits
    if "destination" in headers:  # the URL names it: a header naming another would be dropped without a word
        raise _bad_header(f"the destination is {destination}, from the URL; send no destination header")
    _check_headers(headers, limits.max_headers, limits.max_header_line_bytes)
    if len(body) > limit:  # the body's limit, as on STOMP; headers have their own limits (just checked)
        raise ProblemError(413, "too-large", f"the message is larger than max_frame_bytes={limit}", title="Message too large")
    if not broker.accepting:
        raise ProblemError(503, "unavailable", "the gateway is shutting down", headers={"Retry-After": "5"})
    try:
        message = await broker.publish(destination, headers, body)
    except HeaderError as exc:
        raise _bad_header(str(exc)) from None
    response.headers["Location"] = f"/destinations/{kind.value}/{name}"
    return Published(message_id=message.message_id, destination=destination)


# ---- inspection ----


def _consumers(broker: Broker) -> dict[str, int]:
    counts: dict[str, int] = {}
    for session in list(broker.sessions.values()):
        for sub in list(session.subscriptions.values()):
            counts[sub.destination_text] = counts.get(sub.destination_text, 0) + 1
    return counts


async def destination_infos(request: Request, only: Destination | None = None) -> list[DestinationInfo]:
    """What the gateway knows about each destination: queues holding messages, destinations with subscribers here,
    and those with traffic through here. With ``only``, that one destination, or nothing if none of those holds."""
    broker = broker_of(request)
    tracker: RateTracker | None = getattr(request.state, "rates", None)
    rates = tracker.rates(broker.metrics.registry) if tracker is not None else {}
    consumers = _consumers(broker)
    if only is not None:
        names = {str(only)}
    else:
        # OTHER is the traffic of the destinations past the metrics cap, not a destination (theirs read 0 rates).
        names = set(await broker.datasource.queues.destinations()) | set(consumers) | {d for _, d in rates if d != OTHER}
    now_ms = broker.now_ms()
    infos = []
    for text in sorted(names):
        try:
            parsed = parse_destination(text)
        except InvalidDestination:
            continue
        depth = unacked = 0
        if parsed.kind == "queue":
            stats = await broker.datasource.queues.stats(text, now_ms=now_ms)
            depth, unacked = stats.ready, stats.unacked
        seen = (PUBLISHED_COUNTER, text) in rates or (DELIVERED_COUNTER, text) in rates
        if only is not None and not (depth or unacked or consumers.get(text) or seen):
            return []
        infos.append(
            DestinationInfo(
                destination=text,
                kind=DestinationKind(parsed.kind),
                name=parsed.name,
                depth=depth,
                unacked=unacked,
                consumers=consumers.get(text, 0),
                publish_rate=round(rates.get((PUBLISHED_COUNTER, text), 0.0), 3),
                deliver_rate=round(rates.get((DELIVERED_COUNTER, text), 0.0), 3),
            )
        )
    return infos


@router.get(
    "/destinations",
    summary="List destinations",
    description="Queues holding messages, and destinations with subscribers or recent traffic on this gateway, "
    "limited to those the caller may read.",
    operation_id="list_destinations",
    responses=problem_responses(401, 503),
)
async def list_destinations(request: Request, principal: CurrentPrincipal) -> list[DestinationInfo]:
    authorizer = broker_of(request).authorizer
    return [info for info in await destination_infos(request) if authorizer.can_read(principal, info.destination)]


def _queued(message: StoredMessage) -> QueuedMessage:
    encoding: Literal["utf-8", "base64"] = "utf-8"
    try:
        body = message.body.decode("utf-8")
    except UnicodeDecodeError:
        body, encoding = base64.b64encode(message.body).decode(), "base64"
    return QueuedMessage(
        message_id=message.message_id,
        destination=message.destination,
        headers=dict(message.headers),
        body=body,
        body_encoding=encoding,
        priority=message.priority,
        published_at=message.published_at,
        expires_at=message.expires_at,
        deliveries=message.deliveries,
    )


def _queue_only(destination: Destination) -> None:
    if destination.kind != "queue":
        raise ProblemError(
            400, "not-a-queue", f"{destination} is a topic; topics keep no backlog to inspect or purge", title="Not a queue"
        )


@router.get(
    "/messages/{kind}/{name:path}",
    summary="Peek at a queue's backlog",
    description="Messages waiting on a queue, in delivery order (priority, then age), without consuming them. "
    "`selector` filters on headers with the STOMP subscription selector syntax (SQL-like, e.g. "
    "`priority > 5 AND region = 'eu'`, or a MongoDB-style query document).",
    operation_id="peek_messages",
    responses=problem_responses(400, 401, 403, 503),
)
async def peek_messages(
    request: Request,
    kind: DestinationKind,
    name: str,
    principal: CurrentPrincipal,
    limit: Annotated[int, Query(ge=1, le=MAX_PEEK, description="Messages to return.")] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000, description="Messages to skip first.")] = 0,
    selector: Annotated[
        str | None,
        Query(
            max_length=4096,
            description=f"Only messages whose headers match; the first {PEEK_SCAN_LIMIT:,} messages of the backlog "
            "are examined.",
        ),
    ] = None,
) -> list[QueuedMessage]:
    destination = _destination(kind, name)
    _queue_only(destination)
    check_read(request, principal, str(destination))
    header_filter = None
    if selector is not None:
        try:
            header_filter = compile_selector(selector).matches
        except SelectorError as exc:
            raise ProblemError(400, "invalid-selector", str(exc), title="Invalid selector") from None
    broker = broker_of(request)
    messages = await broker.datasource.queues.peek(
        str(destination), limit=limit, offset=offset, now_ms=broker.now_ms(), selector=header_filter
    )
    return [_queued(m) for m in messages]


@router.delete(
    "/messages/{kind}/{name:path}",
    summary="Purge a queue (admin)",
    description="Delete every message of a queue, delivered or not. Needs the admin role.",
    operation_id="purge_messages",
    responses=problem_responses(400, 401, 403, 409, 503),
)
async def purge_messages(request: Request, kind: DestinationKind, name: str, principal: AdminPrincipal) -> Purged:
    destination = _destination(kind, name)
    _queue_only(destination)
    count = await broker_of(request).datasource.queues.purge(str(destination))
    return Purged(destination=str(destination), purged=count)


@router.get(
    "/destinations/{kind}/{name:path}",
    summary="Inspect a destination",
    description="Depth, unacked messages, consumers and rates of one destination. 404 for a destination this gateway "
    "knows nothing of: no stored messages, no subscribers here and no traffic through here (destinations come into "
    "being when used, so there is no list of all of them to look in; a topic used only through other gateways is "
    "unknown here).",
    operation_id="get_destination",
    responses=problem_responses(400, 401, 403, 404, 503),
)
async def get_destination(request: Request, kind: DestinationKind, name: str, principal: CurrentPrincipal) -> DestinationInfo:
    destination = _destination(kind, name)
    check_read(request, principal, str(destination))  # before the 404: who may not read learns nothing
    found = await destination_infos(request, only=destination)
    if not found:
        raise ProblemError(404, "unknown-destination", _unknown(kind, name), title="Unknown destination")
    return found[0]


def _unknown(kind: DestinationKind, name: str) -> str:
    detail = f"/{kind.value}/{name} holds no messages, has no subscribers here and no traffic through here"
    owner, slash, last = name.rpartition("/")
    if slash and last == "messages":  # where the backlog was before it moved
        detail += f"; the backlog of /{kind.value}/{owner} is at /messages/{kind.value}/{owner}"
    return detail
