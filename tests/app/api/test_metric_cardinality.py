"""Bounded metric cardinality (delivery core issue): per-destination series for at most ``metrics_max_destinations``
destinations, the rest under ``destination="_other"``, and the series of a destination that is gone removed."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from app.api.rates import DELIVERED_COUNTER, RateTracker
from app.broker.metrics import OTHER
from tests.app.api.conftest import Api, api_client
from tests.app.api.test_inspect import StompClient, publish

PER_DESTINATION = (
    "stompgate_destination_messages_published_total",
    "stompgate_messages_delivered_total",
    "stompgate_queue_depth",
    "stompgate_queue_unacked",
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def scrape(api: Api) -> dict[str, dict[str, float]]:
    """Per-destination sample values by sample name, from the Prometheus text of /metrics."""
    response = await api.client.get("/metrics")
    assert response.status_code == 200
    found: dict[str, dict[str, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if "destination" in sample.labels:
                found[sample.name][sample.labels["destination"]] = sample.value
    return found


async def connect(api: Api) -> StompClient:
    reader, writer = await asyncio.open_connection("127.0.0.1", api.state["stomp_port"])
    client = StompClient(reader, writer)
    await client.frame("CONNECT", **{"accept-version": "1.2", "host": "/"})
    assert (await client.read()).startswith(b"CONNECTED")
    return client


async def close(client: StompClient) -> None:
    client.writer.close()
    await client.writer.wait_closed()


async def subscribe(client: StompClient, destination: str, sub_id: str) -> None:
    """SUBSCRIBE and wait for its RECEIPT, so the subscription is in place."""
    await client.frame("SUBSCRIBE", id=sub_id, destination=destination, receipt=f"r-{sub_id}")
    assert (await client.read()).startswith(b"RECEIPT")


async def test_per_destination_series_stay_within_the_cap_and_add_up() -> None:
    cap = 5
    names = [f"/queue/c{i}" for i in range(cap + 50)]
    async with api_client(metrics_max_destinations=cap) as api:
        for name in names:
            await publish(api, name.removeprefix("/"))
        stored = await scrape(api)
        for sample in ("stompgate_destination_messages_published_total", "stompgate_queue_depth"):
            labels = stored[sample]
            assert len(labels) <= cap + 1, (sample, sorted(labels))
            assert OTHER in labels
            assert sum(labels.values()) == len(names)
        assert set(stored["stompgate_queue_unacked"]) == set(stored["stompgate_queue_depth"])

        client = await connect(api)
        try:
            for i, name in enumerate(names):
                await client.frame("SUBSCRIBE", id=f"s{i}", destination=name, receipt=f"r{i}")
            commands = [(await client.read()).split(b"\n", 1)[0] for _ in range(2 * len(names))]
            assert commands.count(b"MESSAGE") == commands.count(b"RECEIPT") == len(names)  # messages and receipts mix
            delivered = (await scrape(api))["stompgate_messages_delivered_total"]
            assert len(delivered) <= cap + 1, sorted(delivered)
            assert OTHER in delivered
            assert sum(delivered.values()) == len(names)

            # The console and the REST listing read the same counters: `_other` is no destination of theirs, and the
            # console's total still counts every delivery.
            overview = (await api.client.get("/console/api/overview")).json()
            assert OTHER not in {d["name"] for d in overview["destinations"]}
            assert overview["delivered_total"] == len(names)
            listed = {d["destination"] for d in (await api.client.get("/destinations")).json()}
            assert OTHER not in listed
        finally:
            await close(client)


async def test_a_forgotten_destination_loses_its_series_and_frees_its_slot() -> None:
    async with api_client(metrics_max_destinations=2) as api:
        for name in ("queue/a", "queue/b", "queue/c"):
            await publish(api, name)
        published = (await scrape(api))["stompgate_destination_messages_published_total"]
        assert published == {"/queue/a": 1.0, "/queue/b": 1.0, OTHER: 1.0}

        assert api.broker.metrics.forget("/queue/a")
        assert "/queue/a" not in (await scrape(api))["stompgate_destination_messages_published_total"]

        await publish(api, "queue/d")  # takes the freed slot
        published = (await scrape(api))["stompgate_destination_messages_published_total"]
        assert published == {"/queue/b": 1.0, "/queue/d": 1.0, OTHER: 1.0}


async def test_the_broker_forgets_only_destinations_that_are_gone() -> None:
    """Idle for metrics_idle_seconds, no subscriber here and no stored message: its series go and its slot frees."""
    async with api_client(metrics_max_destinations=4) as api:
        clock = Clock()
        api.broker.metrics.clock = clock
        idle = api.broker.config.metrics_idle_seconds
        client = await connect(api)
        try:
            await subscribe(client, "/queue/kept", "kept")
            await subscribe(client, "/queue/drained", "drained")
            for name in ("queue/kept", "queue/drained"):
                await publish(api, name)
                assert (await client.read()).startswith(b"MESSAGE")
            await client.frame("UNSUBSCRIBE", id="drained", receipt="r-unsub")
            assert (await client.read()).startswith(b"RECEIPT")
            await publish(api, "queue/backlog")  # nobody consumes it: it keeps a message
            await publish(api, "topic/news")  # nobody subscribed: gone once idle
            await publish(api, "queue/late")  # over the cap
            assert OTHER in (await scrape(api))["stompgate_destination_messages_published_total"]

            clock.now += idle - 1
            await api.broker.forget_idle_destinations()
            before = await scrape(api)
            assert set(before["stompgate_destination_messages_published_total"]) == {
                "/queue/kept", "/queue/drained", "/queue/backlog", "/topic/news", OTHER
            }

            clock.now += 2
            await api.broker.forget_idle_destinations()
            after = await scrape(api)
            # Every slot was taken, so the idle queue that still holds a message gives its slot back too (else one
            # message left in each of many invented queues would pin the slots for good); the subscribed one stays.
            assert set(after["stompgate_destination_messages_published_total"]) == {"/queue/kept", OTHER}
            assert set(after["stompgate_messages_delivered_total"]) == {"/queue/kept"}

            await publish(api, "queue/late")  # a freed slot: its own series now
            published = (await scrape(api))["stompgate_destination_messages_published_total"]
            assert published["/queue/late"] == 1.0
            assert published[OTHER] == 1.0  # what it sent while over the cap stays counted there
        finally:
            await close(client)


class _Rates(RateTracker):
    """The tracker's window over recorded values only (``rates`` reads a registry)."""

    def window_rates(self, values: dict[tuple[str, str], float]) -> dict[tuple[str, str], float]:
        registry = CollectorRegistry()
        counter = Counter(DELIVERED_COUNTER + "_total", "d", ["destination"], registry=registry)
        for (_, destination), value in values.items():
            counter.labels(destination).inc(value)
        return self.rates(registry)


def test_a_forgotten_series_does_not_restart_the_other_rates() -> None:
    clock = Clock()
    tracker = _Rates(window=60, clock=clock)
    tracker.record({(DELIVERED_COUNTER, "/queue/a"): 10.0, (DELIVERED_COUNTER, "/queue/b"): 0.0})
    clock.now += 1
    tracker.record({(DELIVERED_COUNTER, "/queue/b"): 10.0})  # /queue/a was forgotten
    clock.now += 1
    rates = tracker.window_rates({(DELIVERED_COUNTER, "/queue/b"): 10.0})
    assert rates == {(DELIVERED_COUNTER, "/queue/b"): 5.0}


async def test_a_queue_holding_messages_keeps_its_slot_while_slots_are_free() -> None:
    async with api_client(metrics_max_destinations=10) as api:
        clock = Clock()
        api.broker.metrics.clock = clock
        await publish(api, "queue/backlog")  # nobody consumes it: it keeps a message
        await publish(api, "topic/news")
        clock.now += api.broker.config.metrics_idle_seconds + 1
        await api.broker.forget_idle_destinations()
        assert set((await scrape(api))["stompgate_destination_messages_published_total"]) == {"/queue/backlog"}
