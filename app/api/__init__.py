"""The REST API: publish and inspect destinations, connections and subscriptions; readiness and Prometheus metrics.

``install(app)`` adds the routes, the RFC 9457 problem handlers, the per-app rate sampler and the problem-aware
OpenAPI document to a FastAPI app made by ``app.main.create_app``. It is idempotent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI

from app.api import connections, destinations, operations
from app.api.errors import install_error_handlers, problem_openapi
from app.api.models import JSON_OBJECT_SCHEMA, PublishEnvelope
from app.api.rates import RateTracker
from app.broker.auth import AllowAll

__all__ = ["router", "install"]

log = logging.getLogger("stompgate.api")

router = APIRouter()
router.include_router(destinations.router)
router.include_router(connections.router)
router.include_router(operations.router)

_INSTALLED = "stompgate_api_installed"


def install(app: FastAPI) -> None:
    if getattr(app.state, _INSTALLED, False):
        return
    setattr(app.state, _INSTALLED, True)
    install_error_handlers(app)
    app.include_router(router)
    app.router.lifespan_context = _with_api_state(app.router.lifespan_context)
    _problem_aware_openapi(app)


def _with_api_state(
    inner: Callable[[Any], AbstractAsyncContextManager[Any]],
) -> Callable[[Any], AbstractAsyncContextManager[Any]]:
    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
        async with inner(app) as inner_state:
            state = dict(inner_state or {})
            broker = state["broker"]
            settings = state.get("settings")
            if settings is not None and settings.users_file is not None and isinstance(broker.authorizer, AllowAll):
                # Fail closed: a configured users file is never silently ignored.
                from app.security import load_authorizer

                log.warning("the broker was built without the configured authorizer; installing it from users_file")
                broker.authorizer = load_authorizer(settings)
            tracker = RateTracker()
            sampler = asyncio.get_running_loop().create_task(tracker.run(broker.metrics.registry), name="rate sampler")
            state["rates"] = tracker
            try:
                yield state
            finally:
                sampler.cancel()
                await asyncio.gather(sampler, return_exceptions=True)

    return lifespan


def _problem_aware_openapi(app: FastAPI) -> None:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        spec = generate()
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        if "PublishEnvelope" not in schemas:
            schemas["PublishEnvelope"] = PublishEnvelope.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.setdefault("JsonObject", dict(JSON_OBJECT_SCHEMA))
        return problem_openapi(spec)

    app.openapi = openapi  # type: ignore[method-assign]
