"""Who may connect and what they may read or write. The broker asks; configuration answers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "Principal", "Authorizer", "TokenAuthorizer", "AllowAll", "LoginChecksBusy", "ANONYMOUS", "ADMIN_ROLE", "is_admin",
]  # fmt: skip

# The role that may do anything: read and write every destination, purge queues, list connections.
ADMIN_ROLE = "admin"


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    roles: frozenset[str] = frozenset()


ANONYMOUS = Principal("anonymous", frozenset({ADMIN_ROLE}))


class LoginChecksBusy(Exception):
    """``authenticate_token`` refused to check a token because the budget of slow checks is spent: try again soon.
    Nothing was learnt about the token (REST answers 503, not 401)."""


class Authorizer(Protocol):
    def authenticate(self, login: str | None, passcode: str | None, *, peer: str | None = None) -> Principal | None:
        """The principal for these credentials, or None when they are wrong. ``peer`` is the transport's peer
        (``host:port``, as sessions log it): failed logins are throttled per login and client address. Thread-safe:
        it may run in a worker thread when ``needs_slow_check`` says so."""

    def needs_slow_check(self, login: str | None, passcode: str | None, *, peer: str | None = None) -> bool:
        """True when ``authenticate`` would spend real time (a bcrypt hash, also for an unknown user, so that its
        refusal takes as long), so the session runs it off the event loop; False when it answers at once (no
        login, locked out, credentials verified before)."""

    def can_read(self, principal: Principal, destination: str) -> bool: ...

    def can_write(self, principal: Principal, destination: str) -> bool: ...


class TokenAuthorizer(Authorizer, Protocol):
    """An authorizer that also accepts REST bearer tokens; ``peer`` (the client address) keys failed-login throttling."""

    def authenticate_token(self, token: str | None, peer: str) -> Principal | None:
        """The principal whose token this is, or None. May raise LoginChecksBusy."""


def is_admin(principal: Principal) -> bool:
    return ADMIN_ROLE in principal.roles


class AllowAll:
    """No users configured: everyone is anonymous and may do anything (only allowed on loopback by the CLI)."""

    def authenticate(self, login: str | None, passcode: str | None, *, peer: str | None = None) -> Principal | None:
        return ANONYMOUS if not login else Principal(login, frozenset({ADMIN_ROLE}))

    def needs_slow_check(self, login: str | None, passcode: str | None, *, peer: str | None = None) -> bool:
        return False

    def authenticate_token(self, token: str | None, peer: str) -> Principal | None:
        return ANONYMOUS

    def can_read(self, principal: Principal, destination: str) -> bool:
        return True

    def can_write(self, principal: Principal, destination: str) -> bool:
        return True
