"""A seeded fuzz run against a real gateway, over TCP and WebSocket.

Each case is one connection: CONNECT, a few valid SENDs with receipts, one bad frame (drawn from every kind of
violation the gateway checks), and a few more SENDs. The gateway must answer every valid frame before the bad one
(its RECEIPT, in order, and the message stored), then an ERROR with a ``message`` header, then close, and must act
on nothing after it. A bystander pair of connections exchanges messages the whole time and must lose none, and the
gateway must still be healthy at the end.
"""

from __future__ import annotations

import os
import random
import socket
import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from stomp_core import Frame, FrameParser
from stomp_core.frame import SERVER_COMMANDS
from tests.gateway_process import Gateway, run_gateway

SEED = int(os.environ.get("STOMPGATE_FUZZ_SEED", "20261201"))
TCP_CASES = 2000
WS_CASES = 1000


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with run_gateway(tmp_path_factory.mktemp("fuzz")) as gw:
        yield gw


class Wire:
    """One connection, TCP or WebSocket: exact bytes out, frames back (parsed by the core's own parser)."""

    def __init__(self, gateway: Gateway, kind: str) -> None:
        self.kind = kind
        self.parser = FrameParser(commands=SERVER_COMMANDS, version="1.2")
        self.frames: list[Frame] = []
        self.eof = False
        if kind == "tcp":
            self.sock = socket.create_connection(("127.0.0.1", gateway.stomp_port), timeout=10)
        else:
            url = f"ws://127.0.0.1:{gateway.http_port}/stomp"
            # entered as a context manager (websockets deprecates the direct form), closed by close()
            self.ws: ClientConnection = connect(url, subprotocols=["v12.stomp"], open_timeout=10).__enter__()  # type: ignore[list-item]

    def send(self, data: bytes) -> None:
        if not data:
            return
        try:  # the gateway may already have sent its ERROR and closed: what we still send is not read
            if self.kind == "tcp":
                self.sock.sendall(data)
            else:
                self.ws.send(data)
        except (OSError, ConnectionClosed):
            pass

    def _fill(self) -> None:
        if self.kind == "tcp":
            chunk = self.sock.recv(65536)
        else:
            try:
                message = self.ws.recv(timeout=10)
            except ConnectionClosed:
                chunk = b""
            else:
                chunk = message.encode() if isinstance(message, str) else message
        if not chunk:
            self.eof = True
            return
        for item in self.parser.feed(chunk):
            assert isinstance(item, Frame), item
            self.frames.append(item)

    def read(self) -> Frame:
        while not self.frames:
            self._fill()
            if self.eof and not self.frames:
                raise EOFError(f"closed without a frame ({self.kind})")
        return self.frames.pop(0)

    def closed_by_peer(self) -> bool:
        while not self.eof:
            self._fill()
            assert not self.frames, f"a frame after the ERROR: {self.frames}"
        return True

    def close(self) -> None:
        if self.kind == "tcp":
            self.sock.close()
        else:
            self.ws.close()


def send(destination: str, body: bytes, **headers: str) -> bytes:
    lines = ["SEND", f"destination:{destination}"] + [f"{k}:{v}" for k, v in headers.items()]
    return ("\n".join(lines) + "\n\n").encode() + body + b"\x00"


def _word(rng: random.Random, size: int = 8) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(size))


BadFrame = Callable[[random.Random, str], bytes]

# Every kind of bad input the gateway checks, each a complete frame (so the gateway never waits for more bytes).
BAD_FRAMES: dict[str, BadFrame] = {
    "unknown command": lambda r, d: _word(r).upper().encode() + b"X\n\n\x00",
    "lower-case command": lambda r, d: b"send\ndestination:" + d.encode() + b"\n\n\x00",
    "header without colon": lambda r, d: b"SEND\ndestination:" + d.encode() + b"\n" + _word(r).encode() + b"\n\n\x00",
    "undefined escape": lambda r, d: b"SEND\ndestination:" + d.encode() + b"\nx-h:a\\tb\n\n\x00",
    "NUL in a header": lambda r, d: b"SEND\ndestination:" + d.encode() + b"\nx-h:a\x00b\n\nbody\x00",
    "CR without LF": lambda r, d: b"SEND\ndestination:" + d.encode() + b"\nx-h:a\rb\n\n\x00",
    "bad UTF-8 header": lambda r, d: b"SEND\ndestination:" + d.encode() + b"\nx-h:\xff\xfe\n\n\x00",
    "content-length short": lambda r, d: send(d, b"abcdefgh", **{"content-length": "3"}),
    "content-length text": lambda r, d: send(d, b"abc", **{"content-length": r.choice(["-1", "abc", "9" * 5000])}),
    "body too large": lambda r, d: send(d, b"", **{"content-length": str(64 * 1024 * 1024)}),
    "too many headers": lambda r, d: send(d, b"x", **{f"x-{i}": "v" for i in range(150)}),
    "header too long": lambda r, d: send(d, b"x", **{"x-long": "v" * 9000}),
    "bad priority": lambda r, d: send(d, b"x", priority=r.choice(["eleven", "42", "-1", "9" * 40])),
    "bad expiration": lambda r, d: send(d, b"x", expiration=r.choice(["soon", "-5", "99999999999999999999"])),
    "bad expires": lambda r, d: send(d, b"x", expires=r.choice(["never", "99999999999999999999999"])),
    "invalid destination": lambda r, d: send(
        r.choice(["/queue/a/../b", "/nowhere/x", "", "/queue/", "/queue/a/./b", "/queue/a\\tb"]), b"x"
    ),
    "missing destination": lambda r, d: b"SEND\nreceipt:r\n\nx\x00",
    "unknown ack": lambda r, d: b"ACK\nid:" + _word(r).encode() + b"\n\n\x00",
    "unknown transaction": lambda r, d: b"COMMIT\ntransaction:" + _word(r).encode() + b"\n\n\x00",
    "bad ack mode": lambda r, d: b"SUBSCRIBE\nid:1\ndestination:" + d.encode() + b"\nack:sometimes\n\n\x00",
    "bad selector": lambda r, d: b"SUBSCRIBE\nid:1\ndestination:" + d.encode() + b"\nselector:a = = b (\n\n\x00",
    "second CONNECT": lambda r, d: b"CONNECT\naccept-version:1.2\nhost:/\n\n\x00",
    "random bytes": lambda r, d: b"Z" + bytes(r.randrange(1, 256) for _ in range(r.randrange(0, 64))) + b"\n\n\x00",
}


def test_bad_frames_get_an_error_after_every_valid_frame_before_them(gateway: Gateway) -> None:
    rng = random.Random(SEED)
    fuzz_queue = f"/queue/fuzz{uuid.uuid4().hex[:8]}"
    bystander_queue = f"/queue/bystander{uuid.uuid4().hex[:8]}"
    bystander_in = Wire(gateway, "tcp")
    bystander_out = Wire(gateway, "tcp")
    for wire in (bystander_in, bystander_out):
        wire.send(b"CONNECT\naccept-version:1.2\nhost:/\n\n\x00")
        assert wire.read().command == "CONNECTED"
    bystander_in.send(f"SUBSCRIBE\nid:1\ndestination:{bystander_queue}\nreceipt:s\n\n\x00".encode())
    assert bystander_in.read().command == "RECEIPT"
    stored = 0
    sent_by_bystander = 0
    kinds = sorted(BAD_FRAMES)
    seen_kinds: dict[str, int] = {}
    for case in range(TCP_CASES + WS_CASES):
        kind = kinds[case % len(kinds)] if case < 2 * len(kinds) else rng.choice(kinds)
        transport = "tcp" if case < TCP_CASES else "ws"
        before = rng.randrange(0, 4)
        after = rng.randrange(0, 3)
        data = b"CONNECT\naccept-version:1.2\nhost:/\n\n\x00"
        data += b"".join(send(fuzz_queue, b"v%d" % i, receipt=f"c{case}-{i}") for i in range(before))
        data += BAD_FRAMES[kind](rng, fuzz_queue)
        data += b"".join(send(fuzz_queue, b"late", receipt=f"late{case}-{i}") for i in range(after))
        wire = Wire(gateway, transport)
        context = (case, transport, kind, before, data[:300])
        try:
            cut = rng.randrange(1, len(data)) if rng.random() < 0.3 else len(data)  # split the bytes sometimes
            wire.send(data[:cut])
            wire.send(data[cut:])
            assert wire.read().command == "CONNECTED", context
            receipts = [wire.read() for _ in range(before)]
            assert [f.headers.get("receipt-id") for f in receipts] == [f"c{case}-{i}" for i in range(before)], (
                kind, receipts
            )
            error = wire.read()
            assert error.command == "ERROR" and error.headers.get("message"), (kind, error)
            assert wire.closed_by_peer()
        finally:
            wire.close()
        stored += before
        seen_kinds[error.headers["message"]] = seen_kinds.get(error.headers["message"], 0) + 1
        if case % 50 == 0:  # the bystander is served all along
            bystander_out.send(send(bystander_queue, b"b%d" % sent_by_bystander, receipt=f"b{sent_by_bystander}"))
            assert bystander_out.read().headers["receipt-id"] == f"b{sent_by_bystander}"
            assert bystander_in.read().body == b"b%d" % sent_by_bystander
            sent_by_bystander += 1
    assert httpx.get(f"{gateway.http_url}/health").status_code == 200
    depth = httpx.get(f"{gateway.http_url}/destinations/queue/{fuzz_queue.removeprefix('/queue/')}").json()["depth"]
    assert depth == stored  # exactly the valid SENDs before each bad frame: nothing after one was acted on
    assert sent_by_bystander == (TCP_CASES + WS_CASES + 49) // 50
    assert len(seen_kinds) >= 10, seen_kinds
    bystander_in.close()
    bystander_out.close()
