"""STOMP over WebSocket as uvicorn's WebSocket protocol class: the STOMP paths (``/stomp``, ``/ws``) are served right
here, on the connection's asyncio Protocol, with websockets' sans-I/O ``ServerProtocol`` for the framing; any other
WebSocket path goes to uvicorn's own implementation and the ASGI app, as before.

Why not an ASGI route (as the first builds had): through ASGI an idle connection held two tasks, the app's whole middleware
and routing stack of suspended coroutines, a scope with a copy of every request header, an ``asyncio.Queue`` and
half a dozen events: 47 KiB each, measured with 2,000 idle connections (docs/benchmarks.md). Here a connection is
this object, the session and the framing state, like a raw TCP connection, so one gateway holds ten thousand
browsers. What the route did, this does the same way: the subprotocol choice (``choose_subprotocol``), the refusal
(ERROR, then close 1013), the limit on what a stranger may send before CONNECTED, TEXT or BINARY per outgoing chunk,
close 1000 after an ERROR or a DISCONNECT's RECEIPT with the client given ``CLOSE_HANDSHAKE_TIMEOUT`` to answer,
keepalive pings at uvicorn's ``ws_ping_interval``, and close 1012 when the server shuts down.

Every WebSocket message is only a carrier: its bytes (a TEXT message's once checked to be UTF-8) go to the session's
incremental parser, so a STOMP frame may span messages and a message may hold several frames.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import os
import struct
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import unquote

from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from app.broker.broker import Broker
from app.broker.session import Session
from app.transports.tcp import WRITE_BUFFER_HIGH, WRITE_BUFFER_LOW, refusal_frame

__all__ = ["StompWebSocketProtocol", "stomp_websocket_protocol", "choose_subprotocol", "STOMP_PATHS", "SUBPROTOCOLS"]

log = logging.getLogger("stompgate.websocket")

STOMP_PATHS = frozenset({"/stomp", "/ws"})
# Offered STOMP subprotocols we understand, most preferred first (the STOMP CONNECT still negotiates the version).
SUBPROTOCOLS = ("v12.stomp", "v11.stomp", "v10.stomp")
# Seconds to wait for the client's answer to our close frame before the connection is aborted.
CLOSE_HANDSHAKE_TIMEOUT = 5.0

CLOSE_NORMAL = 1000
CLOSE_INVALID_DATA = 1007  # a TEXT message that is not UTF-8
CLOSE_GOING_AWAY_RESTART = 1012  # the server restarts: try again later (as uvicorn's own implementation sends)
CLOSE_TRY_AGAIN_LATER = 1013  # the broker refused the session: at a connection limit or stopping


def choose_subprotocol(offered: Sequence[str]) -> str | None:
    """Exactly one of the offered STOMP subprotocols, the highest; None when the client offered none."""
    for candidate in SUBPROTOCOLS:
        if candidate in offered:
            return candidate
    return None
_FIN_TEXT, _FIN_BINARY, _FIN_PONG = 0x81, 0x82, 0x8A


def _is_utf8(data: bytes) -> bool:
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _frame_head(first: int, length: int) -> bytes:
    """A server frame's header (servers do not mask): FIN and opcode, then the payload length, RFC 6455 5.2."""
    if length < 126:
        return bytes((first, length))
    if length < 65536:
        return struct.pack("!BBH", first, 126, length)
    return struct.pack("!BBQ", first, 127, length)


def _select_subprotocol(_conn: ServerProtocol, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    chosen = choose_subprotocol(offered)
    return None if chosen is None else Subprotocol(chosen)


def stomp_websocket_protocol(fallback: type[asyncio.Protocol]) -> type[StompWebSocketProtocol]:
    """The class uvicorn's ``ws`` option takes: STOMP paths here, others to ``fallback`` (uvicorn's own)."""
    return type("StompWebSocketProtocolFor" + fallback.__name__, (StompWebSocketProtocol,), {"fallback": fallback})


class StompWebSocketProtocol(asyncio.Protocol):
    fallback: type[asyncio.Protocol]

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any], _loop: Any = None) -> None:
        self._config = config
        self._server_state = server_state
        self._app_state = app_state
        self.conn = ServerProtocol(
            max_size=config.ws_max_size,
            select_subprotocol=_select_subprotocol,
            logger=log,
        )
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.broker: Broker | None = None
        self._handshake: bytearray | None = bytearray()  # the upgrade request as received, until it is parsed
        self._text: Any = None  # an incremental UTF-8 decoder while a fragmented TEXT message arrives
        self._pre_login_bytes = 0
        self._closing = False  # our close frame is out (or the connection is going): nothing more is sent
        self._closed = False  # connection_lost
        self._writable: asyncio.Future[None] | None = None  # set while the socket's write buffer is over HIGH
        self._timer: asyncio.TimerHandle | None = None  # the next keepalive ping, or the close handshake's deadline
        self._ping: bytes | None = None  # the payload of the ping awaiting its pong
        self._reading_paused = False  # the session stopped reading (work in flight): a pong would wait unread
        # Another path's protocol (uvicorn's): every event goes on to it. uvicorn's HTTP protocol sets this object as
        # the transport's protocol after our data_received returns, undoing our set_protocol, so we forward.
        self._other: asyncio.Protocol | None = None

    # ---- asyncio.Protocol ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._server_state.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._other is not None:
            self._other.connection_lost(exc)
            return
        self._closed = self._closing = True
        self._server_state.connections.discard(self)
        self._cancel_timer()
        self._wake_writers()
        if self.session is not None:
            self.session.connection_lost()

    def eof_received(self) -> bool | None:
        if self._other is not None:
            return self._other.eof_received()
        return None

    def pause_writing(self) -> None:
        if self._other is not None:
            self._other.pause_writing()
            return
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._other is not None:
            self._other.resume_writing()
            return
        self._wake_writers()

    def data_received(self, data: bytes) -> None:
        if self._other is not None:
            self._other.data_received(data)
            return
        if self._handshake is not None:
            self._handshake += data
        self.conn.receive_data(data)
        for event in self.conn.events_received():
            if isinstance(event, Request):
                if not self._upgrade(event):
                    return  # handed to the fallback protocol, or refused
            elif isinstance(event, Frame):
                self._frame(event)
        self._flush()

    # ---- uvicorn: server shutdown ----

    def shutdown(self) -> None:
        if self.transport is None or self._closed:
            return
        if self.session is not None and not self._closing and self.conn.state is State.OPEN:
            self._closing = True
            self.conn.send_close(CLOSE_GOING_AWAY_RESTART)
            self._flush()
        self.transport.close()

    # ---- the handshake ----

    def _upgrade(self, request: Request) -> bool:
        """Serve a STOMP path here; hand any other to the fallback protocol. False when this protocol is done."""
        assert self.transport is not None
        raw = bytes(self._handshake or b"")
        self._handshake = None
        path = self._config.root_path + unquote(request.path.partition("?")[0])
        if path not in STOMP_PATHS:
            other = self.fallback(config=self._config, server_state=self._server_state, app_state=self._app_state)  # type: ignore[call-arg]
            self._server_state.connections.discard(self)
            self._other = other
            self.transport.set_protocol(other)
            other.connection_made(self.transport)
            other.data_received(raw)
            return False
        response = self.conn.accept(request)
        if response.status_code != 101:  # not a valid WebSocket upgrade: websockets' answer says why
            self.conn.send_response(response)
            self._closing = True
            self._flush()
            self.transport.close()
            return False
        for name in ("Date", "Server"):  # uvicorn's instead, as on every other answer
            if name in response.headers:
                del response.headers[name]
        for name, value in self._server_state.default_headers:
            response.headers[name.decode("latin-1")] = value.decode("latin-1")
        self.conn.send_response(response)
        self._flush()
        self.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH, low=WRITE_BUFFER_LOW)
        broker: Broker = self._app_state["broker"]
        self.broker = broker
        peer = self.transport.get_extra_info("peername")
        peer_text = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unknown"
        address = str(peer[0]) if isinstance(peer, tuple) else None
        self.session = broker.open_session(self, peer=peer_text, kind="websocket", address=address)
        if self.session is None:
            self._send([refusal_frame(broker.refusal(address))])
            self._close_with(CLOSE_TRY_AGAIN_LATER)
            return False
        self._schedule_ping()
        return True

    # ---- incoming frames ----

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY or opcode is Opcode.CONT:
            data = frame.data
            if opcode is Opcode.TEXT:
                self._text = None if frame.fin else codecs.getincrementaldecoder("utf-8")()
                if not self._is_utf8(data, frame.fin):
                    return
            elif opcode is Opcode.CONT and self._text is not None:
                if not self._is_utf8(data, frame.fin):
                    return
                if frame.fin:
                    self._text = None
            self._deliver(bytes(data))
        elif opcode is Opcode.PONG:
            # (while closing, the timer is the close handshake's deadline: a late pong must not cancel it)
            if self._ping is not None and not self._closing and bytes(frame.data) == self._ping:
                self._ping = None
                self._cancel_timer()
                self._schedule_ping()
        elif opcode is Opcode.CLOSE:
            # websockets has queued the answer to the client's close, or this is the answer to ours; either way it
            # then asks for the TCP connection to be closed (an empty chunk from data_to_send, see _flush)
            self._closing = True
            self._cancel_timer()
        # PING: websockets has queued the PONG

    def _is_utf8(self, data: bytes | bytearray | memoryview, final: bool) -> bool:
        try:
            if self._text is not None:
                self._text.decode(data, final)
            elif not (isinstance(data, bytes) and data.isascii()):
                bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            self._text = None
            self._close_with(CLOSE_INVALID_DATA, "TEXT message is not UTF-8")
            return False
        return True

    def _deliver(self, data: bytes) -> None:
        session, broker = self.session, self.broker
        if session is None or broker is None or self._closing or not data:
            return
        broker.metrics.bytes_in("websocket", len(data))
        if not session.connected and not session.finished:
            # Before CONNECTED the peer is a stranger: as on TCP, where the parser holds at most
            # max_frame_bytes_before_connect of it, all it sends may add up to that much, however it is split into
            # messages (heart-beat EOLs included, which the parser would not hold but the WebSocket layer did).
            limit = broker.config.limits.max_frame_bytes_before_connect
            self._pre_login_bytes += len(data)
            if self._pre_login_bytes > limit:
                session.close_with_error(
                    f"Too much data before CONNECTED (limit max_frame_bytes_before_connect={limit})",
                    f"{self._pre_login_bytes} bytes arrived before the session was CONNECTED; at most {limit} may",
                )
                return
        session.receive(data)

    # ---- the session's Transport ----

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._send([data])

    def writelines(self, chunks: list[bytes]) -> None:
        if any(chunks):
            self._send(chunks)

    def close(self) -> None:
        """The session is done (an ERROR, or a DISCONNECT's RECEIPT): close 1000 after what was written."""
        self._close_with(CLOSE_NORMAL)

    def pause_reading(self) -> None:
        if self.transport is not None and not self._closed and not self._closing:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self._closed:
            self._reading_paused = False
            self.transport.resume_reading()

    def write_backlog(self) -> int:
        if self.transport is None or self._closed:
            return 0
        return self.transport.get_write_buffer_size()

    async def drained(self) -> None:
        if self._writable is not None:
            await asyncio.shield(self._writable)

    # ---- helpers ----

    def _send(self, chunks: list[bytes]) -> None:
        """The chunks as one message: TEXT when they are UTF-8 (browsers' STOMP clients read TEXT), BINARY otherwise.
        The header is made here and written beside the chunks, so they are not copied into a frame. (Chunks end
        where a frame's head, body or NUL ends, never inside a character, so each can be checked alone.)"""
        transport = self.transport
        if transport is None or self._closing or self._closed:
            return
        text = all(map(_is_utf8, chunks))
        transport.writelines((_frame_head(_FIN_TEXT if text else _FIN_BINARY, sum(map(len, chunks))), *chunks))

    def _close_with(self, code: int, reason: str = "") -> None:
        if self._closing or self._closed or self.transport is None:
            return
        self._closing = True
        # Not OPEN: websockets already queued a close, the answer to the client's (parsed in this same read, its
        # event not handled yet) or its own for a protocol error; a second one would raise InvalidState.
        if self.conn.state is State.OPEN:
            self.conn.send_close(code, reason)
        self._flush()
        self.transport.resume_reading()  # read on, so the client's answering close is seen
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(CLOSE_HANDSHAKE_TIMEOUT, self.transport.abort)

    def _flush(self) -> None:
        """Write what websockets has to send. An empty chunk is its sign that the TCP connection is to be closed now
        (the closing handshake is complete, or it failed the connection for a protocol error)."""
        chunks = self.conn.data_to_send()
        transport = self.transport
        if not chunks or transport is None or self._closed:
            return
        congested = self._writable is not None  # over the write buffer's high mark: the client is not reading
        # websockets answers every ping with a pong (each frame a chunk of its own, first byte 0x8A). For a client that
        # sends pings and does not read, those would pile up here at its upload rate: while congested they are
        # dropped (RFC 6455 5.5.3 lets an endpoint answer only some pings).
        transport.writelines([c for c in chunks if c and not (congested and c[0] == _FIN_PONG)])
        if b"" in chunks:
            self._closing = True
            self._cancel_timer()
            transport.close()  # after the buffered bytes are out

    def _wake_writers(self) -> None:
        waiter, self._writable = self._writable, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ---- keepalive: a ping every ws_ping_interval; no pong within ws_ping_timeout ends the connection ----

    def _schedule_ping(self) -> None:
        interval = self._config.ws_ping_interval
        if interval and not self._closing:
            self._timer = asyncio.get_running_loop().call_later(interval, self._send_ping)

    def _send_ping(self) -> None:
        self._timer = None
        if self._closing or self._closed:
            return
        self._ping = os.urandom(4)  # names this ping: a stale or unsolicited pong does not count
        self.conn.send_ping(self._ping)
        self._flush()
        timeout = self._config.ws_ping_timeout
        if timeout:
            self._timer = asyncio.get_running_loop().call_later(timeout, self._ping_timed_out)
        else:
            self._schedule_ping()

    def _ping_timed_out(self) -> None:
        self._timer = None
        if self._reading_paused:  # its pong may be waiting unread behind frames we chose not to read yet: ask again
            self._ping = None
            self._schedule_ping()
            return
        if self._ping is not None and self.transport is not None and not self._closed:
            log.debug("websocket keepalive ping timeout")
            self._closing = True
            self.transport.abort()
