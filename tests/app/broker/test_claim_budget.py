"""One claim budget per connection (ClaimBudget), without starving anyone: an idle, failing, scanning or busy queue
subscription does not keep the others of its connection from claiming, and a client that reads is always served.
(From two reviews of the first versions, which starved them: each test failed on one of them.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from app.broker.broker import Broker
from app.broker.config import BrokerConfig
from app.broker.session import Session
from app.broker.subscriptions import CLAIM_BUDGET
from app.datasources.interface import Datasource, DatasourceOptions, DatasourceUnavailable, NewMessage
from app.datasources.registry import open_datasource
from tests.app.broker.test_ordering import Transport, frame

MIB = 1024 * 1024


class Reader(Transport):
    """A client that reads everything at once (backlog 0), or whose backlog the test sets."""

    def __init__(self) -> None:
        super().__init__()
        self.backlog = 0
        self.messages: list[bytes] = []

    def write(self, data: bytes) -> None:
        super().write(data)
        for part in data.split(b"\x00"):
            if part.lstrip(b"\n").startswith(b"MESSAGE"):
                self.messages.append(part)

    def write_backlog(self) -> int:
        return self.backlog

    def delivered_on(self, sub: str) -> int:
        return sum(1 for m in self.messages if f"\nsubscription:{sub}\n".encode() in m)


async def _until(pred: Callable[[], bool], timeout: float) -> bool:
    """Wait for ``pred`` to hold (polled), at most ``timeout`` seconds; whether it holds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if pred():
            return True
        await asyncio.sleep(0.02)
    return pred()


@asynccontextmanager
async def _gateway(tmp_path: Path, config: BrokerConfig | None = None) -> AsyncIterator[tuple[Datasource, Broker]]:
    ds = await open_datasource(f"sqlite:///{tmp_path}/c.db", DatasourceOptions())
    broker = Broker(ds, config)
    await broker.start()
    try:
        yield ds, broker
    finally:
        await broker.stop()
        await ds.close()


def _connect(broker: Broker) -> tuple[Reader, Session]:
    transport = Reader()
    session = broker.open_session(transport, peer="127.0.0.1:1", kind="tcp")
    assert session is not None
    session.receive(frame("CONNECT", {"accept-version": "1.2", "host": "/"}))
    return transport, session


def _subscribe(session: Session, sub: str, destination: str, ack: str = "client-individual", **headers: str) -> None:
    session.receive(frame("SUBSCRIBE", {"id": sub, "destination": destination, "ack": ack, **headers}))


async def _end(session: Session) -> None:
    session.connection_lost()
    await session.wait_ended()


async def test_an_idle_subscription_on_an_empty_queue_does_not_starve_the_others_of_its_connection(tmp_path: Path) -> None:
    async with _gateway(tmp_path) as (ds, broker):
        transport, session = _connect(broker)
        _subscribe(session, "idle", "/queue/empty")
        _subscribe(session, "busy", "/queue/busy")
        await asyncio.sleep(0.3)  # the scenario, not a wait for a result: the idle subscription is in its wait for work
        await ds.queues.put([NewMessage(f"m{i}", "/queue/busy", {}, b"small") for i in range(5)])
        ok = await _until(lambda: transport.delivered_on("busy") == 5, 3)
        assert ok, (transport.delivered_on("busy"), session.claim_budget.reserved)
        await _end(session)


async def test_a_backlog_of_exactly_the_claim_budget_does_not_park_a_subscription_for_good(tmp_path: Path) -> None:
    async with _gateway(tmp_path) as (ds, broker):
        await ds.queues.put([NewMessage("m0", "/queue/q", {}, b"small")])
        transport, session = _connect(broker)
        transport.backlog = CLAIM_BUDGET  # the client has exactly the budget unread
        _subscribe(session, "s", "/queue/q")
        await asyncio.sleep(0.2)  # the scenario: the subscription met that backlog
        transport.backlog = 0  # the client read it all
        ok = await _until(lambda: transport.delivered_on("s") == 1, 3)
        assert ok, (transport.delivered_on("s"), session.claim_budget.reserved)
        await _end(session)


async def test_a_busy_subscription_does_not_hold_the_whole_budget_while_another_waits(tmp_path: Path) -> None:
    """1 MiB bodies on /queue/a (many), one on /queue/b: b's message should not wait for all of a's."""
    async with _gateway(tmp_path) as (ds, broker):
        await ds.queues.put([NewMessage(f"a{i}", "/queue/a", {}, b"x" * MIB) for i in range(60)])
        await ds.queues.put([NewMessage("b0", "/queue/b", {}, b"x" * MIB)])
        transport, session = _connect(broker)
        _subscribe(session, "a", "/queue/a", **{"prefetch-count": "1000"})
        _subscribe(session, "b", "/queue/b", **{"prefetch-count": "1000"})
        ok = await _until(lambda: transport.delivered_on("b") == 1, 10)
        a_before_b = transport.delivered_on("a")
        assert ok and a_before_b < 20, (a_before_b, transport.delivered_on("b"))
        await _end(session)


async def test_an_idle_auto_subscription_with_a_selector_does_not_starve_the_others(tmp_path: Path) -> None:
    # its idle wait is max(poll_interval, lease_ms/1000) = 0.3 s: about 10 of them within the 3 s
    async with _gateway(tmp_path, BrokerConfig(lease_ms=300)) as (ds, broker):
        await ds.queues.put([NewMessage(f"o{i}", "/queue/empty", {"color": "red"}, b"other") for i in range(3)])
        transport, session = _connect(broker)
        _subscribe(session, "idle", "/queue/empty", "auto", selector="color = 'blue'")
        _subscribe(session, "busy", "/queue/busy", "auto")
        await asyncio.sleep(0.3)  # the scenario: the idle one has claimed nothing and waits for work, several times
        await ds.queues.put([NewMessage(f"m{i}", "/queue/busy", {}, b"small") for i in range(5)])
        await _until(lambda: transport.delivered_on("busy") == 5, 3)
        got, reserved = transport.delivered_on("busy"), session.claim_budget.reserved
        await _end(session)
        assert got == 5, (got, reserved, session.claim_budget.reserved)


async def test_a_busy_client_ack_subscription_lets_another_of_its_connection_claim(tmp_path: Path) -> None:
    """/queue/a never goes idle during the check (100 x 1 MiB, prefetch 1000): b's one message should still go out."""
    await _busy_and_one(tmp_path, "client-individual")


async def test_a_busy_auto_subscription_lets_another_of_its_connection_claim(tmp_path: Path) -> None:
    """The same in auto mode, where the busy subscription waits for the connection to drain between turns."""
    await _busy_and_one(tmp_path, "auto")


async def _busy_and_one(tmp_path: Path, ack: str) -> None:
    async with _gateway(tmp_path) as (ds, broker):
        await ds.queues.put([NewMessage(f"a{i}", "/queue/a", {}, b"x" * MIB) for i in range(100)])
        await ds.queues.put([NewMessage("b0", "/queue/b", {}, b"small")])
        transport, session = _connect(broker)
        _subscribe(session, "a", "/queue/a", ack, **({"prefetch-count": "1000"} if ack != "auto" else {}))
        _subscribe(session, "b", "/queue/b", ack)
        await _until(lambda: transport.delivered_on("b") == 1 or transport.delivered_on("a") >= 50, 10)
        assert transport.delivered_on("b") == 1, (transport.delivered_on("a"), transport.delivered_on("b"))
        await _end(session)


async def test_a_claim_retrying_after_datasource_unavailable_does_not_starve_the_others(tmp_path: Path) -> None:
    async with _gateway(tmp_path) as (ds, broker):
        claim = ds.queues.claim

        async def flaky_claim(destination: str, **kwargs: object) -> object:
            if destination == "/queue/flaky":
                raise DatasourceUnavailable("simulated")
            return await claim(destination, **kwargs)  # type: ignore[arg-type]

        ds.queues.claim = flaky_claim  # type: ignore[method-assign,assignment]
        transport, session = _connect(broker)
        _subscribe(session, "flaky", "/queue/flaky")
        _subscribe(session, "ok", "/queue/ok")
        await ds.queues.put([NewMessage("m0", "/queue/ok", {}, b"small")])
        ok = await _until(lambda: transport.delivered_on("ok") == 1, 4)
        assert ok, (transport.delivered_on("ok"), session.claim_budget.reserved)
        await _end(session)


async def test_a_selector_scanning_a_deep_backlog_does_not_starve_the_others_of_its_connection(tmp_path: Path) -> None:
    """/queue/a holds 20 000 messages a's selector does not match: a scans them SCAN_BUDGET at a time, each claim
    reserving its size estimate (max_frame_bytes = CLAIM_BUDGET, as it never claimed anything). b's one message on
    /queue/b should not wait for the whole scan (about 40 claims)."""
    async with _gateway(tmp_path) as (ds, broker):
        await ds.queues.put([NewMessage(f"a{i}", "/queue/a", {"color": "red"}, b"x") for i in range(20_000)])
        await ds.queues.put([NewMessage("b0", "/queue/b", {}, b"small")])
        claims = {"/queue/a": 0, "/queue/b": 0}
        a_claims_before_b: list[int] = []
        claim = ds.queues.claim

        async def counting_claim(destination: str, **kwargs: object) -> object:
            claims[destination] += 1
            if destination == "/queue/b" and not a_claims_before_b:
                a_claims_before_b.append(claims["/queue/a"])
            return await claim(destination, **kwargs)  # type: ignore[arg-type]

        ds.queues.claim = counting_claim  # type: ignore[method-assign,assignment]
        transport, session = _connect(broker)
        _subscribe(session, "a", "/queue/a", selector="color = 'blue'")
        _subscribe(session, "b", "/queue/b")
        await _until(lambda: transport.delivered_on("b") == 1, 20)
        assert transport.delivered_on("b") == 1
        assert a_claims_before_b[0] <= 3, (a_claims_before_b, claims)
        await _end(session)
