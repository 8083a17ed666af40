"""A delivered message waiting for its ACK costs the gateway its id and lease, not its body: a client that reads its
messages and never acknowledges them (prefetch-count may be up to max_prefetch, bodies up to the frame limit) must not
make the gateway hold prefetch x body bytes. The body goes once it is written to the connection."""

from __future__ import annotations

import asyncio
import tracemalloc
from pathlib import Path

from app.broker.broker import Broker
from app.datasources.interface import DatasourceOptions, NewMessage
from app.datasources.registry import open_datasource
from tests.app.broker.test_ordering import Transport, frame

BODY = 1024 * 1024
COUNT = 24


class Reader(Transport):
    """A client that reads every byte at once (nothing stays in a write buffer) and keeps none of it."""

    def __init__(self) -> None:
        super().__init__()
        self.messages = 0
        self.all_read = asyncio.Event()

    def write(self, data: bytes) -> None:
        self.messages += data.count(b"MESSAGE\n")
        if self.messages >= COUNT:
            self.all_read.set()

    def writelines(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.write(bytes(chunk[:8]))  # a frame's head is its first chunk


async def test_unacknowledged_deliveries_do_not_keep_their_bodies(tmp_path: Path) -> None:
    ds = await open_datasource(f"sqlite:///{tmp_path}/u.db", DatasourceOptions())
    broker = Broker(ds)
    await broker.start()
    q = "/queue/unacked"
    try:
        await ds.queues.put([NewMessage(f"m{i}", q, {}, bytes([i]) * BODY) for i in range(COUNT)])
        tracemalloc.start()
        try:
            reader = Reader()
            session = broker.open_session(reader, peer="127.0.0.1:1", kind="tcp")
            assert session is not None
            session.receive(frame("CONNECT", {"accept-version": "1.2", "host": "/"}))
            session.receive(
                frame("SUBSCRIBE", {"id": "s", "destination": q, "ack": "client-individual", "prefetch-count": str(COUNT)})
            )
            await asyncio.wait_for(reader.all_read.wait(), 30)
            held, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        [sub] = session.subscriptions.values()
        assert len(sub.unacked) == COUNT  # all delivered, none acknowledged
        # Before: about COUNT MiB (every body kept until its ACK). A few bodies may be in flight in the claim's reads.
        assert held < 6 * BODY, f"{held / BODY:.1f} MiB held for {COUNT} unacknowledged 1 MiB messages"
        session.connection_lost()  # what it held goes back to the queue, by id and lease
        await session.wait_ended()
        stats = await ds.queues.stats(q, now_ms=broker.now_ms())
        assert (stats.ready, stats.unacked) == (COUNT, 0)
    finally:
        await broker.stop()
        await ds.close()
