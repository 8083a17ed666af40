"""The load generator's producer waits for the socket before it builds more SENDs, as a real client does (stomp.py
blocks in send). It did not with receipts on: a window of 500 SENDs of 1 MiB went into its write buffer at once, and
building that stalled the load generator for most of a second, so the large-message figures measured the load
generator. Here a real server accepts the connection and then reads nothing."""

from __future__ import annotations

import asyncio
import multiprocessing

from app.bench.client import BenchClient
from app.bench.workload import SEND_BATCH_BYTES, BenchConfig, Producer, Shared

BODY = 1024 * 1024


class _ConnectsThenReadsNothing(asyncio.Protocol):
    accepted: list[asyncio.BaseTransport] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.accepted.append(transport)

    def data_received(self, data: bytes) -> None:
        if data.startswith((b"CONNECT", b"STOMP")):
            self.transport.write(b"CONNECTED\nversion:1.2\n\n\x00")  # type: ignore[attr-defined]
            self.transport.pause_reading()  # type: ignore[attr-defined]


async def test_a_producer_of_large_bodies_waits_for_the_socket_instead_of_buffering_its_window() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_ConnectsThenReadsNothing, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cfg = BenchConfig(
        host="127.0.0.1", port=port, kind="queue", destination="/queue/q", producers=1, consumers=0, messages=100,
        duration=None, body_size=BODY, receipts=True, window=500, ack="auto", prefetch=None, version="1.2",
        vhost="/", login=None, passcode=None, processes=1, drain_timeout=1.0, connect_timeout=5.0, loop="asyncio",
    )  # fmt: skip
    producer = Producer(cfg, 0, 100, Shared(multiprocessing.get_context("spawn"), 1))
    await producer.connect()
    client = producer.client
    assert isinstance(client, BenchClient) and client.transport is not None
    running = asyncio.ensure_future(producer.run())
    try:
        while client._writable.is_set() or producer.sent == 0:  # until the socket is full and the producer told so
            await asyncio.sleep(0)
        for _ in range(100):  # let it go on as far as it would
            await asyncio.sleep(0)
        assert producer.sent <= 4, f"{producer.sent} SENDs of 1 MiB built while the socket took none"
        assert client.transport.get_write_buffer_size() <= 4 * SEND_BATCH_BYTES
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        client.transport.abort()  # (a full write buffer: close() would wait for it)
        for accepted in _ConnectsThenReadsNothing.accepted:
            accepted.abort()  # type: ignore[attr-defined]
        server.close()
        await server.wait_closed()
