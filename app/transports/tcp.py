"""STOMP over raw TCP (optionally TLS): a thin asyncio Protocol between a socket and a broker Session."""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any, cast

from app.broker.broker import Broker
from app.broker.session import Session

__all__ = ["StompProtocol", "start_tcp_listener"]

log = logging.getLogger("stompgate.tcp")

# Write-buffer marks: above HIGH the socket is "backed up" (delivery loops pause), below LOW they resume.
WRITE_BUFFER_HIGH = 1024 * 1024
WRITE_BUFFER_LOW = 256 * 1024


class StompProtocol(asyncio.Protocol):
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.session: Session | None = None
        self.transport: asyncio.Transport | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._closed = False

    # ---- asyncio.Protocol ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport but provide the same methods.
        self.transport = cast(asyncio.Transport, transport)
        transport = self.transport
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH, low=WRITE_BUFFER_LOW)
        peer = transport.get_extra_info("peername")
        peer_text = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.session = self.broker.open_session(self, peer=peer_text, kind="tcp")
        if self.session is None:
            transport.write(_refusal(self.broker))
            transport.close()

    def data_received(self, data: bytes) -> None:
        if self.session is not None:
            self.broker.metrics.bytes_in("tcp", len(data))
            self.session.receive(data)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._writable.set()
        if self.session is not None:
            self.session.connection_lost()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # ---- the session's Transport ----

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self._closed:
            self.transport.write(data)

    def close(self) -> None:
        # asyncio's close() flushes what is buffered before closing: an ERROR reaches the client first.
        if self.transport is not None and not self._closed:
            self.transport.close()

    def pause_reading(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.resume_reading()

    def write_backlog(self) -> int:
        if self.transport is None or self._closed:
            return 0
        return self.transport.get_write_buffer_size()

    async def drained(self) -> None:
        await self._writable.wait()


def _refusal(broker: Broker) -> bytes:
    reason = b"the gateway is at max_connections" if broker.accepting else b"the gateway is shutting down"
    return (
        b"ERROR\nmessage:Connection refused\ncontent-type:text/plain\ncontent-length:"
        + str(len(reason)).encode()
        + b"\n\n"
        + reason
        + b"\x00\n"
    )


async def start_tcp_listener(
    broker: Broker, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None, backlog: int = 1024
) -> asyncio.base_events.Server:
    loop = asyncio.get_running_loop()
    server: Any = await loop.create_server(
        lambda: StompProtocol(broker), host, port, ssl=ssl_context, backlog=backlog, reuse_address=True
    )
    return server  # type: ignore[no-any-return]
