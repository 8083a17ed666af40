"""stomp.py as 1.0, 1.1 and 1.2 against a real gateway process: the delivery rules in the README's "Delivery semantics"."""

from __future__ import annotations

import time
import uuid

import pytest

from collections.abc import Iterator

from tests.gateway_process import Gateway
from tests.integration.conftest import SQL_STORES, gateway_on
from tests.integration.stomppy_helpers import connect

VERSIONS = ["1.0", "1.1", "1.2"]

@pytest.fixture(scope="module", params=SQL_STORES)
def gateway(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """This module's behaviour runs on each SQL store."""
    yield from gateway_on(request.param, request, tmp_path_factory)


def unique(kind: str) -> str:
    return f"/{kind}/t{uuid.uuid4().hex[:12]}"


@pytest.mark.parametrize("version", VERSIONS)
def test_queue_send_receive_ack(gateway: Gateway, version: str) -> None:
    dest = unique("queue")
    client = connect(gateway.stomp_port, version)
    client.conn.subscribe(dest, id="s1", ack="client-individual" if version != "1.0" else "client")
    for i in range(10):
        client.send(dest, f"m{i}")
    got = [client.get() for _ in range(10)]
    assert [m.body for m in got] == [f"m{i}" for i in range(10)]
    assert all(m.headers["destination"] == dest for m in got)
    assert all(m.headers["subscription"] == "s1" for m in got)
    if version == "1.2":
        assert all("ack" in m.headers for m in got)
    for m in got:
        client.ack(m)
    client.disconnect()
    # Everything was acked: a new consumer gets nothing.
    other = connect(gateway.stomp_port, version)
    other.conn.subscribe(dest, id="s2", ack="auto")
    assert other.nothing()
    other.disconnect()


@pytest.mark.parametrize("version", VERSIONS)
def test_unacked_messages_return_when_the_session_ends(gateway: Gateway, version: str) -> None:
    dest = unique("queue")
    producer = connect(gateway.stomp_port, version)
    for i in range(3):
        producer.send(dest, f"m{i}")
    first = connect(gateway.stomp_port, version)
    first.conn.subscribe(dest, id="s", ack="client")
    assert [first.get().body for _ in range(3)] == ["m0", "m1", "m2"]
    first.conn.disconnect()  # no ACK
    second = connect(gateway.stomp_port, version)
    second.conn.subscribe(dest, id="s", ack="client")
    again = [second.get() for _ in range(3)]
    assert [m.body for m in again] == ["m0", "m1", "m2"]
    assert all(m.headers.get("redelivered") == "true" for m in again)
    assert all(m.headers.get("x-delivery-count") == "2" for m in again)
    second.ack(again[-1])  # cumulative: acks all three
    second.disconnect()
    third = connect(gateway.stomp_port, version)
    third.conn.subscribe(dest, id="s", ack="auto")
    assert third.nothing()
    third.disconnect()
    producer.disconnect()


def test_competing_consumers_each_message_once(gateway: Gateway) -> None:
    dest = unique("queue")
    consumers = [connect(gateway.stomp_port) for _ in range(3)]
    for c in consumers:
        c.conn.subscribe(dest, id="s", ack="auto", headers={"prefetch-count": "5"})
    producer = connect(gateway.stomp_port)
    for i in range(60):
        producer.send(dest, str(i), receipt=(i == 59))
    seen: list[str] = []
    deadline = time.monotonic() + 10
    while len(seen) < 60 and time.monotonic() < deadline:
        for c in consumers:
            while not c.messages.empty():
                seen.append(c.messages.get().body)
        time.sleep(0.02)
    assert sorted(seen, key=int) == [str(i) for i in range(60)]
    for c in [*consumers, producer]:
        c.disconnect()


def test_topic_fans_out_to_every_subscriber(gateway: Gateway) -> None:
    dest = unique("topic")
    subs = [connect(gateway.stomp_port) for _ in range(2)]
    for s in subs:
        rid = s.receipt()
        s.conn.subscribe(dest, id="t", headers={"receipt": rid})
        s.wait_receipt(rid)
    producer = connect(gateway.stomp_port, "1.1")
    for i in range(5):
        producer.send(dest, f"n{i}")
    for s in subs:
        assert [s.get().body for _ in range(5)] == [f"n{i}" for i in range(5)]
        s.disconnect()
    producer.disconnect()


def test_priority_then_fifo(gateway: Gateway) -> None:
    dest = unique("queue")
    producer = connect(gateway.stomp_port)
    for body, priority in [("low1", 1), ("high1", 9), ("mid", 4), ("high2", 9), ("low2", 1)]:
        producer.send(dest, body, priority=str(priority))
    consumer = connect(gateway.stomp_port)
    consumer.conn.subscribe(dest, id="s", ack="auto")
    assert [consumer.get().body for _ in range(5)] == ["high1", "high2", "mid", "low1", "low2"]
    consumer.disconnect()
    producer.disconnect()


def test_prefetch_bounds_unacked(gateway: Gateway) -> None:
    dest = unique("queue")
    producer = connect(gateway.stomp_port)
    for i in range(6):
        producer.send(dest, str(i))
    consumer = connect(gateway.stomp_port)
    consumer.conn.subscribe(dest, id="s", ack="client-individual", headers={"prefetch-count": "2"})
    first = [consumer.get(), consumer.get()]
    assert consumer.nothing(0.5)
    consumer.ack(first[0])
    third = consumer.get()
    assert third.body == "2"
    consumer.disconnect()
    producer.disconnect()


def test_nack_requeues_then_dead_letters_after_max_deliveries(gateway: Gateway) -> None:
    dest = unique("queue")
    producer = connect(gateway.stomp_port)
    producer.send(dest, "poison")
    consumer = connect(gateway.stomp_port)
    consumer.conn.subscribe(dest, id="s", ack="client-individual")
    for attempt in range(1, 6):
        m = consumer.get()
        assert m.body == "poison"
        assert m.headers.get("redelivered") == ("true" if attempt > 1 else "false")
        consumer.nack(m)
    assert consumer.nothing(0.7)  # the sixth delivery would exceed max-deliveries=5: dead-lettered instead
    dlq = connect(gateway.stomp_port)
    dlq.conn.subscribe(dest + ".DLQ", id="d", ack="auto")
    dead = dlq.get()
    assert dead.body == "poison"
    assert dead.headers["x-original-destination"] == dest
    assert dlq.nothing()
    for c in (consumer, dlq, producer):
        c.disconnect()


def test_nack_without_requeue_dead_letters_at_once(gateway: Gateway) -> None:
    dest = unique("queue")
    producer = connect(gateway.stomp_port)
    producer.send(dest, "bad")
    consumer = connect(gateway.stomp_port)
    consumer.conn.subscribe(dest, id="s", ack="client-individual")
    consumer.nack(consumer.get(), requeue="false")
    assert consumer.nothing(0.5)
    dlq = connect(gateway.stomp_port)
    dlq.conn.subscribe(dest + ".DLQ", id="d")
    assert dlq.get().body == "bad"
    for c in (consumer, dlq, producer):
        c.disconnect()


def test_expired_messages_are_never_delivered(gateway: Gateway) -> None:
    dest = unique("queue")
    producer = connect(gateway.stomp_port)
    producer.send(dest, "stale-relative", expiration="1")
    producer.send(dest, "stale-absolute", expires=str(int(time.time() * 1000) - 1000))
    producer.send(dest, "fresh", expiration="600000")
    time.sleep(0.05)
    consumer = connect(gateway.stomp_port)
    consumer.conn.subscribe(dest, id="s")
    assert consumer.get().body == "fresh"
    assert consumer.nothing()
    consumer.disconnect()
    producer.disconnect()


@pytest.mark.parametrize("version", ["1.1", "1.2"])
def test_transactions_commit_and_abort(gateway: Gateway, version: str) -> None:
    dest = unique("queue")
    consumer = connect(gateway.stomp_port, version)
    consumer.conn.subscribe(dest, id="s", ack="client-individual")
    producer = connect(gateway.stomp_port, version)
    tx = producer.conn.begin()
    producer.conn.send(destination=dest, body="in-tx-1", transaction=tx)
    producer.conn.send(destination=dest, body="in-tx-2", transaction=tx)
    assert consumer.nothing(0.5)  # nothing is visible before COMMIT
    rid = producer.receipt()
    producer.conn.commit(tx, headers={"receipt": rid})
    producer.wait_receipt(rid)
    got = [consumer.get(), consumer.get()]
    assert [m.body for m in got] == ["in-tx-1", "in-tx-2"]
    aborted = producer.conn.begin()
    producer.conn.send(destination=dest, body="never", transaction=aborted)
    producer.conn.abort(aborted)
    # ACK inside a transaction takes effect at COMMIT; ABORT discards it.
    ack_tx = consumer.conn.begin()
    consumer.ack(got[0], transaction=ack_tx)
    consumer.conn.abort(ack_tx)
    ack_tx2 = consumer.conn.begin()
    consumer.ack(got[0], transaction=ack_tx2)
    consumer.ack(got[1], transaction=ack_tx2)
    rid2 = consumer.receipt()
    consumer.conn.commit(ack_tx2, headers={"receipt": rid2})
    consumer.wait_receipt(rid2)
    assert consumer.nothing(0.5)
    consumer.disconnect()
    producer.disconnect()


def test_durable_topic_subscription_resumes(gateway: Gateway) -> None:
    dest = unique("topic")
    sub = connect(gateway.stomp_port, "1.2", **{"client-id": "durable-tester"})
    rid = sub.receipt()
    sub.conn.subscribe(dest, id="d1", ack="client-individual", headers={"durable": "true", "receipt": rid})
    sub.wait_receipt(rid)
    producer = connect(gateway.stomp_port)
    producer.send(dest, "before")
    m = sub.get()
    assert m.body == "before"
    sub.ack(m)
    time.sleep(0.2)  # the cursor is saved shortly after the ACK
    sub.disconnect()
    producer.send(dest, "while-away-1")
    producer.send(dest, "while-away-2")
    again = connect(gateway.stomp_port, "1.2", **{"client-id": "durable-tester"})
    again.conn.subscribe(dest, id="d1", ack="auto", headers={"durable": "true"})
    assert [again.get().body, again.get().body] == ["while-away-1", "while-away-2"]
    assert again.nothing()
    again.disconnect()
    producer.disconnect()


def test_heartbeats_keep_a_live_client_connected(gateway: Gateway) -> None:
    from tests.integration.stomppy_helpers import Client

    client = Client(gateway.stomp_port, "1.2", heartbeats=(500, 500)).connect()
    time.sleep(2.5)
    assert client.conn.is_connected()
    dest = unique("queue")
    client.conn.subscribe(dest, id="s")
    client.send(dest, "still here")
    assert client.get().body == "still here"
    client.disconnect()


@pytest.mark.parametrize(
    "selector",
    ["kind = 'order' AND amount > 10", '{"kind": "order", "amount": {"$gt": 10}}'],
    ids=["sql", "query-document"],
)
def test_selector_filters_what_a_subscription_receives(gateway: Gateway, selector: str) -> None:
    topic = unique("topic")
    queue = unique("queue")
    client = connect(gateway.stomp_port)
    for sub_id, dest in (("t", topic), ("q", queue)):
        rid = client.receipt()
        client.conn.subscribe(dest, id=sub_id, headers={"selector": selector, "receipt": rid})
        client.wait_receipt(rid)
    producer = connect(gateway.stomp_port)
    for dest in (topic, queue):
        producer.send(dest, "small", kind="order", amount="5")
        producer.send(dest, "other", kind="refund", amount="50")
        producer.send(dest, "big", kind="order", amount="50")
    got = [(m.headers["subscription"], m.body) for m in (client.get(), client.get())]
    assert sorted(got) == [("q", "big"), ("t", "big")]
    assert client.nothing()
    client.disconnect()
    producer.disconnect()


def test_bad_selector_is_an_error(gateway: Gateway) -> None:
    from tests.raw_stomp import RawClient

    raw = RawClient(gateway.stomp_port)
    try:
        raw.connect()
        raw.frame("SUBSCRIBE", {"id": "s", "destination": unique("queue"), "selector": "kind = = 'x'"})
        err = raw.read()
        assert err.command == "ERROR" and err.headers["message"] == "Invalid selector"
    finally:
        raw.close()
