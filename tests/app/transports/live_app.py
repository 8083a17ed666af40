"""Run the real app (``create_app`` plus routers not yet included by ``app.main``) under uvicorn in a thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import APIRouter, FastAPI

from app.cli import server_options
from app.main import create_app
from app.settings import Settings
from tests.gateway_process import free_port

__all__ = ["LiveApp", "live_app"]


@dataclass
class LiveApp:
    app: FastAPI
    http_port: int
    stomp_port: int
    server: uvicorn.Server | None = None  # its server_state: the connections uvicorn tracks

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.http_port}"


def _include(app: FastAPI, routers: Sequence[APIRouter]) -> None:
    """Add routers unless ``app.main`` already serves their paths (once the lead includes them there)."""
    served = {getattr(route, "path", None) for route in app.router.routes}
    for router in routers:
        if not any(getattr(route, "path", None) in served for route in router.routes):
            app.include_router(router)


@contextmanager
def live_app(
    tmp_path: Path, routers: Sequence[APIRouter] = (), extra_routers: Sequence[APIRouter] = (), **overrides: object
) -> Iterator[LiveApp]:
    """The gateway on free loopback ports, stopped (lifespan shutdown included) on exit."""
    http_port, stomp_port = free_port(), free_port()
    settings = Settings(
        host="127.0.0.1",
        http_port=http_port,
        stomp_port=stomp_port,
        store=f"sqlite:///{tmp_path}/live.db",
        **overrides,  # type: ignore[arg-type]
    )
    app = create_app(settings)
    _include(app, routers)
    for router in extra_routers:
        app.include_router(router)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=http_port,
        lifespan="on",
        log_level="warning",
        timeout_graceful_shutdown=5,
        **server_options(settings),  # the HTTP protocol and WebSocket limits `stompgate serve` runs with
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn :{http_port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(10)
            raise RuntimeError("the test gateway did not start")
        time.sleep(0.02)
    try:
        yield LiveApp(app, http_port, stomp_port, server)
    finally:
        server.should_exit = True
        thread.join(20)
        if thread.is_alive():
            raise RuntimeError("the test gateway did not stop")
