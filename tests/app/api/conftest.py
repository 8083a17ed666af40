"""The app from ``create_app`` with the API installed, its lifespan running, and an httpx client on it (no network)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.api import install
from app.broker.broker import Broker
from app.main import create_app
from app.settings import Settings

__all__ = ["Api", "api_client", "api"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


@dataclass
class Api:
    app: FastAPI
    state: dict[str, Any]
    client: httpx.AsyncClient

    @property
    def broker(self) -> Broker:
        broker: Broker = self.state["broker"]
        return broker


@asynccontextmanager
async def api_client(raise_app_exceptions: bool = True, **settings: Any) -> AsyncIterator[Api]:
    """``httpx.ASGITransport`` does not run the lifespan, so run it here and hand its state to every request, as a
    server would."""
    app = create_app(Settings(**{"store": "memory://", "stomp_port": 0, **settings}))
    install(app)
    async with app.router.lifespan_context(app) as state:
        state = dict(state)

        async def with_state(scope: Scope, receive: Receive, send: Send) -> None:
            scope["state"] = dict(state)
            await app(scope, receive, send)

        transport = httpx.ASGITransport(app=with_state, raise_app_exceptions=raise_app_exceptions)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield Api(app, state, client)


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    async with api_client() as value:
        yield value
