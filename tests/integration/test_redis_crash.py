"""Redis itself crashes under load (SIGKILL to redis-server, ``appendfsync always``) and comes back on its
append-only file: the gateway reconnects, the SENDs meanwhile wait in the failover buffer with their RECEIPTs, every
receipted message is delivered, and nothing acknowledged (with a RECEIPT) is delivered again after a second crash."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.gateway_process import start_gateway
from tests.raw_stomp import RawClient
from tests.redis_server import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(300)]

TOTAL = 2_000
WINDOW = 100  # SENDs in flight before the producer waits for their RECEIPTs
NAMESPACE = "crash"


@pytest.fixture
def server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


def stored(url: str) -> int:
    async def count() -> int:
        client = aioredis.from_url(url)
        try:
            return int(await client.hlen(f"{{{NAMESPACE}}}:ids"))
        finally:
            await client.aclose()

    return asyncio.run(count())


def test_redis_killed_mid_stream_loses_nothing_receipted(tmp_path: Path, server: RedisServer) -> None:
    gateway = start_gateway(tmp_path, server.url, ["--namespace", NAMESPACE, "--lease-ms", "5000"])
    try:
        producer = RawClient(gateway.stomp_port)
        producer.connect()
        receipted: list[str] = []
        crashed = threading.Event()
        for start in range(0, TOTAL, WINDOW):
            batch = range(start, start + WINDOW)
            producer.send(b"".join(f"SEND\ndestination:/queue/crash\nreceipt:r{i}\n\nm{i}\x00".encode() for i in batch))
            if start == TOTAL // 4:  # some receipted, a window in flight: crash Redis, then bring it back
                server.stop(kill=True)
                crashed.set()
                server.start()
            for _ in batch:
                frame = producer.read(timeout=120)
                assert frame.command == "RECEIPT", (frame.command, frame.headers, frame.body[:300])
                receipted.append("m" + frame.headers["receipt-id"][1:])
        assert crashed.is_set() and len(receipted) == TOTAL
        assert "Redis unreachable" in gateway.log()  # writes met the outage and waited in the buffer
        producer.close()

        consumer = RawClient(gateway.stomp_port)
        consumer.connect()
        consumer.frame("SUBSCRIBE", {"id": "s", "destination": "/queue/crash", "ack": "client-individual"})
        delivered: list[str] = []
        acks = receipts = 0
        while len(set(delivered)) < TOTAL or receipts < acks:  # every message, and every ACK durably applied
            frame = consumer.read(timeout=60)
            if frame.command == "RECEIPT":
                receipts += 1
                continue
            assert frame.command == "MESSAGE", (frame.command, frame.headers, frame.body[:300])
            delivered.append(frame.body.decode())
            consumer.frame("ACK", {"id": frame.headers["ack"], "receipt": f"a{acks}"})
            acks += 1
        assert set(delivered) == set(receipted)
        consumer.close()
    finally:
        gateway.stop()
    # A second crash after the acknowledgements: nothing comes back, as nothing is stored any more.
    server.stop(kill=True)
    server.start()
    assert stored(server.url) == 0
