"""Group commit on PostgreSQL: the queue SENDs and ACKs that arrive together are one ``apply``, one statement and one
transaction, and their RECEIPTs come after it committed. Driven through a real broker session on a real server."""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Any

import pytest

from app.broker.broker import Broker
from app.datasources.interface import Changes, DatasourceOptions
from app.datasources.registry import open_datasource
from tests.app.broker.test_ordering import Transport, frame

pytestmark = pytest.mark.postgresql


class Frames(Transport):
    """The frames the session wrote, and an event per receipt id."""

    def __init__(self) -> None:
        super().__init__()
        self.receipts: dict[str, asyncio.Event] = {}
        self.message = asyncio.Event()

    def write(self, data: bytes) -> None:
        super().write(data)
        for receipt in re.findall(rb"receipt-id:([^\n]+)", data):
            self.receipts.setdefault(receipt.decode(), asyncio.Event()).set()
        if data.startswith(b"MESSAGE"):
            self.message.set()

    async def receipt(self, name: str) -> None:
        await asyncio.wait_for(self.receipts.setdefault(name, asyncio.Event()).wait(), 30)


async def test_sends_and_acks_that_arrive_together_are_one_transaction(postgresql_url: str) -> None:
    ds = await open_datasource(postgresql_url, DatasourceOptions(namespace=f"g{uuid.uuid4().hex[:12]}"))
    applied: list[Changes] = []
    separate: list[str] = []
    apply, put, ack = ds.apply, ds.queues.put, ds.queues.ack

    async def spy_apply(changes: Changes) -> None:
        applied.append(changes)
        await apply(changes)

    async def spy_put(messages: Any) -> None:
        separate.append("put")
        await put(messages)

    async def spy_ack(message_ids: Any, leases: Any = None) -> None:
        separate.append("ack")
        await ack(message_ids, leases)

    ds.apply, ds.queues.put, ds.queues.ack = spy_apply, spy_put, spy_ack  # type: ignore[method-assign]
    broker = Broker(ds)
    await broker.start()
    try:
        transport = Frames()
        session = broker.open_session(transport, peer="127.0.0.1:1", kind="tcp")
        assert session is not None
        session.receive(frame("CONNECT", {"accept-version": "1.2", "host": "/"}))
        q = "/queue/group"
        session.receive(frame("SEND", {"destination": q, "receipt": "first"}, b"first"))
        await transport.receipt("first")
        session.receive(frame("SUBSCRIBE", {"destination": q, "id": "s", "ack": "client-individual"}))
        await asyncio.wait_for(transport.message.wait(), 30)
        [ack_id] = re.findall(rb"\nack:([^\n]+)", transport.out)
        applied.clear()
        separate.clear()

        # one read: the ACK of the first message and two SENDs, the last with a receipt
        session.receive(
            frame("ACK", {"id": ack_id.decode()})
            + frame("SEND", {"destination": q}, b"second")
            + frame("SEND", {"destination": q, "receipt": "together"}, b"third")
        )
        await transport.receipt("together")

        assert separate == []
        [changes] = applied
        assert [m.body for m in changes.queue] == [b"second", b"third"]
        assert len(changes.acks) == 1 and not (changes.topic or changes.requeue or changes.dead_letter)
        stats = await ds.queues.stats(q, now_ms=broker.now_ms())
        assert stats.ready + stats.unacked == 2  # the second and third (perhaps delivered by now); the first is gone
    finally:
        await broker.stop()
        await ds.close()
