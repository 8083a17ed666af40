"""Connection slots and pre-login memory: a per-address connection limit on both transports, the same pre-login
byte limit on WebSocket as on TCP, a WebSocket message size bound to the frame limit, and the login timeout."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from tests.app.transports.live_app import LiveApp, live_app
from tests.app.transports.ws_stomp import WsStomp, frame_bytes
from tests.raw_stomp import RawClient

PRE_LOGIN_LIMIT = 64 * 1024
SECOND_ADDRESS = "127.0.0.2"  # Linux routes all of 127.0.0.0/8 to loopback: a second client address for free


class BoundClient(RawClient):
    """A raw STOMP client whose socket is bound to a chosen local address."""

    def __init__(self, port: int, source: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
        self.buffer = b""


def connections(live: LiveApp) -> list[dict[str, object]]:
    response = httpx.get(f"{live.http_url}/connections")
    assert response.status_code == 200, response.text
    result: list[dict[str, object]] = response.json()
    return result


def wait_for_connections(live: LiveApp, count: int) -> None:
    """Wait until the gateway has let go of closed sessions (they end asynchronously)."""
    deadline = time.monotonic() + 10
    while len(connections(live)) != count:
        assert time.monotonic() < deadline, connections(live)
        time.sleep(0.02)  # polling the event (the /connections count), not sleeping in its place


def assert_refused_naming(frame_command: str, message: str, body: bytes, limit: str) -> None:
    assert frame_command == "ERROR"
    assert limit in message, message
    assert limit in body.decode(), body


@pytest.fixture
def small(tmp_path: Path) -> Iterator[LiveApp]:
    with live_app(tmp_path, max_connections_per_address=2, heartbeat_ms=0) as live:
        yield live


async def test_per_address_limit_refuses_tcp_and_websocket_while_another_address_gets_in(small: LiveApp) -> None:
    tcp = RawClient(small.stomp_port)
    ws = await WsStomp.open(small.ws_url + "/stomp")
    extra: list[RawClient] = []
    try:
        tcp.connect()
        await ws.connect()

        refused_tcp = RawClient(small.stomp_port)
        extra.append(refused_tcp)
        error = refused_tcp.read()
        assert_refused_naming(error.command, error.headers["message"], error.body, "max_connections_per_address=2")
        assert refused_tcp.closed_by_peer()

        refused_ws = await WsStomp.open(small.ws_url + "/stomp")
        try:
            ws_error = await refused_ws.read()
            assert_refused_naming(ws_error.command, ws_error.headers["message"], ws_error.body, "max_connections_per_address=2")
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(refused_ws.ws.recv(), timeout=5)
            assert refused_ws.ws.close_code == 1013
        finally:
            await refused_ws.close()

        # Another address has its own allowance, on both transports.
        other_tcp = BoundClient(small.stomp_port, SECOND_ADDRESS)
        extra.append(other_tcp)
        other_tcp.connect()
        other_ws = await WsStomp.open(small.ws_url + "/stomp", source=SECOND_ADDRESS)
        try:
            await other_ws.connect()
        finally:
            await other_ws.close()

        # A closed connection gives its slot back.
        tcp.close()
        wait_for_connections(small, 2)  # ws, other_tcp
        again = RawClient(small.stomp_port)
        extra.append(again)
        again.connect()
    finally:
        await ws.close()
        for client in extra:
            client.close()


def test_bare_sockets_count_against_the_address_before_they_connect(small: LiveApp) -> None:
    """Sockets that never CONNECT hold slots too: they are what the limit is for."""
    bare = [RawClient(small.stomp_port), RawClient(small.stomp_port)]
    try:
        wait_for_connections(small, 2)
        refused = RawClient(small.stomp_port)
        bare.append(refused)
        error = refused.read()
        assert "max_connections_per_address" in error.headers["message"]
    finally:
        for client in bare:
            client.close()


def test_the_setting_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.settings import Settings

    assert Settings().max_connections_per_address == 256
    monkeypatch.setenv("STOMPGATE_MAX_CONNECTIONS_PER_ADDRESS", "7")
    assert Settings().max_connections_per_address == 7


# ---- WebSocket before login ----


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApp]:
    # A 256 KiB frame limit keeps the "message above the frame limit" case small.
    with live_app(tmp_path_factory.mktemp("limits"), heartbeat_ms=0, max_frame_bytes=256 * 1024) as live:
        yield live


async def expect_error_then_close(client: WsStomp, limit: str) -> None:
    error = await client.read()
    assert error.command == "ERROR", error
    assert limit in error.headers["message"] + error.body.decode(), error
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(client.ws.recv(), timeout=5)


async def test_websocket_message_over_the_pre_login_limit_before_connect_is_refused(gateway: LiveApp) -> None:
    """100 KiB of heart-beat EOLs before CONNECT: nothing a parser would buffer, yet more than an unauthenticated
    peer may make us hold."""
    client = await WsStomp.open(gateway.ws_url + "/stomp")
    try:
        await client.send(b"\n" * (100 * 1024))
        await expect_error_then_close(client, f"max_frame_bytes_before_connect={PRE_LOGIN_LIMIT}")
    finally:
        await client.close()


async def test_websocket_pre_login_bytes_are_counted_across_messages(gateway: LiveApp) -> None:
    client = await WsStomp.open(gateway.ws_url + "/stomp")
    try:
        for _ in range(3):
            await client.send(b"\n" * (30 * 1024))
        await expect_error_then_close(client, f"max_frame_bytes_before_connect={PRE_LOGIN_LIMIT}")
    finally:
        await client.close()


async def test_after_connected_the_full_frame_limit_applies(gateway: LiveApp) -> None:
    client = await WsStomp.open(gateway.ws_url + "/stomp")
    try:
        await client.connect()
        body = b"x" * (200 * 1024)  # over the pre-login limit, under max_frame_bytes
        await client.frame("SUBSCRIBE", {"id": "s", "destination": "/queue/limits-big"})
        await client.frame("SEND", {"destination": "/queue/limits-big"}, body)
        message = await client.read()
        assert (message.command, message.body) == ("MESSAGE", body)
    finally:
        await client.close()


async def test_websocket_message_far_above_the_frame_limit_is_cut_off_by_the_server(gateway: LiveApp) -> None:
    """uvicorn's ws_max_size is the frame limit plus a margin, not its 16 MiB default: a bigger message is refused
    (close 1009) before it is buffered whole."""
    client = await WsStomp.open(gateway.ws_url + "/stomp")
    try:
        await client.connect()
        await client.send(frame_bytes("SEND", {"destination": "/queue/limits-huge"}, b"x" * (1024 * 1024)))
        with pytest.raises(ConnectionClosed):
            while True:
                await asyncio.wait_for(client.ws.recv(), timeout=5)
        assert client.ws.close_code == 1009
    finally:
        await client.close()


# ---- the login timeout, on both transports ----


async def test_login_timeout_applies_to_tcp_and_websocket(tmp_path: Path) -> None:
    with live_app(tmp_path, login_timeout=0.5, heartbeat_ms=0) as live:
        tcp = RawClient(live.stomp_port)
        ws = await WsStomp.open(live.ws_url + "/stomp")
        try:
            error = tcp.read(timeout=10)
            assert (error.command, error.headers["message"]) == ("ERROR", "Login timeout")
            assert tcp.closed_by_peer()
            ws_error = await ws.read(timeout=10)
            assert (ws_error.command, ws_error.headers["message"]) == ("ERROR", "Login timeout")
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.ws.recv(), timeout=5)
        finally:
            tcp.close()
            await ws.close()


async def test_a_forwarded_for_header_does_not_choose_the_counted_address(small: LiveApp) -> None:
    """uvicorn trusts X-Forwarded-For from loopback by default: any local process could then pick the address its
    WebSocket connections count against. The gateway counts the socket's own address."""
    from websockets.asyncio.client import connect

    url = f"{small.ws_url}/stomp"
    async with connect(url, subprotocols=["v12.stomp"], additional_headers={"X-Forwarded-For": "10.9.9.9"}) as ws:  # type: ignore[list-item]
        await ws.send(frame_bytes("CONNECT", {"accept-version": "1.2", "host": "/"}).decode())
        reply = await ws.recv()
        assert str(reply).startswith("CONNECTED")
        peers = [str(c["peer"]) for c in connections(small)]
        assert peers and all(p.startswith("127.0.0.1:") for p in peers), peers
