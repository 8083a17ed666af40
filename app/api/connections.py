"""Who is connected and what they subscribe to (admin only: these name other users and their addresses)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from app.api.auth import AdminPrincipal, broker_of
from app.api.errors import problem_responses
from app.api.models import ConnectionInfo, SubscriptionInfo

__all__ = ["router"]

router = APIRouter(tags=["connections"])


@router.get(
    "/connections",
    summary="List STOMP connections (admin)",
    description="Every STOMP connection to this gateway, over TCP or WebSocket. Needs the admin role.",
    operation_id="list_connections",
    responses=problem_responses(401, 403),
)
async def list_connections(request: Request, principal: AdminPrincipal) -> list[ConnectionInfo]:
    now = time.monotonic()
    return [
        ConnectionInfo(
            session_id=session.id,
            transport=session.kind,
            peer=session.peer,
            user=session.principal.name if session.principal else None,
            client_id=session.client_id,
            stomp_version=session.conn.version if session.principal else None,
            connected_for=round(now - session.opened_at, 3),
            subscriptions=len(session.subscriptions),
            frames_received=session.frames_in,
            messages_sent=session.messages_out,
        )
        for session in list(broker_of(request).sessions.values())
    ]


@router.get(
    "/subscriptions",
    summary="List subscriptions (admin)",
    description="Every subscription held by a connection to this gateway. Needs the admin role.",
    operation_id="list_subscriptions",
    responses=problem_responses(401, 403),
)
async def list_subscriptions(request: Request, principal: AdminPrincipal) -> list[SubscriptionInfo]:
    return [
        SubscriptionInfo(
            session_id=session.id,
            subscription_id=sub.id,
            destination=sub.destination_text,
            ack=str(sub.ack),
            prefetch=sub.prefetch,
            selector=sub.selector.text if sub.selector is not None else None,
            unacked=len(sub.unacked),
            user=session.principal.name if session.principal else None,
        )
        for session in list(broker_of(request).sessions.values())
        for sub in list(session.subscriptions.values())
    ]
