"""A small asyncio STOMP client for the load generator, built on :class:`stomp_core.ClientConnection`.

One :class:`BenchClient` is one TCP connection. It is an ``asyncio.Protocol`` (no stream reader/writer in the way):
``data_received`` feeds the sans-I/O connection, dispatches the events, then writes whatever the handlers queued
(ACKs, ...) in one ``transport.write``.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import Callable
from typing import Any, cast

from stomp_core import (
    ClientConnection,
    Connected,
    ErrorReceived,
    MessageReceived,
    ProtocolViolation,
    ReceiptReceived,
)

__all__ = ["BenchClient", "WebSocketBenchClient", "BenchClientError", "open_client"]


class BenchClientError(Exception):
    """The server sent ERROR, broke the protocol, or closed the connection."""


class BenchClient(asyncio.Protocol):
    def __init__(self) -> None:
        self.conn = ClientConnection()
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self._connected: asyncio.Future[Connected] = loop.create_future()
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self._writable = asyncio.Event()
        self._writable.set()
        self.closed = False
        self.error: str | None = None
        # Hot-path callbacks, set by producers and consumers.
        self.on_messages: Callable[[list[MessageReceived], int], None] | None = None
        self.on_receipts: Callable[[list[str]], None] | None = None
        self.on_failure: Callable[[str], None] | None = None

    # ---- asyncio.Protocol ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        events = self.conn.receive_data(data)
        messages: list[MessageReceived] = []
        receipts: list[str] = []
        for event in events:
            cls = type(event)
            if cls is MessageReceived:
                messages.append(event)  # type: ignore[arg-type]
            elif cls is ReceiptReceived:
                rid = cast(ReceiptReceived, event).receipt_id
                waiter = self._waiters.pop(rid, None)
                if waiter is not None:
                    if not waiter.done():
                        waiter.set_result(None)
                else:
                    receipts.append(rid)
            elif cls is Connected:
                if not self._connected.done():
                    self._connected.set_result(event)  # type: ignore[arg-type]
            elif cls is ErrorReceived:
                body = event.body.decode(errors="replace").strip()  # type: ignore[union-attr]
                self._fail(f"ERROR {event.message}: {body[:200]}".rstrip(": "))  # type: ignore[union-attr]
            elif cls is ProtocolViolation:
                self._fail(f"protocol violation from the server: {event.message}: {event.detail}")  # type: ignore[union-attr]
        if messages and self.on_messages is not None:
            self.on_messages(messages, now)
        if receipts and self.on_receipts is not None:
            self.on_receipts(receipts)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        by_us = self.closed
        self.closed = True
        self._writable.set()
        said_goodbye = self.conn.state.value == "closing" and not self._waiters
        if not by_us and not said_goodbye:
            self._fail(f"connection closed by the server{': ' + str(exc) if exc else ''}")

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # ---- helpers ----

    def _fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
        waiters: list[asyncio.Future[Any]] = [self._connected, *self._waiters.values()]
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(BenchClientError(self.error))
        self._waiters.clear()
        if self.on_failure is not None:
            self.on_failure(self.error)

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    async def drained(self) -> None:
        await self._writable.wait()

    def expect_receipt(self, receipt_id: str) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.error is not None:
            future.set_exception(BenchClientError(self.error))
        else:
            self._waiters[receipt_id] = future
        return future

    async def connected(self, timeout: float) -> Connected:
        return await asyncio.wait_for(asyncio.shield(self._connected), timeout)

    async def disconnect(self, timeout: float) -> None:
        """DISCONNECT with a receipt (so the server has handled everything before), then close the socket."""
        try:
            if self.error is None and not self.closed and self.conn.state.value == "open":
                waiter = self.expect_receipt("bench-bye")
                self.conn.disconnect(receipt="bench-bye")
                self.flush()
                await asyncio.wait_for(waiter, timeout)
        except (asyncio.TimeoutError, BenchClientError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()


class WebSocketBenchClient(BenchClient):
    """The same client over STOMP-over-WebSocket (``--transport websocket``): an HTTP upgrade to ``path`` offering the
    STOMP subprotocols, then every STOMP chunk one BINARY message each way. Kept as small as a TCP client so that one
    load generator can hold ten thousand of them: no WebSocket library per connection, the server's (unmasked)
    frames parsed here, and ours masked with an all-zero key (RFC 6455 wants a key, any key; the bench does not need
    the masking's protection against proxy cache poisoning, and XOR with zero leaves the payload as it is)."""

    def __init__(self, host: str, port: int, path: str) -> None:
        super().__init__()
        self._request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: v12.stomp, v11.stomp, v10.stomp\r\n\r\n"
        ).encode()
        self._upgraded = False
        self._in = bytearray()
        self._early = b""  # STOMP written before the server's 101: a client must wait for it (RFC 6455 4.1)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        cast(asyncio.Transport, transport).write(self._request)

    def data_received(self, data: bytes) -> None:
        buf = self._in
        buf += data
        if not self._upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[: buf.find(b"\r\n")])
            if not status.startswith(b"HTTP/1.1 101"):
                self._fail(f"the WebSocket upgrade was refused: {status.decode(errors='replace')}")
                self.close()
                return
            del buf[: end + 4]
            self._upgraded = True
            if self._early:
                self._send_frame(0x82, self._early)
                self._early = b""
        payload = bytearray()
        pos, size = 0, len(buf)
        while size - pos >= 2:
            first, second = buf[pos], buf[pos + 1]
            length, head = second & 0x7F, 2
            if length == 126:
                if size - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if size - pos < head + length:
                break
            opcode = first & 0x0F
            body = buf[pos + head : pos + head + length]
            pos += head + length
            if opcode in (0, 1, 2):
                payload += body
            elif opcode == 9:  # PING: answer with its payload
                self._send_frame(0x8A, bytes(body))
            # CLOSE: the server closes the TCP connection next (connection_lost); PONG and others: nothing to do
        del buf[:pos]
        if payload:
            super().data_received(bytes(payload))

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if not data:
            return
        if not self._upgraded:
            self._early += data
        elif self.transport is not None and not self.closed:
            self._send_frame(0x82, data)

    def _send_frame(self, first: int, data: bytes) -> None:
        length = len(data)
        if length < 126:
            head = bytes((first, 0x80 | length))
        elif length < 65536:
            head = bytes((first, 0x80 | 126)) + length.to_bytes(2, "big")
        else:
            head = bytes((first, 0x80 | 127)) + length.to_bytes(8, "big")
        if self.transport is not None and not self.closed:
            self.transport.writelines((head, b"\0\0\0\0", data))


async def open_client(
    host: str,
    port: int,
    *,
    version: str,
    vhost: str,
    login: str | None,
    passcode: str | None,
    timeout: float,
    websocket_path: str | None = None,
) -> BenchClient:
    """Connect over TCP (or, with ``websocket_path``, over WebSocket to that path) and exchange CONNECT/CONNECTED."""
    loop = asyncio.get_running_loop()
    factory: Callable[[], BenchClient] = BenchClient
    if websocket_path is not None:
        factory = lambda: WebSocketBenchClient(host, port, websocket_path)  # noqa: E731
    _, client = await asyncio.wait_for(loop.create_connection(factory, host, port), timeout)
    try:
        # A server over its connection limit may send ERROR and close before our CONNECT; then the failure is
        # already on the CONNECTED future, and awaiting it reports the server's reason.
        if client.error is None:
            client.conn.connect(host=vhost, login=login, passcode=passcode, accept_version=[version], heartbeat=(0, 0))
            client.flush()
        await client.connected(timeout)
    except BaseException:
        client.close()
        raise
    return client


def run_loop(main: Any, loop_kind: str) -> Any:
    """Run a coroutine on uvloop when asked (``uvloop``) or available (``auto``), else on the stock asyncio loop."""
    factory = None
    if loop_kind in ("auto", "uvloop"):
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            if loop_kind == "uvloop":
                raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
