"""STOMP over WebSocket: a thin adapter between a FastAPI WebSocket route and a broker Session.

WebSocket messages are only a carrier: their bytes go to the session's incremental parser, so a frame may span
several messages, one message may hold several frames, and a message holding only an EOL is a heart-beat. Outgoing
chunks leave in order through one sender task; each is a TEXT message when it is valid UTF-8 and BINARY otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect

from app.broker.broker import Broker
from app.broker.session import Session
from app.transports.tcp import refusal_frame

__all__ = ["router", "WebSocketTransport", "choose_subprotocol", "SUBPROTOCOLS"]

log = logging.getLogger("stompgate.websocket")

router = APIRouter(tags=["stomp"])

# Offered STOMP subprotocols we understand, most preferred first (the STOMP CONNECT still negotiates the version).
SUBPROTOCOLS = ("v12.stomp", "v11.stomp", "v10.stomp")

# Outgoing-queue marks, as for TCP: above HIGH delivery loops wait on drained(), which returns below LOW.
WRITE_BUFFER_HIGH = 1024 * 1024
WRITE_BUFFER_LOW = 256 * 1024

# Seconds to wait for the client's answer to our close frame before the route gives up on it.
CLOSE_HANDSHAKE_TIMEOUT = 5.0

CLOSE_NORMAL = 1000
CLOSE_INVALID_DATA = 1007  # a TEXT message that is not UTF-8 (ASGI servers usually catch this first)
CLOSE_TRY_AGAIN_LATER = 1013  # the broker refused the session: at a connection limit or stopping


def choose_subprotocol(offered: Sequence[str]) -> str | None:
    """Exactly one of the offered STOMP subprotocols, the highest; None when the client offered none."""
    for candidate in SUBPROTOCOLS:
        if candidate in offered:
            return candidate
    return None


class WebSocketTransport:
    """The session's ``Transport`` over one WebSocket: an ordered outgoing queue drained by ``run_sender``."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self._outgoing: deque[bytes] = deque()
        self._backlog = 0
        self._wake = asyncio.Event()
        self._below_low = asyncio.Event()
        self._below_low.set()
        self.reading = asyncio.Event()  # cleared while the session asks us to stop reading
        self.reading.set()
        self.closing = False  # the session asked to close: flush, then close the WebSocket
        self.closed = False  # nothing more can be sent

    # ---- the session's Transport ----

    def write(self, data: bytes) -> None:
        if self.closed or self.closing or not data:
            return
        self._outgoing.append(data)
        self._backlog += len(data)
        if self._backlog > WRITE_BUFFER_HIGH:
            self._below_low.clear()
        self._wake.set()

    def close(self) -> None:
        self.closing = True
        self._wake.set()

    def pause_reading(self) -> None:
        self.reading.clear()

    def resume_reading(self) -> None:
        self.reading.set()

    def write_backlog(self) -> int:
        return 0 if self.closed else self._backlog

    async def drained(self) -> None:
        await self._below_low.wait()

    # ---- the sender task ----

    async def run_sender(self, close_code: int = CLOSE_NORMAL) -> None:
        """Send queued chunks in order; once ``close()`` was called and the queue is empty, close the WebSocket."""
        try:
            while True:
                while self._outgoing:
                    chunk = self._outgoing[0]
                    await self._send(chunk)
                    self._outgoing.popleft()
                    self._backlog -= len(chunk)
                    if self._backlog <= WRITE_BUFFER_LOW:
                        self._below_low.set()
                if self.closing:
                    await self.websocket.close(close_code)
                    return
                self._wake.clear()
                await self._wake.wait()
        except (WebSocketDisconnect, OSError, RuntimeError) as exc:
            # The peer is gone (or the socket already closed): nothing more can leave.
            log.debug("websocket send ended: %r", exc)
        finally:
            self._finish()

    def _finish(self) -> None:
        self.closed = True
        self._outgoing.clear()
        self._backlog = 0
        self._below_low.set()  # never leave a delivery loop waiting on a dead socket
        self.reading.set()

    async def _send(self, chunk: bytes) -> None:
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError:
            await self.websocket.send_bytes(chunk)
        else:
            await self.websocket.send_text(text)


def _peer(websocket: WebSocket) -> str:
    client = websocket.client
    return f"{client.host}:{client.port}" if client is not None else "unknown"


def _address(websocket: WebSocket) -> str | None:
    client = websocket.client
    return client.host if client is not None else None


async def _read(websocket: WebSocket, transport: WebSocketTransport, session: Session, broker: Broker) -> None:
    """Feed every received message to the session until the client disconnects.

    Before CONNECTED the peer is a stranger: as on TCP, where the parser holds at most
    ``max_frame_bytes_before_connect`` of it, all it sends before then may add up to that much, however it is split
    into messages (heart-beat EOLs included, which the parser would not hold but the WebSocket layer did)."""
    pre_login_limit = broker.config.limits.max_frame_bytes_before_connect
    pre_login_bytes = 0
    while True:
        await transport.reading.wait()
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        data: bytes | None = message.get("bytes")
        if data is None:
            text: str | None = message.get("text")
            if text is None:
                continue
            data = text.encode("utf-8")
        broker.metrics.bytes_in("websocket", len(data))
        if not session.connected and not session.finished:
            pre_login_bytes += len(data)
            if pre_login_bytes > pre_login_limit:
                # Keep reading (and dropping) until the client answers our close: returning now would cancel the
                # sender before the ERROR is out.
                session.close_with_error(
                    f"Too much data before CONNECTED (limit max_frame_bytes_before_connect={pre_login_limit})",
                    f"{pre_login_bytes} bytes arrived before the session was CONNECTED; at most {pre_login_limit} may",
                )
                continue
        session.receive(data)


@router.websocket("/stomp")
@router.websocket("/ws")
async def stomp_over_websocket(websocket: WebSocket) -> None:
    """STOMP 1.0/1.1/1.2 over WebSocket (subprotocols v12.stomp, v11.stomp, v10.stomp)."""
    broker: Broker = websocket.state.broker
    await websocket.accept(subprotocol=choose_subprotocol(websocket.scope.get("subprotocols", [])))
    transport = WebSocketTransport(websocket)
    address = _address(websocket)
    session = broker.open_session(transport, peer=_peer(websocket), kind="websocket", address=address)
    if session is None:
        transport.write(refusal_frame(broker.refusal(address)))
        transport.close()
        await transport.run_sender(CLOSE_TRY_AGAIN_LATER)
        return

    sender = asyncio.create_task(transport.run_sender(), name=f"websocket sender {session.id}")
    reader = asyncio.create_task(_read(websocket, transport, session, broker), name=f"websocket reader {session.id}")
    try:
        done, _ = await asyncio.wait({sender, reader}, return_when=asyncio.FIRST_COMPLETED)
        if sender in done and not reader.done():
            # We closed (ERROR, DISCONNECT, shutdown): give the client a moment to answer the close frame.
            await asyncio.wait({reader}, timeout=CLOSE_HANDSHAKE_TIMEOUT)
    finally:
        session.connection_lost()
        for task in (reader, sender):
            if not task.done():
                task.cancel()
        for task in (reader, sender):
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, OSError, RuntimeError):
                await task
