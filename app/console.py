"""The operator console: one page (``/``) with live destinations, connections, a publish form and a tail.

The page polls ``GET /destinations`` when the REST API serves it and ``/console/api/overview`` (below) for
connections and subscriptions, and talks STOMP over the gateway's own WebSocket for publishing and tailing.
Assets live in ``app/static``: plain JavaScript, no build step and no CDN.

The page and its assets hold no data, so they load for anyone; the overview names users, peers and destinations, so
with a users file it needs an ``admin`` bearer token, which the page asks for and keeps in ``sessionStorage``. The
page's STOMP connection (the tail, and publishing where REST is not served) is checked like any other CONNECT, by
login and passcode (a bearer token is not accepted there), so the page asks for those too and keeps them alongside.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse

from app.api.auth import AdminPrincipal
from app.broker.broker import Broker
from app.broker.metrics import OTHER

__all__ = ["router", "overview"]

STATIC = Path(__file__).resolve().parent / "static"
MEDIA_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".png": "image/png"}

router = APIRouter(tags=["console"], include_in_schema=False)


@router.get("/")
async def console_page() -> FileResponse:
    return FileResponse(STATIC / "console.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.get("/console/static/{name}")
async def console_asset(name: str) -> FileResponse:
    path = (STATIC / name).resolve()
    if path.parent != STATIC or not path.is_file() or path.suffix not in MEDIA_TYPES:
        raise HTTPException(status_code=404, detail="no such console asset")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers={"Cache-Control": "no-cache"})


@router.get("/console/api/overview")
async def console_overview(request: Request, principal: AdminPrincipal) -> dict[str, Any]:
    return await overview(request.state.broker)


def _samples(broker: Broker, metric: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of one counter family, read through the registry's public ``collect``."""
    found = []
    for family in broker.metrics.registry.collect():
        if family.name == metric:
            found += [(dict(s.labels), s.value) for s in family.samples if s.name.endswith("_total")]
    return found


async def overview(broker: Broker) -> dict[str, Any]:
    """Everything the console shows, as counters: the page derives rates from successive polls."""
    now_ms = broker.now_ms()
    delivered = {labels["destination"]: value for labels, value in _samples(broker, "stompgate_messages_delivered")}
    published = {labels["kind"]: value for labels, value in _samples(broker, "stompgate_messages_published")}
    consumers: dict[str, int] = defaultdict(int)
    connections, subscriptions = [], []
    monotonic = time.monotonic()
    for session in list(broker.sessions.values()):
        connections.append(
            {
                "id": session.id,
                "kind": session.kind,
                "peer": session.peer,
                "version": session.conn.version if session.connected else None,
                "user": getattr(session.principal, "name", None),
                "subscriptions": len(session.subscriptions),
                "frames_in": session.frames_in,
                "messages_out": session.messages_out,
                "age_s": round(monotonic - session.opened_at, 1),
            }
        )
        for sub in list(session.subscriptions.values()):
            consumers[sub.destination_text] += 1
            subscriptions.append(
                {
                    "session": session.id,
                    "id": sub.id,
                    "destination": sub.destination_text,
                    "ack": sub.ack,
                    "prefetch": sub.prefetch,
                    "unacked": len(sub.unacked),
                    "delivered": sub.delivered,
                }
            )
    names = set(await broker.datasource.queues.destinations()) | set(broker.topic_subscriptions) | set(consumers)
    names |= set(delivered) - {OTHER}  # past the metrics cap: in delivered_total, not a destination to list
    destinations = []
    for name in sorted(names):
        kind = "topic" if name.startswith("/topic/") else "queue"
        depth = unacked = 0
        if kind == "queue":
            stats = await broker.datasource.queues.stats(name, now_ms=now_ms)
            depth, unacked = stats.ready, stats.unacked
        destinations.append(
            {
                "name": name,
                "kind": kind,
                "depth": depth,
                "unacked": unacked,
                "consumers": consumers.get(name, 0),
                "delivered_total": delivered.get(name, 0.0),
            }
        )
    return {
        "now_ms": now_ms,
        "gateway_id": broker.gateway_id,
        "uptime_s": round(time.time() - broker.started_at, 1),
        "published_total": sum(published.values()),
        "published_by_kind": published,
        "delivered_total": sum(delivered.values()),
        "destinations": destinations,
        "connections": connections,
        "subscriptions": subscriptions,
    }
