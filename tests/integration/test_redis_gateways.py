"""Scale-out on Redis: stateless gateways on one Redis server. Each message once across gateways; a gateway killed
mid-run loses nothing (its unacknowledged messages come back through the other after the lease); every subscriber on
every gateway sees every topic message in order; on one server and on a Redis Cluster. The flow is
tests/integration/scale_out.py."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import NamedTuple
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from app.datasources.redis.store import queue_prefix
from tests.gateway_process import Gateway, start_gateway
from tests.integration.scale_out import DESTINATION, LEASE_MS, TOTAL, check_topic_on_both_gateways, run_queue

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(300)]


def stored(url: str, namespace: str, destination: str, cluster: bool) -> int:
    async def count() -> int:
        client = RedisCluster.from_url(url) if cluster else aioredis.from_url(url)
        try:
            prefix = queue_prefix(namespace, destination)
            return int(await client.zcard(f"{prefix}:ready")) + int(await client.zcard(f"{prefix}:leased"))
        finally:
            await client.aclose()

    return asyncio.run(count())


class Setup(NamedTuple):
    gateways: list[Gateway]
    namespace: str
    url: str
    cluster: bool

    def stored(self) -> int:
        return stored(self.url, self.namespace, DESTINATION, self.cluster)


@pytest.fixture(params=["redis_url", "redis_cluster_url"])
def two_gateways(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Setup]:
    """Two gateways on one namespace of one Redis server, or of a Redis Cluster of three masters."""
    url = request.getfixturevalue(request.param)
    namespace = f"s{uuid.uuid4().hex[:12]}"
    extra = ["--namespace", namespace, "--lease-ms", str(LEASE_MS), "--log-level", "warning"]
    gateways = [start_gateway(tmp_path, url, extra) for _ in range(2)]
    try:
        yield Setup(gateways, namespace, url, request.param == "redis_cluster_url")
    finally:
        for gw in gateways:
            gw.stop()


def test_two_gateways_four_consumers_each_message_exactly_once(two_gateways: Setup) -> None:
    counts = run_queue(two_gateways.gateways, two_gateways.stored, kill_second_at=None)
    duplicates = {body: n for body, n in counts.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} messages delivered more than once, e.g. {list(duplicates)[:5]}"


def test_a_gateway_killed_mid_run_loses_nothing(two_gateways: Setup) -> None:
    counts = run_queue(two_gateways.gateways, two_gateways.stored, kill_second_at=TOTAL // 4)
    # What the killed gateway had delivered but not seen acknowledged came back through the other: at least once.
    assert len(counts) == TOTAL


def test_topic_reaches_every_subscriber_on_both_gateways_in_order(two_gateways: Setup) -> None:
    check_topic_on_both_gateways(two_gateways.gateways)
