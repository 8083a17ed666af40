"""A small asyncio STOMP client for the load generator, built on :class:`stomp_core.ClientConnection`.

One :class:`BenchClient` is one TCP connection. It is an ``asyncio.Protocol`` (no stream reader/writer in the way):
``data_received`` feeds the sans-I/O connection, dispatches the events, then writes whatever the handlers queued
(ACKs, ...) in one ``transport.write``.
"""

from __future__ import annotations

import asyncio
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

__all__ = ["BenchClient", "BenchClientError", "open_client"]


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


async def open_client(
    host: str,
    port: int,
    *,
    version: str,
    vhost: str,
    login: str | None,
    passcode: str | None,
    timeout: float,
) -> BenchClient:
    """Connect over TCP and exchange CONNECT/CONNECTED."""
    loop = asyncio.get_running_loop()
    _, client = await asyncio.wait_for(loop.create_connection(BenchClient, host, port), timeout)
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
