"""A connection's SENDs waiting for the datasource are bounded in bytes, not only in number: a producer pipelining
large frames (bodies up to the frame limit, or headers: the frame limit counts the body only; or whole transactions)
while the store is slow stops being read once max_inflight_bytes_per_session bytes wait, instead of making the gateway
hold max_inflight_per_session of them (2,000 x 4 MiB). Reading resumes once the store caught up, and every SEND is
stored and receipted; a graceful shutdown's pause is not undone meanwhile."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.broker.broker import Broker
from app.broker.config import BrokerConfig
from app.broker.session import Session
from app.datasources.interface import Changes, Datasource, DatasourceOptions, NewMessage, Published
from app.datasources.registry import open_datasource
from tests.app.broker.test_ordering import Transport, frame

BODY = 1024 * 1024
LIMIT = 4 * BODY
Q = "/queue/big"


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


@dataclass
class Slow:
    """A gateway on SQLite whose store waits for ``go`` (the injected fault: a store that takes its time)."""

    broker: Broker
    ds: Datasource
    go: asyncio.Event

    async def connect(self) -> tuple[Pausable, Session]:
        transport = Pausable()
        session = self.broker.open_session(transport, peer="127.0.0.1:1", kind="tcp")
        assert session is not None
        session.receive(frame("CONNECT", {"accept-version": "1.2", "host": "/"}))
        await asyncio.wait_for(transport.connected.wait(), 10)
        return transport, session


@pytest.fixture
async def slow(tmp_path: Path) -> AsyncIterator[Slow]:
    ds = await open_datasource(f"sqlite:///{tmp_path}/b.db", DatasourceOptions())
    broker = Broker(ds, BrokerConfig(max_inflight_bytes_per_session=LIMIT))
    await broker.start()
    go = asyncio.Event()
    apply, put, publish = ds.apply, ds.queues.put, ds.topics.publish

    # SENDs reach the store through apply, put or publish, as the store prefers
    async def slow_apply(changes: Changes) -> None:
        await go.wait()
        await apply(changes)

    async def slow_put(messages: Sequence[NewMessage]) -> None:
        await go.wait()
        await put(messages)

    async def slow_publish(messages: Sequence[NewMessage]) -> list[Published]:
        await go.wait()
        return await publish(messages)

    ds.apply = slow_apply  # type: ignore[method-assign]
    ds.queues.put = slow_put  # type: ignore[method-assign]
    ds.topics.publish = slow_publish  # type: ignore[method-assign]
    try:
        yield Slow(broker, ds, go)
    finally:
        go.set()
        await broker.stop()
        await ds.close()


def _until_paused(transport: Pausable, session: Session, frames: Callable[[int], bytes]) -> int:
    """Feed ``frames(n)`` for n = 0, 1, ... as long as the gateway reads (a client writes as long as it can)."""
    sent = 0
    while not transport.paused and sent < 40:
        session.receive(frames(sent))
        sent += 1
    return sent


async def test_a_producer_of_large_bodies_is_paused_by_bytes_in_flight(slow: Slow) -> None:
    transport, session = await slow.connect()
    sent = _until_paused(transport, session, lambda n: frame("SEND", {"destination": Q, "receipt": f"r{n}"}, b"x" * BODY))
    assert transport.paused, f"{sent} SENDs of 1 MiB were read while the store held all of them"
    assert sent <= LIMIT // BODY + 1  # reading stops with the first SEND past the bound (headers count too)
    slow.go.set()
    session.receive(frame("SEND", {"destination": Q, "receipt": "end"}, b"last"))  # read before the pause took
    await asyncio.wait_for(transport.receipted.wait(), 10)
    assert not transport.paused
    assert transport.out.count(b"RECEIPT\n") == sent + 1
    stats = await slow.ds.queues.stats(Q, now_ms=slow.broker.now_ms())
    assert stats.ready == sent + 1


async def test_header_bytes_count_too(slow: Slow) -> None:
    """The frame limit counts the body only: about 800 KiB of headers with an empty body weigh the same here."""
    headers = {f"h{i:02d}": "v" * (8 * 1024 - 8) for i in range(95)}
    transport, session = await slow.connect()
    sent = _until_paused(transport, session, lambda n: frame("SEND", {"destination": Q, "receipt": f"r{n}", **headers}))
    assert transport.paused, f"{sent} SENDs of about 760 KiB of headers were read while the store held all of them"
    assert sent <= LIMIT // (95 * 8 * 1024) + 1


async def test_committed_transactions_count_too(slow: Slow) -> None:
    transport, session = await slow.connect()

    def transaction(n: int) -> bytes:
        return (
            frame("BEGIN", {"transaction": f"t{n}"})
            + frame("SEND", {"destination": Q, "transaction": f"t{n}"}, b"x" * BODY)
            + frame("COMMIT", {"transaction": f"t{n}", "receipt": f"r{n}"})
        )

    sent = _until_paused(transport, session, transaction)
    assert transport.paused, f"{sent} committed transactions of 1 MiB were read while the store held all of them"
    assert sent <= LIMIT // BODY + 1
    slow.go.set()
    session.receive(frame("SEND", {"destination": Q, "receipt": "end"}, b"last"))
    await asyncio.wait_for(transport.receipted.wait(), 10)
    assert not transport.paused
    stats = await slow.ds.queues.stats(Q, now_ms=slow.broker.now_ms())
    assert stats.ready == sent + 1


async def test_a_shutdowns_pause_is_not_undone_when_the_store_catches_up(slow: Slow) -> None:
    transport, session = await slow.connect()
    _until_paused(transport, session, lambda n: frame("SEND", {"destination": Q, "receipt": f"r{n}"}, b"x" * BODY))
    quiet = asyncio.ensure_future(session.quiesce())
    await asyncio.sleep(0)  # quiesce has paused and waits for the completions
    slow.go.set()
    await asyncio.wait_for(quiet, 10)
    assert transport.paused, "reading was resumed during the graceful shutdown's quiesce"


async def test_a_connection_the_gateway_stopped_reading_is_not_judged_by_its_heart_beats(slow: Slow) -> None:
    """While reading is paused the client's heart-beats wait in the socket unread: a store slower than the heart-beat
    period must not get a healthy producer closed as dead. Once reading resumes, its heart-beats count again."""
    transport = Pausable()
    session = slow.broker.open_session(transport, peer="127.0.0.1:1", kind="tcp")
    assert session is not None
    session.receive(frame("CONNECT", {"accept-version": "1.2", "host": "/", "heart-beat": "1000,0"}))
    await asyncio.wait_for(transport.connected.wait(), 10)
    _until_paused(transport, session, lambda n: frame("SEND", {"destination": Q, "receipt": f"r{n}"}, b"x" * BODY))
    assert transport.paused
    slow.broker._tick_session(session, time.monotonic() + 60)  # a minute without a byte read: paused by us
    assert b"ERROR" not in transport.out and not session.finished
    slow.go.set()
    session.receive(frame("SEND", {"destination": Q, "receipt": "end"}, b"last"))
    await asyncio.wait_for(transport.receipted.wait(), 10)
    assert not transport.paused
    slow.broker._tick_session(session, time.monotonic() + 60)  # reading again, and silent for a minute: dead
    assert b"Heart-beat timeout" in transport.out
