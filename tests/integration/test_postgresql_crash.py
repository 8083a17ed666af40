"""PostgreSQL itself crashes under load (SIGKILL to every process of the cluster, fsync on) and comes back: the
gateway reconnects, the SENDs meanwhile wait in the failover buffer with their RECEIPTs, every receipted message is
delivered, and nothing acknowledged (with a RECEIPT) is delivered again after a second crash."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.gateway_process import start_gateway
from tests.mongodb_server import PostgresCluster, _unavailable, postgres_bin_dir
from tests.raw_stomp import RawClient

pytestmark = [pytest.mark.postgresql, pytest.mark.slow, pytest.mark.timeout(300)]

TOTAL = 2_000
WINDOW = 100  # SENDs in flight before the producer waits for their RECEIPTs
NAMESPACE = "crash"


@pytest.fixture
def durable_cluster() -> Iterator[PostgresCluster]:
    if postgres_bin_dir() is None:
        _unavailable("PostgreSQL binaries not found (run .ci/services.sh: Debian package postgresql)")
    cluster = PostgresCluster(durable=True)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def stored(url: str) -> int:
    async def count() -> int:
        conn = await asyncpg.connect(url)
        try:
            return int(await conn.fetchval(f'SELECT count(*) FROM "{NAMESPACE}_messages"'))
        finally:
            await conn.close()

    return asyncio.run(count())


def test_postgresql_killed_mid_stream_loses_nothing_receipted(tmp_path: Path, durable_cluster: PostgresCluster) -> None:
    url = f"postgresql://postgres@127.0.0.1:{durable_cluster.port}/{durable_cluster.new_database('crash')}"
    gateway = start_gateway(tmp_path, url, ["--namespace", NAMESPACE, "--lease-ms", "5000"])
    try:
        producer = RawClient(gateway.stomp_port)
        producer.connect()
        receipted: list[str] = []
        crashed = threading.Event()
        for start in range(0, TOTAL, WINDOW):
            batch = range(start, start + WINDOW)
            producer.send(b"".join(f"SEND\ndestination:/queue/crash\nreceipt:r{i}\n\nm{i}\x00".encode() for i in batch))
            if start == TOTAL // 4:  # some receipted, a window in flight: crash the database, then bring it back
                durable_cluster.kill()
                crashed.set()
                durable_cluster.start()
            for _ in batch:
                frame = producer.read(timeout=120)
                assert frame.command == "RECEIPT", (frame.command, frame.headers, frame.body[:300])
                receipted.append("m" + frame.headers["receipt-id"][1:])
        assert crashed.is_set() and len(receipted) == TOTAL
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
    durable_cluster.kill()
    durable_cluster.start()
    assert stored(url) == 0
