"""One claim budget per connection (ClaimBudget), without starving anyone: an idle, failing, scanning or busy queue subscription does not keep the others of its connection from claiming, and a client that reads is always served. (From two reviews of the first versions, which starved them.)"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from app.broker.broker import Broker
from app.broker.config import BrokerConfig
from app.broker.subscriptions import CLAIM_BUDGET
from app.datasources.interface import DatasourceOptions, NewMessage
from app.datasources.registry import open_datasource
from tests.app.broker.test_ordering import Transport, frame


class Reader(Transport):
    """A client that reads everything at once (backlog 0), or whose backlog the test sets."""

    def __init__(self) -> None:
        super().__init__()
        self.backlog = 0
        self.messages: list[bytes] = []
        self.got = asyncio.Event()

    def write(self, data: bytes) -> None:
        super().write(data)
        for part in data.split(b"\x00"):
            if part.lstrip(b"\n").startswith(b"MESSAGE"):
                self.messages.append(part)
                self.got.set()

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


async def test_an_idle_subscription_on_an_empty_queue_does_not_starve_the_others_of_its_connection(tmp_path: Path) -> None:
    ds = await open_datasource(f"sqlite:///{tmp_path}/c.db", DatasourceOptions())
    broker = Broker(ds)
    await broker.start()
    try:
        transport = Reader()
        session = broker.open_session(transport, peer="127.0.0.1:1", kind="tcp")
        assert session is not None
        session.receive(frame("CONNECT", {"accept-version": "1.2", "host": "/"}))
        session.receive(frame("SUBSCRIBE", {"id": "idle", "destination": "/queue/empty", "ack": "client-individual"}))
        session.receive(frame("SUBSCRIBE", {"id": "busy", "destination": "/queue/busy", "ack": "client-individual"}))
        await asyncio.sleep(0.3)  # the scenario, not a wait for a result: the idle subscription is in its wait for work
        await ds.queues.put([NewMessage(f"m{i}", "/queue/busy", {}, b"small") for i in range(5)])
        ok = await _until(lambda: transport.delivered_on("busy") == 5, 3)
        assert ok, (transport.delivered_on("busy"), session.claim_budget.reserved)
        session.connection_lost()
        await session.wait_ended()
    finally:
        await broker.stop()
        await ds.close()


async def test_a_backlog_of_exactly_the_claim_budget_does_not_park_a_subscription_for_good(tmp_path: Path) -> None:
    ds = await open_datasource(f"sqlite:///{tmp_path}/c.db", DatasourceOptions())
    broker = Broker(ds)
    await broker.start()
    try:
        await ds.queues.put([NewMessage("m0", "/queue/q", {}, b"small")])
        transport = Reader()
        session = broker.open_session(transport, peer="127.0.0.1:1", kind="tcp")
        assert session is not None
        session.receive(frame("CONNECT", {"accept-version": "1.2", "host": "/"}))
        transport.backlog = CLAIM_BUDGET  # the client has exactly the budget unread
        session.receive(frame("SUBSCRIBE", {"id": "s", "destination": "/queue/q", "ack": "client-individual"}))
        await asyncio.sleep(0.2)
        transport.backlog = 0  # the client read it all
        ok = await _until(lambda: transport.delivered_on("s") == 1, 3)
        assert ok, (transport.delivered_on("s"), session.claim_budget.reserved)
        session.connection_lost()
        await session.wait_ended()
    finally:
        await broker.stop()
        await ds.close()


async def test_a_busy_subscription_does_not_hold_the_whole_budget_while_another_waits(tmp_path: Path) -> None:
    """1 MiB bodies on /queue/a (many), one on /queue/b: b's message should not wait for all of a's."""
    ds = await open_datasource(f"sqlite:///{tmp_path}/c.db", DatasourceOptions())
    broker = Broker(ds)
    await broker.start()
    body = b"x" * (1024 * 1024)
    try:
        await ds.queues.put([NewMessage(f"a{i}", "/queue/a", {}, body) for i in range(60)])
        await ds.queues.put([NewMessage("b0", "/queue/b", {}, body)])
        transport = Reader()
        session = broker.open_session(transport, peer="127.0.0.1:1", kind="tcp")
        assert session is not None
        session.receive(frame("CONNECT", {"accept-version": "1.2", "host": "/"}))
        session.receive(frame("SUBSCRIBE", {"id": "a", "destination": "/queue/a", "ack": "client-individual", "prefetch-count": "1000"}))
        session.receive(frame("SUBSCRIBE", {"id": "b", "destination": "/queue/b", "ack": "client-individual", "prefetch-count": "1000"}))
        ok = await _until(lambda: transport.delivered_on("b") == 1, 10)
        a_before_b = transport.delivered_on("a")
        assert ok and a_before_b < 20, (a_before_b, transport.delivered_on("b"))
        session.connection_lost()
        await session.wait_ended()
    finally:
        await broker.stop()
        await ds.close()


async def _two_subs(
    tmp_path: Path, config: BrokerConfig, idle_headers: dict[str, str], busy_ack: str, seconds: float
) -> tuple[int, int, int]:
    ds = await open_datasource(f"sqlite:///{tmp_path}/c.db", DatasourceOptions())
    broker = Broker(ds, config)
    await broker.start()
    try:
        await ds.queues.put([NewMessage(f"o{i}", "/queue/empty", {"color": "red"}, b"other") for i in range(3)])
        transport = Reader()
        session = broker.open_session(transport, peer="127.0.0.1:1", kind="tcp")
        assert session is not None
        session.receive(frame("CONNECT", {"accept-version": "1.2", "host": "/"}))
        session.receive(frame("SUBSCRIBE", {"id": "idle", "destination": "/queue/empty", "ack": busy_ack, **idle_headers}))
        session.receive(frame("SUBSCRIBE", {"id": "busy", "destination": "/queue/busy", "ack": busy_ack}))
        await asyncio.sleep(0.3)  # the scenario: the idle one has claimed nothing and waits for work, several times
        await ds.queues.put([NewMessage(f"m{i}", "/queue/busy", {}, b"small") for i in range(5)])
        await _until(lambda: transport.delivered_on("busy") == 5, seconds)
        got, reserved = transport.delivered_on("busy"), session.claim_budget.reserved
        session.connection_lost()
        await session.wait_ended()
        return got, reserved, session.claim_budget.reserved
    finally:
        await broker.stop()
        await ds.close()


async def test_an_idle_auto_subscription_with_a_selector_does_not_starve_the_others(tmp_path: Path) -> None:
    # idle wait = max(poll_interval, lease_ms/1000) = 0.3 s: 10 idle timeouts within the 3 s
    got, reserved, after = await _two_subs(
        tmp_path, BrokerConfig(lease_ms=300), {"selector": "color = 'blue'"}, "auto", 3
    )
    assert got == 5, (got, reserved, after)


async def test_a_busy_client_ack_subscription_lets_another_of_its_connection_claim(tmp_path: Path) -> None:
    """/queue/a never goes idle during the check (100 x 1 MiB, prefetch 1000): b's one message should still go out."""
    ds = await open_datasource(f"sqlite:///{tmp_path}/c.db", DatasourceOptions())
    broker = Broker(ds)
    await broker.start()
    body = b"x" * (1024 * 1024)
    try:
        await ds.queues.put([NewMessage(f"a{i}", "/queue/a", {}, body) for i in range(100)])
        await ds.queues.put([NewMessage("b0", "/queue/b", {}, b"small")])
        transport = Reader()
        session = broker.open_session(transport, peer="127.0.0.1:1", kind="tcp")
        assert session is not None
        session.receive(frame("CONNECT", {"accept-version": "1.2", "host": "/"}))
        session.receive(frame("SUBSCRIBE", {"id": "a", "destination": "/queue/a", "ack": "client-individual", "prefetch-count": "1000"}))
        session.receive(frame("SUBSCRIBE", {"id": "b", "destination": "/queue/b", "ack": "client-individual"}))
        await _until(lambda: transport.delivered_on("b") == 1 or transport.delivered_on("a") >= 50, 10)
        assert transport.delivered_on("b") == 1, (transport.delivered_on("a"), transport.delivered_on("b"))
        session.connection_lost()
        await session.wait_ended()
    finally:
        await broker.stop()
        await ds.close()


async def test_a_claim_retrying_after_datasource_unavailable_does_not_starve_the_others(tmp_path: Path) -> None:
    from app.datasources.interface import DatasourceUnavailable
    ds = await open_datasource(f"sqlite:///{tmp_path}/c.db", DatasourceOptions())
    broker = Broker(ds)
    await broker.start()
    try:
        claim = ds.queues.claim

        async def flaky_claim(destination: str, **kwargs: object) -> object:
            if destination == "/queue/flaky":
                raise DatasourceUnavailable("simulated")
            return await claim(destination, **kwargs)  # type: ignore[arg-type]

        ds.queues.claim = flaky_claim  # type: ignore[method-assign,assignment]
        transport = Reader()
        session = broker.open_session(transport, peer="127.0.0.1:1", kind="tcp")
        assert session is not None
        session.receive(frame("CONNECT", {"accept-version": "1.2", "host": "/"}))
        session.receive(frame("SUBSCRIBE", {"id": "flaky", "destination": "/queue/flaky", "ack": "client-individual"}))
        session.receive(frame("SUBSCRIBE", {"id": "ok", "destination": "/queue/ok", "ack": "client-individual"}))
        await ds.queues.put([NewMessage("m0", "/queue/ok", {}, b"small")])
        ok = await _until(lambda: transport.delivered_on("ok") == 1, 4)
        assert ok, (transport.delivered_on("ok"), session.claim_budget.reserved)
        session.connection_lost()
        await session.wait_ended()
    finally:
        await broker.stop()
        await ds.close()


async def test_a_busy_auto_subscription_lets_another_of_its_connection_claim(tmp_path: Path) -> None:
    """As test_a_busy_client_ack_subscription_lets_another_of_its_connection_claim, in auto mode: /queue/a never goes
    idle during the check (100 x 1 MiB): b's one message should still go out long before a's 50th."""
    ds = await open_datasource(f"sqlite:///{tmp_path}/c.db", DatasourceOptions())
    broker = Broker(ds)
    await broker.start()
    body = b"x" * (1024 * 1024)
    try:
        await ds.queues.put([NewMessage(f"a{i}", "/queue/a", {}, body) for i in range(100)])
        await ds.queues.put([NewMessage("b0", "/queue/b", {}, b"small")])
        transport = Reader()
        session = broker.open_session(transport, peer="127.0.0.1:1", kind="tcp")
        assert session is not None
        session.receive(frame("CONNECT", {"accept-version": "1.2", "host": "/"}))
        session.receive(frame("SUBSCRIBE", {"id": "a", "destination": "/queue/a", "ack": "auto"}))
        session.receive(frame("SUBSCRIBE", {"id": "b", "destination": "/queue/b", "ack": "auto"}))
        await _until(lambda: transport.delivered_on("b") == 1 or transport.delivered_on("a") >= 50, 10)
        assert transport.delivered_on("b") == 1, (transport.delivered_on("a"), transport.delivered_on("b"))
        session.connection_lost()
        await session.wait_ended()
    finally:
        await broker.stop()
        await ds.close()


async def test_a_selector_scanning_a_deep_backlog_does_not_starve_the_others_of_its_connection(tmp_path: Path) -> None:
    """/queue/a holds 20 000 messages a's selector does not match: a scans them SCAN_BUDGET at a time, each claim
    reserving its size estimate (max_frame_bytes = CLAIM_BUDGET, as it never claimed anything). b's one message on
    /queue/b should not wait for the whole scan (about 40 claims)."""
    ds = await open_datasource(f"sqlite:///{tmp_path}/c.db", DatasourceOptions())
    broker = Broker(ds)
    await broker.start()
    try:
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
        transport = Reader()
        session = broker.open_session(transport, peer="127.0.0.1:1", kind="tcp")
        assert session is not None
        session.receive(frame("CONNECT", {"accept-version": "1.2", "host": "/"}))
        session.receive(frame("SUBSCRIBE", {"id": "a", "destination": "/queue/a", "ack": "client-individual", "selector": "color = 'blue'"}))
        session.receive(frame("SUBSCRIBE", {"id": "b", "destination": "/queue/b", "ack": "client-individual"}))
        await _until(lambda: transport.delivered_on("b") == 1, 20)
        assert transport.delivered_on("b") == 1
        assert a_claims_before_b[0] <= 3, (a_claims_before_b, claims)
        session.connection_lost()
        await session.wait_ended()
    finally:
        await broker.stop()
        await ds.close()

