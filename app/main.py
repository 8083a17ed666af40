"""The ASGI application: FastAPI's lifespan opens the datasource, builds the broker and starts the TCP listener."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypedDict

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from app.api import install as install_api
from app.api.auth import CurrentPrincipal
from app.api.models import Liveness
from app.broker.broker import Broker
from app.broker.config import BrokerConfig
from app.datasources.interface import Datasource, DatasourceOptions, WrappedCollection, WrappedTable
from app.datasources.registry import open_datasource
from app.security import load_authorizer, tls_context
from app.settings import Settings
from app.console import router as console_router
from app.transports.tcp import start_tcp_listener
from stomp_core import Limits

__all__ = ["create_app", "AppState", "broker_config", "datasource_options", "redact_url"]

log = logging.getLogger("stompgate")


class AppState(TypedDict):
    settings: Settings
    broker: Broker
    datasource: Datasource
    stomp_port: int


def broker_config(settings: Settings) -> BrokerConfig:
    return BrokerConfig(
        limits=Limits(
            max_frame_bytes=settings.max_frame_bytes,
            max_frame_bytes_before_connect=min(settings.max_frame_bytes_before_connect, settings.max_frame_bytes),
            max_headers=settings.max_headers,
            max_header_line_bytes=settings.max_header_line_bytes,
            max_body_bytes=settings.max_frame_bytes,
        ),
        heartbeat_send_ms=settings.heartbeat_ms,
        heartbeat_receive_ms=settings.heartbeat_ms,
        login_timeout=settings.login_timeout,
        max_connections=settings.max_connections,
        max_connections_per_address=settings.max_connections_per_address,
        max_subscriptions_per_connection=settings.max_subscriptions_per_connection,
        max_transactions_per_connection=settings.max_transactions_per_connection,
        max_frames_per_transaction=settings.max_frames_per_transaction,
        max_transaction_bytes=settings.max_transaction_bytes,
        max_transaction_bytes_per_address=settings.max_transaction_bytes_per_address,
        max_transaction_bytes_total=settings.max_transaction_bytes_total,
        default_prefetch=min(settings.default_prefetch, settings.max_prefetch),
        max_prefetch=settings.max_prefetch,
        max_deliveries=settings.max_deliveries,
        lease_ms=settings.lease_ms,
        poll_interval=settings.poll_interval,
        metrics_max_destinations=settings.metrics_max_destinations,
        metrics_idle_seconds=settings.metrics_idle_seconds,
        max_inflight_per_session=settings.max_inflight_per_session,
        max_inflight_bytes_per_session=settings.max_inflight_bytes_per_session,
        max_session_buffer=settings.max_session_buffer,
        claim_batch=settings.claim_batch,
        shutdown_grace=settings.shutdown_grace,
        server_name=settings.server_name,
    )


def datasource_options(settings: Settings) -> DatasourceOptions:
    return DatasourceOptions(
        topic_retention=settings.topic_retention,
        poll_interval=settings.poll_interval,
        write_concern=settings.write_concern,
        server_selection_timeout_ms=settings.server_selection_timeout_ms,
        failover_buffer=settings.failover_buffer,
        sqlite_synchronous=settings.sqlite_synchronous,
        topic_retention_bytes=settings.topic_retention_bytes,
        namespace=settings.namespace,
        wrapped=tuple(
            WrappedCollection(w.destination, w.collection, dict(w.filter)) for w in settings.wrap if w.collection is not None
        ),
        wrapped_tables=tuple(
            WrappedTable(w.destination, w.table, w.key, dict(w.filter), None if w.ack_set is None else dict(w.ack_set))
            for w in settings.wrap
            if w.table is not None
        ),
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        authorizer = load_authorizer(settings)  # before the datasource: a bad users file fails with nothing open
        datasource = await open_datasource(settings.store, datasource_options(settings))
        broker = Broker(datasource, broker_config(settings), authorizer=authorizer)
        await broker.start()
        server = await start_tcp_listener(
            broker, settings.host, settings.stomp_port, ssl_context=tls_context(settings)
        )
        port = server.sockets[0].getsockname()[1]
        log.info("STOMP over TCP on %s:%d, store %s", settings.host, port, redact_url(settings.store))
        state: AppState = {"settings": settings, "broker": broker, "datasource": datasource, "stomp_port": port}
        try:
            yield dict(state)
        finally:
            server.close()
            await broker.stop()
            await asyncio.wait_for(server.wait_closed(), timeout=5)
            await datasource.close()

    # FastAPI's own document routes answer anyone: ours below follow the API's auth instead.
    app = FastAPI(title="stompgate", version="0.1.0", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)

    install_api(app)
    _install_documents(app)
    app.include_router(console_router)

    @app.get("/health", tags=["operations"], summary="Liveness: the process is up", operation_id="health")
    async def health() -> Liveness:
        return Liveness(status="ok")

    return app


def _install_documents(app: FastAPI) -> None:
    """``/openapi.json``, ``/docs`` and ``/redoc`` as FastAPI serves them, but for any authenticated user only when a
    users file is configured: the document maps every route. (A browser cannot send a bearer token when it opens
    a page, so with users configured they serve API clients; the committed openapi/openapi.json is the same.)"""

    def document_url(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/") + "/openapi.json"

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_document(principal: CurrentPrincipal) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request, principal: CurrentPrincipal) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=document_url(request), title=f"{app.title} - Swagger UI")

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request, principal: CurrentPrincipal) -> HTMLResponse:
        return get_redoc_html(openapi_url=document_url(request), title=f"{app.title} - ReDoc")


def redact_url(url: str) -> str:
    """Hide a password in a datasource URL before it reaches a log line."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url
