"""A queue subscription's claims are sized by bytes: the first, before any message was seen, assumes the largest body
a client may send, so a backlog of large bodies is not claimed (leased, read, held in memory) dozens at a time for a
client that may never read them."""

from __future__ import annotations

import asyncio
from pathlib import Path

from app.broker.broker import Broker
from app.broker.subscriptions import CLAIM_BUDGET
from app.datasources.interface import DatasourceOptions, NewMessage
from app.datasources.registry import open_datasource
from tests.app.broker.test_ordering import Transport, frame


class Stalled(Transport):
    """A client that reads nothing: whatever is written stays in its write buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.backlog = 0
        self.message = asyncio.Event()

    def write(self, data: bytes) -> None:
        super().write(data)
        self.backlog += len(data)
        if b"MESSAGE" in data:
            self.message.set()

    def write_backlog(self) -> int:
        return self.backlog

    async def drained(self) -> None:
        await asyncio.Event().wait()  # never


async def test_the_first_claim_of_large_bodies_is_one_message_and_the_rest_wait_for_room(tmp_path: Path) -> None:
    ds = await open_datasource(f"sqlite:///{tmp_path}/c.db", DatasourceOptions())
    broker = Broker(ds)
    await broker.start()
    q = "/queue/large"
    body = b"x" * (3 * 1024 * 1024)  # three of them fill the claim budget
    try:
        await ds.queues.put([NewMessage(f"m{i}", q, {}, body) for i in range(20)])
        limits: list[int] = []
        claim = ds.queues.claim

        async def recording_claim(destination: str, **kwargs: object) -> object:
            limits.append(kwargs["limit"])  # type: ignore[arg-type]
            return await claim(destination, **kwargs)  # type: ignore[arg-type]

        ds.queues.claim = recording_claim  # type: ignore[method-assign]
        transport = Stalled()
        session = broker.open_session(transport, peer="127.0.0.1:1", kind="tcp")
        assert session is not None
        session.receive(frame("CONNECT", {"accept-version": "1.2", "host": "/"}))
        session.receive(frame("SUBSCRIBE", {"id": "s", "destination": q, "ack": "client-individual"}))
        await asyncio.wait_for(transport.message.wait(), 10)
        await ds.store.write(lambda conn: None)  # every claim asked so far has run
        assert limits[0] == 1, limits
        stats = await ds.queues.stats(q, now_ms=broker.now_ms())
        assert stats.unacked <= CLAIM_BUDGET // len(body) + 1, (stats, limits)  # what fits the budget, no more
    finally:
        await broker.stop()
        await ds.close()


async def test_many_queue_subscriptions_of_one_connection_share_one_claim_budget(tmp_path: Path) -> None:
    """Claims are bounded per connection, not per subscription: a client with queue subscriptions on many queues that
    reads nothing does not get one claim of large bodies held in memory for each of them."""
    ds = await open_datasource(f"sqlite:///{tmp_path}/c.db", DatasourceOptions())
    broker = Broker(ds)
    await broker.start()
    queues = [f"/queue/large{i}" for i in range(8)]
    body = b"x" * (3 * 1024 * 1024)
    try:
        await ds.queues.put([NewMessage(f"{q}-{i}", q, {}, body) for q in queues for i in range(3)])
        claimed: list[int] = []
        claim = ds.queues.claim

        async def recording_claim(destination: str, **kwargs: object) -> object:
            got = await claim(destination, **kwargs)  # type: ignore[arg-type]
            claimed.append(len(got))
            return got

        ds.queues.claim = recording_claim  # type: ignore[method-assign]
        transport = Stalled()
        session = broker.open_session(transport, peer="127.0.0.1:1", kind="tcp")
        assert session is not None
        session.receive(frame("CONNECT", {"accept-version": "1.2", "host": "/"}))
        for n, q in enumerate(queues):
            session.receive(frame("SUBSCRIBE", {"id": f"s{n}", "destination": q, "ack": "client-individual"}))
        await asyncio.wait_for(transport.message.wait(), 10)
        for _ in range(20):  # every subscription gets its turns: claims answered, held messages handed over
            await ds.store.write(lambda conn: None)
            await asyncio.sleep(0.01)
        # Before: each of the 8 subscriptions claimed one 3 MiB message or more (24 MiB) for a connection that reads
        # nothing. Now: what fits the budget, and the one message a claim may take past it.
        assert sum(claimed) * len(body) <= CLAIM_BUDGET + len(body), claimed
        session.connection_lost()
        await session.wait_ended()
        assert sum([(await ds.queues.stats(q, now_ms=broker.now_ms())).ready for q in queues]) == 3 * len(queues)
    finally:
        await broker.stop()
        await ds.close()
