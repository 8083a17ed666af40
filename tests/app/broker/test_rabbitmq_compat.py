"""The broker's side of what RabbitMQ clients expect (tests/integration/test_rabbitmq_clients.py has the stomp.py
view): topic prefetch and the bound on what waits for ACK room, UNSUBSCRIBE by destination, deleting a durable
subscription. A real broker and TCP listener on the in-memory datasource."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from app.broker.broker import Broker
from app.broker.config import BrokerConfig
from app.broker.session import Session
from app.broker.subscriptions import WAITING_OVERHEAD
from app.datasources.interface import Datasource, DatasourceOptions
from app.datasources.registry import open_datasource
from app.transports.tcp import start_tcp_listener
from stomp_core import ClientConnection, Connected, ErrorReceived, MessageReceived, ReceiptReceived


@pytest.fixture
async def memory() -> AsyncIterator[Datasource]:
    datasource = await open_datasource("memory://", DatasourceOptions())
    yield datasource
    await datasource.close()


class Peer:
    """A STOMP client over a real socket; ``raw`` writes exact bytes (frames ClientConnection will not write)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = ClientConnection()
        self.events: list[object] = []

    @classmethod
    async def open(cls, port: int, version: str = "1.2", client_id: str | None = None) -> Peer:
        peer = cls(*await asyncio.open_connection("127.0.0.1", port))
        peer.conn.connect(host="/", accept_version=[version], headers={"client-id": client_id} if client_id else None)
        await peer.flush()
        assert isinstance(await peer.next(), Connected)
        return peer

    async def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())
        await self.writer.drain()

    async def raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def next(self, timeout: float = 5) -> object:
        while not self.events:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            assert data, "the gateway closed the connection"
            self.events.extend(self.conn.receive_data(data))
        return self.events.pop(0)

    async def message(self) -> MessageReceived:
        event = await self.next()
        assert isinstance(event, MessageReceived), event
        return event

    async def receipt(self, receipt_id: str) -> None:
        event = await self.next()
        assert isinstance(event, ReceiptReceived) and event.receipt_id == receipt_id, event

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def running(memory: Datasource) -> AsyncIterator[tuple[Broker, int]]:
    broker = Broker(memory, BrokerConfig(max_session_buffer=64 * 1024))
    await broker.start()
    server = await start_tcp_listener(broker, "127.0.0.1", 0)
    try:
        yield broker, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await broker.stop()


def only_session(broker: Broker) -> Session:
    (session,) = broker.sessions.values()
    return session


async def test_topic_messages_waiting_for_ack_room_are_bounded_per_connection(running: tuple[Broker, int]) -> None:
    broker, port = running
    peer = await Peer.open(port)
    session = only_session(broker)
    for sub_id in ("a", "b"):  # two subscriptions of one connection share the bound
        peer.conn.subscribe("/topic/t", sub_id, ack="client-individual", headers={"prefetch-count": "1"}, receipt=sub_id)
        await peer.flush()
        await peer.receipt(sub_id)
    peer.conn.subscribe("/topic/marker", "m", receipt="m")  # auto: its MESSAGE says the follower got this far
    await peer.flush()
    await peer.receipt("m")
    body = b"x" * (10 * 1024)
    cost = len(body) + WAITING_OVERHEAD
    await broker.publish("/topic/t", {}, body)
    assert {(await peer.message()).subscription for _ in range(2)} == {"a", "b"}  # prefetch-count reached
    fit = 64 * 1024 // (2 * cost)  # each message waits twice, once per subscription: 3 fit in 64 KiB
    for _ in range(fit):
        await broker.publish("/topic/t", {}, body)
    await broker.publish("/topic/marker", {}, b"here")
    assert (await peer.message()).subscription == "m"  # no ERROR before it: every one of them waits
    assert session.topic_waiting_bytes == 2 * fit * cost
    await broker.publish("/topic/t", {}, body)  # one too many for the bound
    error = await peer.next()
    assert isinstance(error, ErrorReceived) and error.message == "Slow consumer", error
    assert b"max_session_buffer=65536" in error.body
    await session.wait_ended()
    assert session.topic_waiting_bytes == 0  # closing the subscriptions gave back what waited
    peer.close()


async def test_an_ack_in_a_committed_transaction_lets_the_next_topic_message_out(running: tuple[Broker, int]) -> None:
    broker, port = running
    peer = await Peer.open(port)
    peer.conn.subscribe("/topic/t", "s", ack="client", headers={"prefetch-count": "1"}, receipt="s")
    await peer.flush()
    await peer.receipt("s")
    for i in range(3):
        await broker.publish("/topic/t", {}, f"m{i}".encode())
    first = await peer.message()
    assert first.body == b"m0" and first.ack is not None
    peer.conn.begin("tx")
    peer.conn.ack(first.ack, transaction="tx")
    peer.conn.commit("tx", receipt="c")
    await peer.flush()
    second = await peer.message()  # the COMMIT's settle made room: the next message, then the RECEIPT
    await peer.receipt("c")
    assert second.body == b"m1" and second.ack is not None
    peer.conn.ack(second.ack, receipt="a")
    await peer.flush()
    third = await peer.message()
    assert third.body == b"m2"
    await peer.receipt("a")
    peer.close()


async def test_a_10_unsubscribe_by_destination_ends_the_one_made_there_without_an_id_first(running: tuple[Broker, int]) -> None:
    broker, port = running
    peer = await Peer.open(port, "1.0")
    session = only_session(broker)
    await peer.raw(
        b"SUBSCRIBE\ndestination:/queue/q\n\n\x00SUBSCRIBE\ndestination:/queue/q\nid:given\n\n\x00"
        b"SUBSCRIBE\ndestination:/topic/other\nid:kept\nreceipt:s\n\n\x00"
    )
    await peer.receipt("s")
    assert set(session.subscriptions) == {"/queue/q", "given", "kept"}
    await peer.raw(b"UNSUBSCRIBE\ndestination:/queue/q\nreceipt:u\n\n\x00")
    await peer.receipt("u")
    assert set(session.subscriptions) == {"given", "kept"}  # the one made without an id, as RabbitMQ does
    await peer.raw(b"UNSUBSCRIBE\ndestination:/queue/q\nreceipt:u2\n\n\x00")
    await peer.receipt("u2")
    assert set(session.subscriptions) == {"kept"}  # then the only one left there
    await peer.raw(b"UNSUBSCRIBE\ndestination:/queue/q\nreceipt:again\n\n\x00")  # none left there: an ERROR
    error = await peer.next()
    assert isinstance(error, ErrorReceived) and error.message == "Bad subscription"
    peer.close()


async def test_an_unsubscribe_saying_durable_forgets_the_position(memory: Datasource, running: tuple[Broker, int]) -> None:
    broker, port = running
    peer = await Peer.open(port, client_id="forgetful")
    peer.conn.subscribe("/topic/d", "1", ack="client", headers={"durable": "true"}, receipt="s")
    await peer.flush()
    await peer.receipt("s")
    for i in range(3):
        await broker.publish("/topic/d", {}, f"m{i}".encode())
    assert [(await peer.message()).body for _ in range(3)] == [b"m0", b"m1", b"m2"]  # none acknowledged
    peer.conn.unsubscribe("1", receipt="kept")
    await peer.flush()
    await peer.receipt("kept")
    assert await memory.topics.load_cursor("forgetful/1") == 0  # kept: saved before the unacknowledged messages
    peer.conn.subscribe("/topic/d", "1", ack="client", headers={"durable": "true"}, receipt="s2")
    await peer.flush()
    await peer.receipt("s2")
    assert [(await peer.message()).body for _ in range(3)] == [b"m0", b"m1", b"m2"]  # replayed
    await peer.raw(b"UNSUBSCRIBE\nid:1\ndurable:true\nreceipt:deleted\n\n\x00")
    await peer.receipt("deleted")
    assert await memory.topics.load_cursor("forgetful/1") is None  # deleted: a new SUBSCRIBE starts at the end
    assert "forgetful/1" not in broker.durable_in_use
    peer.close()


async def test_an_ack_naming_an_existing_subscription_never_settles_another(
    memory: Datasource, running: tuple[Broker, int]
) -> None:
    """A topic message reaches two subscriptions of one connection under one message id. Acknowledging it twice on
    the live one must not settle it, cumulatively, on the durable one: that moved the durable position past
    messages it never acknowledged (found by a review of the relaxed ACK look-up)."""
    broker, port = running
    peer = await Peer.open(port, client_id="careful")
    peer.conn.subscribe("/topic/both", "a", ack="client-individual", receipt="a")
    peer.conn.subscribe("/topic/both", "b", ack="client", headers={"durable": "true"}, receipt="b")
    await peer.flush()
    await peer.receipt("a")
    await peer.receipt("b")
    for i in range(2):
        await broker.publish("/topic/both", {}, f"m{i}".encode())
    got = [await peer.message() for _ in range(4)]
    on_a = [m for m in got if m.subscription == "a"]
    assert on_a[1].ack is not None
    peer.conn.ack(on_a[1].ack, receipt="once")
    await peer.flush()
    await peer.receipt("once")
    session = only_session(broker)
    peer.conn.ack(on_a[1].ack, receipt="twice")  # repeated: held to "a", where it is settled already
    await peer.flush()
    error = await peer.next()
    assert isinstance(error, ErrorReceived) and error.message == "Invalid ack", error
    await session.wait_ended()
    assert await memory.topics.load_cursor("careful/b") == 0  # "b" acknowledged nothing: its place did not move
    peer.close()


async def test_headers_count_against_the_waiting_bound(running: tuple[Broker, int]) -> None:
    """Headers may be as large as about 800 KiB beside a body, so what waits for ACK room is counted with them: empty
    bodies with large headers reach the bound as soon as their bytes do (before, each counted 512 bytes, and one
    connection could make the gateway hold gigabytes of headers)."""
    broker, port = running
    peer = await Peer.open(port)
    peer.conn.subscribe("/topic/h", "s", ack="client-individual", headers={"prefetch-count": "1"}, receipt="s")
    await peer.flush()
    await peer.receipt("s")
    headers = {f"h{i}": "v" * 8000 for i in range(3)}  # 24 KiB of headers, an empty body
    await broker.publish("/topic/h", headers, b"")
    await peer.message()  # prefetch-count reached: the rest wait
    for _ in range(3):  # 3 x 24 KiB passes the 64 KiB bound
        await broker.publish("/topic/h", headers, b"")
    error = await peer.next()
    assert isinstance(error, ErrorReceived) and error.message == "Slow consumer", error
    peer.close()


async def test_deliveries_to_a_durable_subscription_are_counted(running: tuple[Broker, int]) -> None:
    """stompgate_messages_delivered_total (and the console's deliver rate) left durable subscriptions out."""
    broker, port = running
    peer = await Peer.open(port, client_id="counted")
    peer.conn.subscribe("/topic/counted", "d", headers={"durable": "true"}, receipt="d")
    await peer.flush()
    await peer.receipt("d")
    for i in range(3):
        await broker.publish("/topic/counted", {}, f"m{i}".encode())
    assert [(await peer.message()).body for _ in range(3)] == [b"m0", b"m1", b"m2"]
    sample = broker.metrics.registry.get_sample_value
    assert sample("stompgate_messages_delivered_total", {"destination": "/topic/counted"}) == 3
    peer.close()
