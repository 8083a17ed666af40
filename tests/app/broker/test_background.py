"""Background work survives failures (lease renewal, cursor saves) and a durable ACK's RECEIPT waits for the saved
position: a real broker, a real TCP listener and socket, and faults injected into the in-memory datasource."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from app.broker.broker import Broker
from app.broker.config import BrokerConfig
from app.broker.supervision import FAILING_AFTER
from app.datasources.interface import Datasource, DatasourceOptions, StoredMessage
from app.datasources.registry import open_datasource
from app.transports.tcp import start_tcp_listener
from stomp_core import ClientConnection, Connected, MessageReceived, ReceiptReceived


@pytest.fixture
async def memory() -> AsyncIterator[Datasource]:
    datasource = await open_datasource("memory://", DatasourceOptions())
    yield datasource
    await datasource.close()


async def test_lease_renewal_goes_on_after_any_error_and_ready_shows_it_meanwhile(memory: Datasource) -> None:
    """Renewal used to catch only DatasourceUnavailable: any other error ended it for the life of the process, and
    every in-flight message became claimable again a lease later."""
    broker = Broker(memory, BrokerConfig(lease_ms=1500))  # renews every 0.5 s
    renew = memory.queues.renew
    calls = 0
    failing_seen = asyncio.Event()
    renewed_after_failures = asyncio.Event()

    async def flaky(owner: str, *, lease_ms: int, now_ms: int) -> None:
        nonlocal calls
        calls += 1
        if calls <= FAILING_AFTER:
            raise RuntimeError("injected: the driver raised something unexpected")
        if broker.health.failing():
            failing_seen.set()  # it was reported as failing before this success
        await renew(owner, lease_ms=lease_ms, now_ms=now_ms)
        if calls >= FAILING_AFTER + 2:
            renewed_after_failures.set()

    memory.queues.renew = flaky  # type: ignore[method-assign]
    await broker.start()
    try:
        await asyncio.wait_for(renewed_after_failures.wait(), 20)
        assert failing_seen.is_set()
        assert broker.health.failing() == {}
        gauge = broker.metrics.registry.get_sample_value("stompgate_background_failing", {"loop": "lease renewal"})
        assert gauge == 0.0  # it was set to 1 while failing, back to 0 now
    finally:
        await broker.stop()


class StompSocket:
    """A STOMP client over a real socket, with the core's client connection doing the framing."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = ClientConnection()
        self.events: list[object] = []

    async def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())
        await self.writer.drain()

    async def next(self) -> object:
        while not self.events:
            data = await self.reader.read(65536)
            assert data, "the gateway closed the connection"
            self.events.extend(self.conn.receive_data(data))
        return self.events.pop(0)

    @classmethod
    async def subscribed_to_queue(cls, port: int) -> StompSocket:
        """Connected, with a client-individual subscription (id 1) to /queue/q sent."""
        client = cls(*await asyncio.open_connection("127.0.0.1", port))
        client.conn.connect(host="/", login="me")
        await client.flush()
        assert isinstance(await client.next(), Connected)
        client.conn.subscribe("/queue/q", "1", ack="client-individual")
        await client.flush()
        return client



async def test_a_durable_acks_receipt_waits_until_the_position_is_saved(memory: Datasource) -> None:
    broker = Broker(memory, BrokerConfig())
    await broker.start()
    server = await start_tcp_listener(broker, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    save = memory.topics.save_cursor
    save_started = asyncio.Event()
    release = asyncio.Event()

    async def slow_save(name: str, position: int) -> None:
        if position > 0:  # the ACK's save (the first save, at SUBSCRIBE, stores the start position)
            save_started.set()
            await release.wait()
        await save(name, position)

    try:
        client = StompSocket(*await asyncio.open_connection("127.0.0.1", port))
        client.conn.connect(host="/", login="me", headers={"client-id": "durable-receipt"})
        await client.flush()
        assert isinstance(await client.next(), Connected)
        client.conn.subscribe("/topic/t", "1", ack="client", headers={"durable": "true"}, receipt="s")
        await client.flush()
        assert isinstance(await client.next(), ReceiptReceived)
        await broker.publish("/topic/t", {}, b"hello")
        message = await client.next()
        assert isinstance(message, MessageReceived) and message.ack is not None
        memory.topics.save_cursor = slow_save  # type: ignore[method-assign]
        client.conn.ack(message.ack, receipt="acked")
        await client.flush()
        await asyncio.wait_for(save_started.wait(), 5)  # the gateway has the ACK and is saving the position
        # No RECEIPT while the position is not stored. (Before the fix the RECEIPT left when the ACK arrived, 50 ms
        # before the save even started, so it would be here already: this bounded look is not a synchronisation.)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.next(), 0.3)
        release.set()
        receipt = await asyncio.wait_for(client.next(), 5)
        assert isinstance(receipt, ReceiptReceived) and receipt.receipt_id == "acked"
        assert await memory.topics.load_cursor("me/durable-receipt/1") == 1  # the first position of the log
        client.writer.close()
    finally:
        release.set()  # never leave the injected save blocked (it would hold up the shutdown)
        server.close()
        await broker.stop()


async def test_a_subscription_closed_while_its_claim_is_in_flight_gives_the_claimed_messages_back(memory: Datasource) -> None:
    """The claim runs on in a task of its own when the subscription goes away mid-claim: what it took goes back to
    the queue at once instead of staying leased to this gateway until the lease lapses (a minute here)."""
    broker = Broker(memory, BrokerConfig(lease_ms=60_000))
    await broker.start()
    server = await start_tcp_listener(broker, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    claim = memory.queues.claim
    claimed = asyncio.Event()
    answer = asyncio.Event()

    async def slow_answer(destination: str, **kwargs: Any) -> list[StoredMessage]:
        messages = await claim(destination, **kwargs)
        if messages:
            claimed.set()  # leased in the store; the subscription has not heard of them yet
            await answer.wait()
        return messages

    memory.queues.claim = slow_answer  # type: ignore[method-assign]
    try:
        await broker.publish("/queue/q", {}, b"hello")
        client = await StompSocket.subscribed_to_queue(port)
        await asyncio.wait_for(claimed.wait(), 5)
        client.conn.unsubscribe("1", receipt="gone")
        await client.flush()
        receipt = await asyncio.wait_for(client.next(), 5)
        assert isinstance(receipt, ReceiptReceived) and receipt.receipt_id == "gone"
        assert (await memory.queues.stats("/queue/q", now_ms=broker.now_ms())).ready == 0  # still leased
        answer.set()
        for _ in range(100):
            if (await memory.queues.stats("/queue/q", now_ms=broker.now_ms())).ready == 1:
                break
            await asyncio.sleep(0.05)
        assert (await memory.queues.stats("/queue/q", now_ms=broker.now_ms())).ready == 1
        client.writer.close()
    finally:
        answer.set()
        server.close()
        await broker.stop()


async def test_a_subscription_cancelled_just_after_its_claim_answered_gives_the_claimed_messages_back(
    memory: Datasource,
) -> None:
    """The claim answers the subscription (``set_result``) and the subscription's task resumes a loop turn later.
    Cancelled in between (UNSUBSCRIBE, a disconnect or the shutdown stops the task in that turn), the task sees only
    CancelledError at ``await answer``: the answered messages were in no list ``close`` releases, and lease renewal
    (every lease of this gateway) kept them leased for as long as the gateway ran."""
    broker = Broker(memory, BrokerConfig(lease_ms=60_000))
    await broker.start()
    server = await start_tcp_listener(broker, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    claim = memory.queues.claim
    cancelled = asyncio.Event()

    async def cancel_in_the_answering_turn(destination: str, **kwargs: Any) -> list[StoredMessage]:
        messages = await claim(destination, **kwargs)
        if messages:
            (task,) = [t for t in asyncio.all_tasks() if t.get_name() == f"queue-sub {destination}"]
            # Runs after the answer is set (it is set when this returns) and before the task resumes, as the
            # subscription's _stop does when the client's UNSUBSCRIBE is handled in that turn.
            loop = asyncio.get_running_loop()
            loop.call_soon(lambda: (task.cancel(), cancelled.set()))
        return messages

    release = memory.queues.release
    released = asyncio.Event()

    async def noted_release(message_ids: Any, how: Any, leases: Any = None) -> None:
        await release(message_ids, how, leases)
        released.set()

    memory.queues.claim = cancel_in_the_answering_turn  # type: ignore[method-assign]
    memory.queues.release = noted_release  # type: ignore[method-assign]
    client: StompSocket | None = None
    try:
        await broker.publish("/queue/q", {}, b"hello")
        client = await StompSocket.subscribed_to_queue(port)
        await asyncio.wait_for(cancelled.wait(), 5)
        await asyncio.wait_for(released.wait(), 5)  # the release is a task of its own
        assert (await memory.queues.stats("/queue/q", now_ms=broker.now_ms())).ready == 1
    finally:
        if client is not None:
            client.writer.close()
        server.close()
        await broker.stop()
