"""PostgreSQL itself crashes under load (SIGKILL to every process of the cluster, fsync on) and comes back: the
gateway reconnects, the SENDs meanwhile wait in the failover buffer with their RECEIPTs, every receipted message is
delivered, and nothing acknowledged (with a RECEIPT) is delivered again after a second crash."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.gateway_process import start_gateway
from tests.mongodb_server import PostgresCluster, _unavailable, postgres_bin_dir
from tests.integration.durability import consume_every_message, send_through_a_crash

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
        def crash_and_restart() -> None:
            durable_cluster.kill()
            durable_cluster.start()

        receipted = send_through_a_crash(gateway, crash_and_restart, TOTAL, WINDOW)
        assert set(consume_every_message(gateway, TOTAL)) == set(receipted)
    finally:
        gateway.stop()
    # A second crash after the acknowledgements: nothing comes back, as nothing is stored any more.
    durable_cluster.kill()
    durable_cluster.start()
    assert stored(url) == 0
