"""A connection's SENDs waiting for the datasource are bounded in bytes, not only in number: a producer pipelining
large bodies (up to the frame limit each) while the store is slow stops being read once max_inflight_bytes_per_session
bytes wait, instead of making the gateway hold max_inflight_per_session of them (2,000 x 4 MiB). Reading resumes once
the store caught up, and every SEND is stored and receipted."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from app.broker.broker import Broker
from app.broker.config import BrokerConfig
from app.datasources.interface import Changes, DatasourceOptions, NewMessage
from app.datasources.registry import open_datasource
from tests.app.broker.test_ordering import Transport, frame

BODY = 1024 * 1024
LIMIT = 4 * BODY


class Pausable(Transport):
    def __init__(self) -> None:
        super().__init__()
        self.paused = False
        self.connected = asyncio.Event()

    def write(self, data: bytes) -> None:
        super().write(data)
        if data.startswith(b"CONNECTED"):
            self.connected.set()

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


async def test_a_producer_of_large_bodies_is_paused_by_bytes_in_flight(tmp_path: Path) -> None:
    ds = await open_datasource(f"sqlite:///{tmp_path}/b.db", DatasourceOptions())
    broker = Broker(ds, BrokerConfig(max_inflight_bytes_per_session=LIMIT))
    await broker.start()
    store_may_go_on = asyncio.Event()
    apply, put = ds.apply, ds.queues.put

    # The injected fault: a store that takes its time (SENDs reach it through apply or put, as the store prefers).
    async def slow_apply(changes: Changes) -> None:
        await store_may_go_on.wait()
        await apply(changes)

    async def slow_put(messages: Sequence[NewMessage]) -> None:
        await store_may_go_on.wait()
        await put(messages)

    ds.apply = slow_apply  # type: ignore[method-assign]
    ds.queues.put = slow_put  # type: ignore[method-assign]
    try:
        transport = Pausable()
        session = broker.open_session(transport, peer="127.0.0.1:1", kind="tcp")
        assert session is not None
        session.receive(frame("CONNECT", {"accept-version": "1.2", "host": "/"}))
        await asyncio.wait_for(transport.connected.wait(), 10)
        sent = 0
        while not transport.paused and sent < 40:  # a client writes as long as the gateway reads
            session.receive(frame("SEND", {"destination": "/queue/big", "receipt": f"r{sent}"}, b"x" * BODY))
            sent += 1
        assert transport.paused, f"{sent} SENDs of 1 MiB were read while the store held all of them"
        assert sent == LIMIT // BODY + 1  # reading stops with the first SEND past the bound
        store_may_go_on.set()
        session.receive(frame("SEND", {"destination": "/queue/big", "receipt": "end"}, b"last"))  # read before the pause took
        await asyncio.wait_for(transport.receipted.wait(), 10)
        assert not transport.paused
        assert transport.out.count(b"RECEIPT\n") == sent + 1
        stats = await ds.queues.stats("/queue/big", now_ms=broker.now_ms())
        assert stats.ready == sent + 1
    finally:
        store_may_go_on.set()
        await broker.stop()
        await ds.close()
