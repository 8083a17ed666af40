"""RFC 9457 problem details: every REST error, including 404, 405, 422 and unhandled ones, is
``application/problem+json`` with ``type``, ``title``, ``status``, ``detail`` and ``instance``."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from app.datasources.interface import DatasourceRefused, DatasourceUnavailable

__all__ = [
    "PROBLEM_JSON",
    "Problem",
    "ProblemError",
    "problem_document",
    "invalid_http_response",
    "problem_responses",
    "install_error_handlers",
    "problem_openapi",
]

log = logging.getLogger("stompgate.api")

PROBLEM_JSON = "application/problem+json"
_TYPE_PREFIX = "urn:stompgate:problem:"
RETRY_AFTER_SECONDS = "5"  # what a 503 asks clients to wait before retrying


class Problem(BaseModel):
    """An RFC 9457 problem document. ``type`` names the kind of problem; ``detail`` explains this occurrence."""

    model_config = ConfigDict(extra="allow")

    type: str = Field("about:blank", description="A URI naming the kind of problem, e.g. urn:stompgate:problem:invalid-destination.")
    title: str = Field(description="A short summary of the kind of problem; the same for every occurrence.")
    status: int = Field(description="The HTTP status code.")
    detail: str = Field(description="What went wrong this time, in one sentence.")
    instance: str = Field(description="The request path that failed.")


class ProblemError(Exception):
    """Raise from a route to answer with a problem document."""

    def __init__(
        self, status: int, slug: str, detail: str, *, title: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.detail = detail
        self.title = title or HTTPStatus(status).phrase
        self.headers = dict(headers or {})


def problem_document(
    status: int, detail: str, *, instance: str | None, slug: str | None = None, title: str | None = None
) -> dict[str, Any]:
    """The problem document's members; ``instance`` is left out only when no request path is known."""
    body: dict[str, Any] = {
        "type": _TYPE_PREFIX + slug if slug else "about:blank",
        "title": title or _phrase(status),
        "status": status,
        "detail": detail,
    }
    if instance is not None:
        body["instance"] = instance
    return body


def problem_response(
    request: Request,
    status: int,
    detail: str,
    *,
    slug: str | None = None,
    title: str | None = None,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> JSONResponse:
    body = problem_document(status, detail, instance=request.url.path, slug=slug, title=title)
    if extra:
        body.update(jsonable_encoder(extra))
    return JSONResponse(body, status_code=status, headers=dict(headers or {}), media_type=PROBLEM_JSON)


INVALID_HTTP_DETAIL = (
    "the request is not valid HTTP/1.1: check the request line, header names and values (no control bytes), "
    "Content-Length and chunked encoding"
)


def invalid_http_response(target: bytes, default_headers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    """A whole HTTP/1.1 400 answer, as bytes, for a request the server's HTTP parser refused before any route saw
    it (uvicorn would answer text/plain). ``target`` is the request target read so far (empty if none)."""
    path = target.split(b"?", 1)[0].decode("latin-1")
    document = problem_document(
        400, INVALID_HTTP_DETAIL, instance=path if path.startswith("/") else None, slug="invalid-http", title="Bad Request"
    )
    body = json.dumps(document).encode()  # ASCII-only: whatever bytes the target held arrive escaped
    head = [b"HTTP/1.1 400 Bad Request"]
    head += [name + b": " + value for name, value in default_headers]
    head += [
        b"content-type: " + PROBLEM_JSON.encode(),
        b"content-length: " + str(len(body)).encode(),
        b"connection: close",
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


async def _on_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProblemError)
    return problem_response(request, exc.status, exc.detail, slug=exc.slug, title=exc.title, headers=exc.headers)


async def _on_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else _phrase(exc.status_code)
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no route matches {request.url.path}"
    headers = exc.headers
    if exc.status_code == 405:
        allowed = _allowed_methods(request)
        detail = f"{request.method} is not allowed on {request.url.path}; {', '.join(allowed)} {'is' if len(allowed) == 1 else 'are'}"
        headers = {**(headers or {}), "Allow": ", ".join(allowed)}
    return problem_response(request, exc.status_code, detail, headers=headers)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route takes on this path. Starlette's own ``Allow`` names only the first route whose path
    matches, and each method of a path is a route of its own here (GET and POST on a destination, say). Routers
    included in the app nest, so each method is asked of the whole tree through ``matches``."""
    routes = request.app.router.routes
    allowed = []
    for method in _METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] is Match.FULL for route in routes):
            allowed.append(method)
    return allowed


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": [str(part) for part in error.get("loc", ())], "msg": str(error.get("msg", "")), "type": str(error.get("type", ""))}
        for error in exc.errors()
    ]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(first["loc"])
    return problem_response(
        request, 422, f"{where}: {first['msg']}" if where else str(first["msg"]), slug="validation", title="Invalid request",
        extra={"errors": errors},
    )  # fmt: skip


async def _on_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("%s %s: datasource unavailable: %s", request.method, request.url.path, exc)
    return problem_response(
        request, 503, f"the datasource is unavailable: {exc}", slug="datasource-unavailable", title="Datasource unavailable",
        headers={"Retry-After": RETRY_AFTER_SECONDS},
    )  # fmt: skip


async def _on_refused(request: Request, exc: Exception) -> JSONResponse:
    return problem_response(request, 409, str(exc), slug="refused", title="Refused by the datasource")


async def _on_client_disconnect(request: Request, exc: Exception) -> JSONResponse:
    """The client left before sending its whole body: its doing, so one log line, no traceback. The answer
    reaches no one but keeps the ASGI cycle complete."""
    log.info("%s %s: the client left before sending the whole request", request.method, request.url.path)
    return problem_response(request, 400, "the client closed the connection before sending the whole request",
                            slug="incomplete-request", title="Incomplete request")  # fmt: skip


async def _on_unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s: %r", request.method, request.url.path, exc, exc_info=exc)
    return problem_response(request, 500, "the gateway failed unexpectedly; its log says why", slug="internal")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ProblemError, _on_problem)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(DatasourceUnavailable, _on_unavailable)
    app.add_exception_handler(DatasourceRefused, _on_refused)
    app.add_exception_handler(ClientDisconnect, _on_client_disconnect)
    app.add_exception_handler(Exception, _on_unhandled)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for a route: each status answers with a Problem (moved to problem+json by
    :func:`problem_openapi`)."""
    return {status: {"model": Problem, "description": _phrase(status)} for status in statuses}


def problem_openapi(spec: dict[str, Any]) -> dict[str, Any]:
    """Document every 4xx/5xx response as ``application/problem+json`` with the Problem schema (FastAPI would say
    ``application/json`` and, for 422, its own HTTPValidationError)."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    if "Problem" not in schemas:
        schemas["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    ref = {"$ref": "#/components/schemas/Problem"}
    for path_item in spec.get("paths", {}).values():
        for operation in path_item.values():
            responses = operation.get("responses", {})
            for status, response in responses.items():
                if status.isdigit() and int(status) >= 400:
                    response["content"] = {PROBLEM_JSON: {"schema": ref}}
            if operation.get("parameters") or operation.get("requestBody"):
                responses.setdefault("422", {"description": "Invalid request", "content": {PROBLEM_JSON: {"schema": ref}}})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return spec
