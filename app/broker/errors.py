"""The error a client's frame earns when it breaks a broker-level rule."""

from __future__ import annotations

__all__ = ["SessionError"]


class SessionError(Exception):
    """A broker-level rule was broken by the client: becomes an ERROR frame, then close."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
