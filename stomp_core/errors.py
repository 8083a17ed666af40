"""Two kinds of failure: the peer broke the protocol, or our own code misused the API."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["ProtocolError", "LimitExceeded", "UsageError"]


class ProtocolError(Exception):
    """The peer sent something STOMP does not allow. Becomes an ERROR frame (then close); never escapes
    ``receive_data``: the connection turns it into a ``ProtocolViolation`` event."""

    def __init__(
        self,
        message: str,
        detail: str = "",
        *,
        receipt_id: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.receipt_id = receipt_id
        # extra headers for the ERROR frame (for example ``version`` on a version mismatch)
        self.headers: Mapping[str, str] = headers or {}


class LimitExceeded(ProtocolError):
    """A named limit (frame size, header count, ...) was crossed; the message names the limit."""


class UsageError(Exception):
    """Our own code called the API wrongly (for example sent MESSAGE before CONNECTED). A bug, never the peer's fault."""
