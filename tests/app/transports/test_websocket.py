"""STOMP over WebSocket against a real uvicorn, with the real ``websockets`` client (and raw TCP for cross-transport)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import APIRouter, WebSocket
from websockets.exceptions import ConnectionClosed

from app.transports.websocket import choose_subprotocol
from tests.app.transports.live_app import LiveApp, live_app
from tests.app.transports.ws_stomp import WsStomp
from tests.raw_stomp import RawClient

_names = itertools.count(1)


def unique(prefix: str) -> str:
    return f"{prefix}/ws-test-{next(_names)}"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApp]:
    # Short server heart-beats (500 ms) so the heart-beat test is quick; clients here mostly ask for none.
    with live_app(tmp_path_factory.mktemp("ws"), heartbeat_ms=500) as live:
        yield live


@pytest.fixture
async def clients(gateway: LiveApp) -> object:
    """Open WebSocket clients to the module's gateway; all are closed after the test."""
    opened: list[WsStomp] = []

    async def make(path: str = "/stomp", subprotocols: list[str] | None = None) -> WsStomp:
        client = await WsStomp.open(gateway.ws_url + path, subprotocols)
        opened.append(client)
        return client

    yield make
    for client in opened:
        await client.close()


def test_choose_subprotocol_prefers_the_highest_offered() -> None:
    assert choose_subprotocol(["v10.stomp", "v11.stomp", "v12.stomp"]) == "v12.stomp"
    assert choose_subprotocol(["v11.stomp", "v10.stomp"]) == "v11.stomp"
    assert choose_subprotocol(["mqtt", "v10.stomp"]) == "v10.stomp"
    assert choose_subprotocol(["mqtt"]) is None
    assert choose_subprotocol([]) is None


@pytest.mark.parametrize(
    ("offered", "expected"),
    [
        (["v10.stomp", "v11.stomp", "v12.stomp"], "v12.stomp"),
        (["v12.stomp", "v11.stomp", "v10.stomp"], "v12.stomp"),
        (["v11.stomp"], "v11.stomp"),
        (["v10.stomp"], "v10.stomp"),
        ([], None),
    ],
)
async def test_subprotocol_echo(clients: object, offered: list[str], expected: str | None) -> None:
    client = await clients(subprotocols=offered)  # type: ignore[operator]
    assert client.ws.subprotocol == expected
    connected = await client.connect()
    assert connected.headers["version"] == "1.2"


async def test_per_message_deflate_is_declined(clients: object) -> None:
    """Browsers (and this client) offer permessage-deflate; its two zlib streams would cost each connection about
    40 KiB more (measured: 89 KiB per idle connection with it, 47 without), for STOMP frames that are mostly small.
    RabbitMQ's Web STOMP leaves it off as well."""
    client = await clients()  # type: ignore[operator]
    assert "permessage-deflate" in client.ws.request.headers.get("Sec-WebSocket-Extensions", "")  # offered
    assert client.ws.protocol.extensions == []
    assert "Sec-WebSocket-Extensions" not in client.ws.response.headers
    await client.connect()


async def test_ws_alias_path(clients: object) -> None:
    client = await clients("/ws")  # type: ignore[operator]
    assert client.ws.subprotocol == "v12.stomp"
    await client.connect()


async def test_connect_subscribe_send_receive_ack(clients: object) -> None:
    queue = unique("/queue")
    consumer = await clients()  # type: ignore[operator]
    producer = await clients()  # type: ignore[operator]
    await consumer.connect()
    await producer.connect()
    await consumer.frame("SUBSCRIBE", {"id": "s1", "destination": queue, "ack": "client-individual", "receipt": "r1"})
    assert (await consumer.read()).headers["receipt-id"] == "r1"
    await producer.frame("SEND", {"destination": queue, "content-type": "text/plain", "receipt": "p1"}, b"hello ws")
    assert (await producer.read()).headers["receipt-id"] == "p1"
    message = await consumer.read()
    assert message.command == "MESSAGE"
    assert message.body == b"hello ws"
    assert message.headers["subscription"] == "s1"
    assert not message.binary
    await consumer.frame("ACK", {"id": message.headers["ack"], "receipt": "a1"})
    receipt = await consumer.read()
    assert (receipt.command, receipt.headers["receipt-id"]) == ("RECEIPT", "a1")


async def test_frame_split_across_messages(clients: object) -> None:
    queue = unique("/queue")
    client = await clients()  # type: ignore[operator]
    await client.send("CONN")
    await client.send("ECT\naccept-version:1.2\nhost:/\nheart-")
    await client.send(b"beat:0,0\n\n")
    await client.send("\x00")
    assert (await client.read()).command == "CONNECTED"
    await client.frame("SUBSCRIBE", {"id": "s", "destination": queue})
    frame = f"SEND\ndestination:{queue}\ncontent-length:5\n\nsplit\x00".encode()
    for byte in range(len(frame)):
        await client.send(frame[byte : byte + 1])
    message = await client.read()
    assert (message.command, message.body) == ("MESSAGE", b"split")


async def test_two_frames_in_one_message(clients: object) -> None:
    queue = unique("/queue")
    client = await clients()  # type: ignore[operator]
    await client.connect()
    both = (
        f"SUBSCRIBE\nid:s\ndestination:{queue}\nreceipt:sub\n\n\x00\n"
        f"SEND\ndestination:{queue}\nreceipt:send\n\nboth\x00"
    )
    await client.send(both)
    frames = [await client.read() for _ in range(3)]
    receipts = [f.headers["receipt-id"] for f in frames if f.command == "RECEIPT"]
    messages = [f.body for f in frames if f.command == "MESSAGE"]
    assert receipts == ["sub", "send"]
    assert messages == [b"both"]


async def test_heartbeat_message_is_accepted(clients: object) -> None:
    client = await clients()  # type: ignore[operator]
    await client.connect()
    await client.send("\n")
    await client.send(b"\r\n")
    await client.frame("SEND", {"destination": unique("/queue"), "receipt": "after-beat"}, b"x")
    reply = await client.read()
    assert (reply.command, reply.headers["receipt-id"]) == ("RECEIPT", "after-beat")


async def test_server_heartbeats_arrive_as_eol_messages(clients: object) -> None:
    client = await clients()  # type: ignore[operator]
    await client.frame("CONNECT", {"accept-version": "1.2", "host": "/", "heart-beat": "0,100"})
    connected = await client.read()
    server_send = int(connected.headers["heart-beat"].split(",")[0])
    assert server_send == 500
    beat = await asyncio.wait_for(client.ws.recv(), timeout=3)
    assert beat in ("\n", "\r\n", b"\n")


async def test_binary_body_travels_in_a_binary_frame(clients: object) -> None:
    queue = unique("/queue")
    consumer = await clients()  # type: ignore[operator]
    producer = await clients()  # type: ignore[operator]
    await consumer.connect()
    await producer.connect()
    await consumer.frame("SUBSCRIBE", {"id": "s", "destination": queue})
    body = bytes([0xFF, 0x00, 0xFE, 0x80, 0x00, 0x01])
    head = f"SEND\ndestination:{queue}\ncontent-type:application/octet-stream\ncontent-length:{len(body)}\n\n"
    await producer.send(head.encode() + body + b"\x00")  # a BINARY WebSocket message
    message = await consumer.read()
    assert message.body == body
    assert message.binary, "a body that is not UTF-8 must arrive in a BINARY WebSocket message"
    await producer.frame("SEND", {"destination": queue}, "text: é ✓".encode())
    message = await consumer.read()
    assert message.body.decode() == "text: é ✓"
    assert not message.binary


async def test_large_bodies_arrive_whole_in_one_message_of_the_right_kind(clients: object) -> None:
    """A body of SEPARATE_BODY_MIN bytes or more is written beside its frame's head instead of copied into it; the
    WebSocket message still holds the whole frame (head, body, NUL), TEXT when all of it is UTF-8."""
    from stomp_core.connection import SEPARATE_BODY_MIN

    queue = unique("/queue")
    consumer = await clients()  # type: ignore[operator]
    producer = await clients()  # type: ignore[operator]
    await consumer.connect()
    await producer.connect()
    await consumer.frame("SUBSCRIBE", {"id": "s", "destination": queue, "ack": "client-individual"})
    text = ("é✓ text " * (SEPARATE_BODY_MIN // 8)).encode()
    binary = bytes(range(256)) * (SEPARATE_BODY_MIN // 256 + 1)
    for body in (text, binary):
        await producer.frame("SEND", {"destination": queue, "receipt": "r", "content-length": str(len(body))}, body)
        assert (await producer.read()).headers["receipt-id"] == "r"
        received = len(consumer.messages)
        message = await consumer.read(timeout=10)
        assert message.body == body, (message.command, message.headers)
        assert message.binary is (body is binary)
        [whole] = consumer.messages[received:]  # the frame in one WebSocket message
        assert (whole.encode() if isinstance(whole, str) else whole) == frame_bytes_of(message)
        await consumer.frame("ACK", {"id": message.headers["ack"]})


def frame_bytes_of(message: object) -> bytes:
    """The MESSAGE as the gateway wrote it: its head (headers in order), the blank line, the body and the NUL."""
    headers = "".join(f"{k}:{v}\n" for k, v in message.headers.items())  # type: ignore[attr-defined]
    return f"{message.command}\n{headers}\n".encode() + message.body + b"\x00"  # type: ignore[attr-defined]


async def test_tcp_producer_reaches_websocket_subscriber(gateway: LiveApp, clients: object) -> None:
    topic = unique("/topic")
    consumer = await clients()  # type: ignore[operator]
    await consumer.connect()
    await consumer.frame("SUBSCRIBE", {"id": "t", "destination": topic, "receipt": "ready"})
    assert (await consumer.read()).headers["receipt-id"] == "ready"
    tcp = RawClient(gateway.stomp_port)
    try:
        await asyncio.to_thread(tcp.connect)
        await asyncio.to_thread(tcp.frame, "SEND", {"destination": topic, "receipt": "sent"}, b"from tcp")
        assert (await asyncio.to_thread(tcp.read)).headers["receipt-id"] == "sent"
    finally:
        tcp.close()
    message = await consumer.read()
    assert (message.command, message.body, message.headers["destination"]) == ("MESSAGE", b"from tcp", topic)


async def test_websocket_producer_reaches_tcp_subscriber(gateway: LiveApp, clients: object) -> None:
    queue = unique("/queue")
    tcp = RawClient(gateway.stomp_port)
    try:
        await asyncio.to_thread(tcp.connect)
        await asyncio.to_thread(tcp.frame, "SUBSCRIBE", {"id": "q", "destination": queue, "ack": "client"})
        producer = await clients()  # type: ignore[operator]
        await producer.connect()
        await producer.frame("SEND", {"destination": queue, "receipt": "sent"}, b"from websocket")
        assert (await producer.read()).headers["receipt-id"] == "sent"
        message = await asyncio.to_thread(tcp.read)
        assert (message.command, message.body) == ("MESSAGE", b"from websocket")
        await asyncio.to_thread(tcp.frame, "ACK", {"id": message.headers["ack"]})
    finally:
        tcp.close()


async def test_error_is_flushed_then_closed_with_1000(clients: object) -> None:
    client = await clients()  # type: ignore[operator]
    await client.connect()
    await client.frame("SEND", {"destination": "/nowhere/x", "receipt": "bad"}, b"x")
    error = await client.read()
    assert error.command == "ERROR"
    assert error.headers.get("receipt-id") == "bad"
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(client.ws.recv(), timeout=5)
    assert client.ws.close_code == 1000


async def test_disconnect_receipt_then_close(clients: object) -> None:
    client = await clients()  # type: ignore[operator]
    await client.connect()
    await client.frame("DISCONNECT", {"receipt": "bye"})
    receipt = await client.read()
    assert (receipt.command, receipt.headers["receipt-id"]) == ("RECEIPT", "bye")
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(client.ws.recv(), timeout=5)
    assert client.ws.close_code == 1000


async def test_refused_session_closes_with_1013(tmp_path: Path) -> None:
    with live_app(tmp_path, max_connections=1) as small:
        first = await WsStomp.open(small.ws_url + "/stomp")
        try:
            await first.connect()
            second = await WsStomp.open(small.ws_url + "/stomp")
            try:
                refusal = await second.read()
                assert refusal.command == "ERROR"
                assert "max_connections" in refusal.body.decode()
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(second.ws.recv(), timeout=5)
                assert second.ws.close_code == 1013
            finally:
                await second.close()
        finally:
            await first.close()


# -- the connection's own Protocol (app/transports/websocket.py): what uvicorn's ASGI path used to do for us ---------


async def test_another_websocket_path_still_reaches_the_app(gateway: LiveApp) -> None:
    """Only /stomp and /ws are served by the STOMP protocol; any other path goes to the ASGI app, which has no
    WebSocket route there and refuses the handshake with 403."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as refused:
        await connect(gateway.ws_url + "/not-stomp", open_timeout=5)
    assert refused.value.response.status_code == 403


async def test_a_plain_http_request_to_the_stomp_path_is_answered(gateway: LiveApp) -> None:
    """Not an upgrade: the app answers (no WebSocket route for GET), the protocol is never involved."""
    import httpx

    async with httpx.AsyncClient() as http:
        response = await http.get(gateway.http_url + "/stomp")
    assert response.status_code == 404


@pytest.mark.parametrize("fragmented", [False, True], ids=["whole", "fragmented"])
async def test_a_text_message_that_is_not_utf8_closes_with_1007(clients: object, fragmented: bool) -> None:
    from websockets.frames import Frame, Opcode

    client = await clients()  # type: ignore[operator]
    await client.connect()
    bad = "SEND\ndestination:/queue/x\n\nü".encode()[:-1]  # the first byte of a two-byte sequence, then the end
    protocol = client.ws.protocol
    if fragmented:
        protocol.send_frame(Frame(Opcode.TEXT, b"SEND\ndestination:/queue/x\n\n", fin=False))
        protocol.send_frame(Frame(Opcode.CONT, bad[-1:], fin=True))
    else:
        protocol.send_frame(Frame(Opcode.TEXT, bad, fin=True))
    client.ws.send_data()  # type: ignore[attr-defined]
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(client.ws.recv(), timeout=5)
    assert client.ws.close_code == 1007


async def test_a_frame_in_a_fragmented_message_is_received(clients: object) -> None:
    from websockets.frames import Frame, Opcode

    queue = unique("/queue")
    client = await clients()  # type: ignore[operator]
    await client.connect()
    client.ws.protocol.send_frame(Frame(Opcode.TEXT, f"SEND\ndestination:{queue}\nreceipt:r\n\nü".encode()[:-1], fin=False))
    client.ws.protocol.send_frame(Frame(Opcode.CONT, "ü\0".encode()[1:], fin=True))
    client.ws.send_data()  # type: ignore[attr-defined]
    assert (await client.read()).headers["receipt-id"] == "r"
    await client.frame("SUBSCRIBE", {"id": "s", "destination": queue})
    message = await client.read()
    assert message.body == "ü".encode()


async def test_a_ping_is_answered(clients: object) -> None:
    client = await clients()  # type: ignore[operator]
    await client.connect()
    pong = await client.ws.ping(b"are you there")
    await asyncio.wait_for(pong, 5)


async def test_server_shutdown_closes_with_1012(tmp_path: Path) -> None:
    with live_app(tmp_path) as live:
        client = await WsStomp.open(live.ws_url + "/stomp")
        await client.connect()
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(client.ws.recv(), timeout=5)
    assert client.ws.close_code == 1012


async def test_another_websocket_path_is_served_by_uvicorns_protocol_to_the_end(tmp_path: Path) -> None:
    """uvicorn's HTTP protocol calls the WebSocket protocol's data_received with the upgrade request and only then
    sets it as the transport's protocol: the hand-over to uvicorn's own implementation was undone right away. The
    app's WebSocket route accepted, but the messages that followed went to the STOMP protocol (nothing came back),
    and uvicorn's protocol never saw connection_lost: it stayed in server_state.connections for good (a leak per
    connection, and a shutdown that waits out its grace period)."""
    from websockets.asyncio.client import connect

    router = APIRouter()

    @router.websocket("/echo")
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(await websocket.receive_text())
        await websocket.close()

    with live_app(tmp_path, extra_routers=[router]) as live:
        assert live.server is not None
        async with connect(live.ws_url + "/echo", open_timeout=5) as ws:
            await ws.send("hello")
            assert await asyncio.wait_for(ws.recv(), 5) == "hello"
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
        connections = live.server.server_state.connections
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while connections and loop.time() < deadline:  # connection_lost runs on the server's thread
            await asyncio.sleep(0.02)
        assert not connections, connections


async def test_an_error_for_a_message_followed_by_a_close_in_the_same_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """websockets parses the whole read before the protocol looks at its events: a client's CLOSE after a message
    that ends the session at once (here more than max_frame_bytes_before_connect before CONNECTED) is already
    answered when the session closes for the ERROR. Our send_close then raised InvalidState out of data_received:
    asyncio logged a traceback ("Fatal error: protocol.data_received() call failed") and aborted the connection, the
    client's close never answered (1006). 300 bytes and a close: one read on loopback."""
    from websockets.frames import Close, Frame, Opcode

    with live_app(tmp_path, max_frame_bytes_before_connect=256) as live:
        client = await WsStomp.open(live.ws_url + "/stomp")
        try:
            protocol = client.ws.protocol
            protocol.send_frame(Frame(Opcode.TEXT, b"\n" * 300))  # heart-beat EOLs, past the limit
            protocol.send_frame(Frame(Opcode.CLOSE, Close(1000, "bye").serialize()))
            client.ws.transport.write(b"".join(protocol.data_to_send()))  # one write, so one read
            received: list[str | bytes] = []
            with pytest.raises(ConnectionClosed):
                while True:
                    received.append(await asyncio.wait_for(client.ws.recv(), 5))
        finally:
            await client.close()
    assert [r.getMessage() for r in caplog.records if "data_received" in r.getMessage()] == []
    assert str(received[0]).startswith("ERROR"), received
    assert client.ws.close_code == 1000  # the server's answer to our close


def test_pings_from_a_client_that_never_reads_do_not_grow_the_write_buffer(tmp_path: Path) -> None:
    """Every ping asks for a pong. A client that sends pings and never reads would make the gateway hold every pong
    (its upload rate, in our memory): once the connection's write buffer is over its high mark, pongs are dropped
    (RFC 6455 5.5.3 lets an endpoint answer only some pings)."""
    import base64
    import os
    import socket
    import time

    from app.transports.websocket import StompWebSocketProtocol

    with live_app(tmp_path) as live:
        assert live.server is not None
        sock = socket.create_connection(("127.0.0.1", live.http_port))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # read nothing, and hold little in the kernel
            key = base64.b64encode(os.urandom(16)).decode()
            sock.sendall(
                f"GET /stomp HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            answer = b""
            while b"\r\n\r\n" not in answer:  # a client waits for the 101 before sending frames
                answer += sock.recv(1024)
            assert answer.startswith(b"HTTP/1.1 101")
            ping = bytes((0x89, 0x80 | 125)) + b"\0\0\0\0" + b"p" * 125  # a masked ping (zero key), 125 bytes
            sent = 0
            sock.settimeout(10)
            while sent < 24 * 1024 * 1024:  # 24 MiB of pongs asked for
                sock.sendall(ping * 512)
                sent += 125 * 512
            protocols = [p for p in live.server.server_state.connections if isinstance(p, StompWebSocketProtocol)]
            assert len(protocols) == 1
            deadline = time.monotonic() + 5
            backlog = protocols[0].write_backlog()
            while time.monotonic() < deadline and backlog < 4 * 1024 * 1024:  # give the server time to read all
                time.sleep(0.05)
                backlog = protocols[0].write_backlog()
            assert backlog < 4 * 1024 * 1024, f"{backlog:,} bytes of pongs held for a client that does not read"
        finally:
            sock.close()


def test_a_keepalive_ping_does_not_time_out_while_the_gateway_is_not_reading() -> None:
    """The session pauses reading while a connection's SENDs wait for the store (max_inflight_bytes_per_session):
    the client's pong then waits unread in the socket, and a store slower than ws_ping_timeout must not get a
    healthy connection aborted. Once reading resumes, a missing pong ends the connection as before."""
    from types import SimpleNamespace

    from app.transports.websocket import StompWebSocketProtocol

    class FakeTransport:
        aborted = False

        def pause_reading(self) -> None: ...

        def resume_reading(self) -> None: ...

        def abort(self) -> None:
            self.aborted = True

    async def scenario() -> None:
        config = SimpleNamespace(ws_max_size=1 << 20, ws_ping_interval=3600.0, ws_ping_timeout=3600.0)
        protocol = StompWebSocketProtocol(config, SimpleNamespace(), {})
        transport = FakeTransport()
        protocol.transport = transport  # type: ignore[assignment]
        protocol.pause_reading()
        protocol._ping = b"ping"
        protocol._ping_timed_out()
        assert not transport.aborted
        protocol.resume_reading()
        protocol._ping = b"ping"
        protocol._ping_timed_out()
        assert transport.aborted
        if protocol._timer is not None:
            protocol._timer.cancel()

    asyncio.run(scenario())
