"""Who is calling: ``Authorization: Bearer <token>`` checked against the broker's authorizer.

With no users configured (``AllowAll``) every caller is the anonymous admin. Otherwise a missing or wrong token is a
401 problem with ``WWW-Authenticate: Bearer``, a principal lacking a permission gets a 403 problem, and a token that
could not be checked because the authorizer's budget of bcrypt checks is spent gets a 503 with ``Retry-After``.
Besides the API, ``/metrics`` (``metrics`` or ``admin`` role), the API documents (any user) and the console's API
(``admin``) use these dependencies.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.api.errors import ProblemError
from app.broker.auth import AllowAll, LoginChecksBusy, Principal, is_admin
from app.broker.broker import Broker

__all__ = [
    "bearer", "current_principal", "require_admin", "require_metrics", "CurrentPrincipal", "AdminPrincipal",
    "MetricsPrincipal", "METRICS_ROLE", "check_read", "check_write",
]  # fmt: skip

# The role that may scrape /metrics and nothing else, so a Prometheus token cannot read or write messages.
METRICS_ROLE = "metrics"
BUSY_RETRY_AFTER_SECONDS = "1"  # the budget of bcrypt checks refills continuously: a second is enough

bearer = HTTPBearer(auto_error=False, description="A token listed (hashed) for a user in the users file.")


def broker_of(request: Request) -> Broker:
    broker: Broker = request.state.broker
    return broker


async def current_principal(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Principal:
    authorizer = broker_of(request).authorizer
    if isinstance(authorizer, AllowAll):
        return authorizer.authenticate_token(None, "")  # type: ignore[return-value]
    check = getattr(authorizer, "authenticate_token", None)
    token = credentials.credentials if credentials is not None else None
    peer = request.client.host if request.client else "unknown"
    principal: Principal | None = None
    if check is not None and token:
        try:
            principal = await run_in_threadpool(check, token, peer)  # bcrypt is slow: keep it off the event loop
        except LoginChecksBusy as exc:
            raise ProblemError(
                503, "login-checks-busy", str(exc), title="Login checks busy", headers={"Retry-After": BUSY_RETRY_AFTER_SECONDS}
            ) from None
    if principal is None:
        raise ProblemError(
            401,
            "unauthorized",
            "a valid bearer token is required (Authorization: Bearer <token>)" if token is None else "the bearer token is not accepted",
            headers={"WWW-Authenticate": 'Bearer realm="stompgate"'},
        )
    return principal


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


async def require_admin(principal: CurrentPrincipal) -> Principal:
    if not is_admin(principal):
        raise ProblemError(403, "forbidden", f"user {principal.name!r} lacks the admin role")
    return principal


AdminPrincipal = Annotated[Principal, Depends(require_admin)]


async def require_metrics(principal: CurrentPrincipal) -> Principal:
    if not (is_admin(principal) or METRICS_ROLE in principal.roles):
        raise ProblemError(403, "forbidden", f"user {principal.name!r} lacks the {METRICS_ROLE} or admin role")
    return principal


MetricsPrincipal = Annotated[Principal, Depends(require_metrics)]


def check_read(request: Request, principal: Principal, destination: str) -> None:
    if not broker_of(request).authorizer.can_read(principal, destination):
        raise ProblemError(403, "forbidden", f"user {principal.name!r} may not read {destination}")


def check_write(request: Request, principal: Principal, destination: str) -> None:
    if not broker_of(request).authorizer.can_write(principal, destination):
        raise ProblemError(403, "forbidden", f"user {principal.name!r} may not write to {destination}")
