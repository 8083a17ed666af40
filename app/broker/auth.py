"""Who may connect and what they may read or write. The broker asks; configuration answers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["Principal", "Authorizer", "AllowAll", "ANONYMOUS"]


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    roles: frozenset[str] = frozenset()


ANONYMOUS = Principal("anonymous", frozenset({"admin"}))


class Authorizer(Protocol):
    def authenticate(self, login: str | None, passcode: str | None) -> Principal | None:
        """The principal for these credentials, or None when they are wrong."""

    def can_read(self, principal: Principal, destination: str) -> bool: ...

    def can_write(self, principal: Principal, destination: str) -> bool: ...


class AllowAll:
    """No users configured: everyone is anonymous and may do anything (only allowed on loopback by the CLI)."""

    def authenticate(self, login: str | None, passcode: str | None) -> Principal | None:
        return ANONYMOUS if not login else Principal(login, frozenset({"admin"}))

    def can_read(self, principal: Principal, destination: str) -> bool:
        return True

    def can_write(self, principal: Principal, destination: str) -> bool:
        return True
