"""Redis itself crashes under load (SIGKILL to redis-server, ``appendfsync always``) and comes back on its
append-only file: the gateway reconnects, the SENDs meanwhile wait in the failover buffer with their RECEIPTs, every
receipted message is delivered, and nothing acknowledged (with a RECEIPT) is delivered again after a second crash."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.gateway_process import start_gateway
from tests.integration.durability import consume_every_message, send_through_a_crash
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
        def crash_and_restart() -> None:
            server.stop(kill=True)
            server.start()

        receipted = send_through_a_crash(gateway, crash_and_restart, TOTAL, WINDOW)
        assert "Redis unreachable" in gateway.log()  # writes met the outage and waited in the buffer
        assert set(consume_every_message(gateway, TOTAL)) == set(receipted)
    finally:
        gateway.stop()
    # A second crash after the acknowledgements: nothing comes back, as nothing is stored any more.
    server.stop(kill=True)
    server.start()
    assert stored(server.url) == 0
