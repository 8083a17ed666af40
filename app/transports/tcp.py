"""STOMP over raw TCP (optionally TLS): a thin asyncio Protocol between a socket and a broker Session."""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any, cast

from app.broker.broker import Broker, Refusal
from app.broker.session import Session

__all__ = ["StompProtocol", "refusal_frame", "start_tcp_listener"]

log = logging.getLogger("stompgate.tcp")

# Write-buffer marks: above HIGH the socket is "backed up" (delivery loops pause), below LOW they resume.
WRITE_BUFFER_HIGH = 1024 * 1024
WRITE_BUFFER_LOW = 256 * 1024
# Seconds a connection we closed (after an ERROR or a DISCONNECT's RECEIPT) waits for the client to close its side.
CLOSE_LINGER = 2.0


class StompProtocol(asyncio.Protocol):
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.session: Session | None = None
        self.transport: asyncio.Transport | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._closed = False
        self._lingering = False  # half-closed after an ERROR or DISCONNECT: discarding input until the client closes

    # ---- asyncio.Protocol ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport but provide the same methods.
        self.transport = cast(asyncio.Transport, transport)
        transport = self.transport
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH, low=WRITE_BUFFER_LOW)
        peer = transport.get_extra_info("peername")
        peer_text = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        address = str(peer[0]) if isinstance(peer, tuple) else None
        self.session = self.broker.open_session(self, peer=peer_text, kind="tcp", address=address)
        if self.session is None:
            transport.write(refusal_frame(self.broker.refusal(address)))
            self.close()

    def data_received(self, data: bytes) -> None:
        if self.session is not None and not self._lingering:
            self.broker.metrics.bytes_in("tcp", len(data))
            self.session.receive(data)

    def eof_received(self) -> bool | None:
        return None  # close our side too (this also ends a lingering close at once)

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
        if self.transport is not None and not self._closed and not self._lingering:
            self.transport.write(data)

    def writelines(self, chunks: list[bytes]) -> None:
        if self.transport is not None and not self._closed and not self._lingering:
            self.transport.writelines(chunks)

    def close(self) -> None:
        """Close after what is buffered (an ERROR) reached the client. Closing a socket with unread input makes the
        kernel send RST, which can destroy the ERROR still in flight to the client (rabbitmq-server#6737), so we
        half-close (FIN after the buffer), keep reading and discarding, and close once the client closes its side;
        after ``CLOSE_LINGER`` seconds the socket is aborted whatever is still buffered."""
        transport = self.transport
        if transport is None or self._closed or self._lingering:
            return
        self._lingering = True  # nothing more reaches the session: input from now on is discarded
        try:
            if transport.can_write_eof():
                transport.write_eof()
                transport.resume_reading()
            else:  # TLS cannot half-close: flush and close
                transport.close()
        except OSError:  # the peer is already gone (ENOTCONN): nothing can reach it
            transport.abort()
            return
        # A client that neither reads nor closes would keep the socket (and its write buffer) forever, since close()
        # waits for the buffer to drain: after the linger it is aborted.
        asyncio.get_running_loop().call_later(CLOSE_LINGER, transport.abort)

    def pause_reading(self) -> None:
        if self.transport is not None and not self._closed and not self._lingering:
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


def refusal_frame(refusal: Refusal | None) -> bytes:
    """The ERROR frame for a connection the broker refused (TCP and WebSocket send the same one). Written by hand,
    as no session (hence no STOMP version) exists: the broker's texts hold no ':' or EOL that would need escaping."""
    message, detail = (refusal.message, refusal.detail) if refusal is not None else ("Connection refused", "")
    reason = detail.encode()
    return (
        b"ERROR\nmessage:"
        + message.encode()
        + b"\ncontent-type:text/plain\ncontent-length:"
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
