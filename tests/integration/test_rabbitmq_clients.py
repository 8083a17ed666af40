"""Clients written for RabbitMQ's STOMP plugin work unchanged: what its public test suite (stomp.py over raw sockets)
expects beyond the STOMP spec, against a real gateway process."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.typing import Subprotocol

from tests.app.transports.ws_stomp import WsStomp
from tests.gateway_process import Gateway
from tests.integration.stomppy_helpers import Client, connect
from tests.raw_stomp import RawClient, RawFrame

Raw = Callable[[], RawClient]

FOUR_MIB = 4 * 1024 * 1024  # the default --max-frame-bytes


def unique(kind: str) -> str:
    return f"/{kind}/rmq{uuid.uuid4().hex[:12]}"


def subscribe(client: Client, destination: str, sub_id: str | None, **headers: str) -> None:
    """SUBSCRIBE and wait for its RECEIPT, so what is sent next reaches the subscription."""
    rid = client.receipt()
    headers["receipt"] = rid
    ack = headers.pop("ack", "auto")  # stomp.py writes its ``ack`` argument over an ``ack`` in the headers
    if sub_id is None:  # STOMP 1.0 without an id
        client.conn.subscribe(destination, ack=ack, headers=headers)
    else:
        client.conn.subscribe(destination, id=sub_id, ack=ack, headers=headers)
    client.wait_receipt(rid)


def read_until(client: RawClient, command: str) -> RawFrame:
    frame = client.read()
    assert frame.command == command, frame
    return frame


# ---- 1. a CONNECT whose body holds only EOLs ----


@pytest.mark.parametrize("body", [b"\n", b"\r\n", b"\n\n\r\n"])
def test_a_connect_whose_body_is_only_eols_is_accepted(raw: Raw, body: bytes) -> None:
    client = raw()
    client.send(b"CONNECT\naccept-version:1.2\nhost:/\n\n" + body + b"\x00")
    assert client.read().command == "CONNECTED"
    dest = unique("queue")
    client.frame("SEND", {"destination": dest, "receipt": "r"}, b"works")
    assert read_until(client, "RECEIPT").headers["receipt-id"] == "r"


@pytest.mark.parametrize("body", [b"x", b"\n \n", b"\r", b"\r\r\n"])
def test_a_connect_with_any_other_body_is_still_refused(raw: Raw, body: bytes) -> None:
    client = raw()
    client.send(b"CONNECT\naccept-version:1.2\nhost:/\n\n" + body + b"\x00")
    error = read_until(client, "ERROR")
    assert error.headers["message"] == "Bad CONNECT"
    assert client.closed_by_peer()


# ---- 2. redelivered on every MESSAGE ----


def test_every_message_says_whether_it_is_redelivered(gateway: Gateway) -> None:
    queue, topic = unique("queue"), unique("topic")
    client = connect(gateway.stomp_port, "1.2")
    subscribe(client, queue, "q", ack="client-individual")
    subscribe(client, topic, "t")
    client.send(queue, "to the queue")
    first = client.get()
    assert first.headers.get("redelivered") == "false", first.headers
    client.nack(first)
    again = client.get()
    assert again.body == "to the queue" and again.headers.get("redelivered") == "true", again.headers
    client.ack(again)
    client.send(topic, "to the topic")
    live = client.get()
    assert live.body == "to the topic" and live.headers.get("redelivered") == "false", live.headers
    client.disconnect()


# ---- 3. NACK on STOMP 1.0 ----


def test_a_stomp_10_client_may_nack_by_message_id(gateway: Gateway) -> None:
    dest = unique("queue")
    client = connect(gateway.stomp_port, "1.0")
    subscribe(client, dest, None, ack="client")
    client.send(dest, "try again")
    first = client.get()
    rid = client.receipt()
    client.conn.send_frame("NACK", {"message-id": first.headers["message-id"], "receipt": rid})
    client.wait_receipt(rid)
    again = client.get()
    assert again.body == "try again" and again.headers.get("redelivered") == "true"
    client.ack(again)
    assert not client.errors
    client.disconnect()


# ---- 4. an ACK naming another subscription of the same connection ----


def test_a_stomp_11_ack_naming_another_subscription_settles_the_message(gateway: Gateway) -> None:
    one, two = unique("queue"), unique("queue")
    client = connect(gateway.stomp_port, "1.1")
    subscribe(client, one, "s1", ack="client-individual")
    subscribe(client, two, "s2", ack="client-individual")
    client.send(one, "for s1")
    message = client.get()
    assert message.headers["subscription"] == "s1"
    rid = client.receipt()
    client.conn.ack(message.headers["message-id"], "s2", receipt=rid)  # names the other subscription
    client.wait_receipt(rid)
    assert not client.errors
    client.disconnect()
    # The ACK counted: the message is gone, not back in the queue.
    other = connect(gateway.stomp_port, "1.1")
    subscribe(other, one, "s", ack="auto")
    assert other.nothing()
    other.disconnect()


def test_an_ack_never_reaches_another_connections_message(raw: Raw) -> None:
    dest = unique("queue")
    owner, stranger = raw(), raw()
    owner.connect("1.1")
    stranger.connect("1.1")
    owner.frame("SUBSCRIBE", {"id": "s", "destination": dest, "ack": "client-individual"})
    owner.frame("SEND", {"destination": dest}, b"mine")
    message = read_until(owner, "MESSAGE")
    stranger.frame("SUBSCRIBE", {"id": "s", "destination": unique("queue"), "ack": "client", "receipt": "sub"})
    assert read_until(stranger, "RECEIPT").headers["receipt-id"] == "sub"
    stranger.frame("ACK", {"message-id": message.headers["message-id"], "subscription": "s", "receipt": "a"})
    error = read_until(stranger, "ERROR")
    assert error.headers["message"] == "Invalid ack"
    owner.frame("ACK", {"message-id": message.headers["message-id"], "subscription": "s", "receipt": "mine"})
    assert read_until(owner, "RECEIPT").headers["receipt-id"] == "mine"


# ---- 5. prefetch-count on topic subscriptions ----


@pytest.mark.parametrize("ack", ["client", "client-individual"])
def test_prefetch_count_bounds_unacknowledged_topic_messages(gateway: Gateway, ack: str) -> None:
    topic = unique("topic")
    consumer = connect(gateway.stomp_port, "1.2")
    subscribe(consumer, topic, "t", ack=ack, **{"prefetch-count": "2"})
    producer = connect(gateway.stomp_port, "1.2")
    for i in range(5):
        producer.send(topic, f"m{i}")
    got = [consumer.get(), consumer.get()]
    assert [m.body for m in got] == ["m0", "m1"]
    assert consumer.nothing(0.5)  # two unacknowledged: the rest waits
    consumer.ack(got[0])
    third = consumer.get()
    assert third.body == "m2"
    assert consumer.nothing(0.3)
    consumer.ack(third)  # in client mode this covers m1 too: room for two more
    rest = [consumer.get().body for _ in range(2 if ack == "client" else 1)]
    assert rest == (["m3", "m4"] if ack == "client" else ["m3"])
    consumer.disconnect()
    producer.disconnect()


# ---- 6. STOMP 1.0 UNSUBSCRIBE by destination ----


@pytest.mark.parametrize("sub_id", [None, "given"])
def test_a_stomp_10_unsubscribe_by_destination_ends_the_subscription(gateway: Gateway, sub_id: str | None) -> None:
    dest = unique("queue")
    client = connect(gateway.stomp_port, "1.0")
    subscribe(client, dest, sub_id, ack="auto")
    client.send(dest, "before")
    assert client.get().body == "before"
    rid = client.receipt()
    client.conn.unsubscribe(destination=dest, headers={"receipt": rid})
    client.wait_receipt(rid)
    assert not client.errors
    client.send(dest, "after")
    assert client.nothing()
    client.disconnect()
    other = connect(gateway.stomp_port, "1.0")
    subscribe(other, dest, None, ack="auto")
    assert other.get().body == "after"  # still in the queue: nobody took it
    other.disconnect()


# ---- 7. requeue:False ----


@pytest.mark.parametrize("requeue", ["False", "FALSE", "false"])
def test_nack_requeue_false_is_read_in_any_case(gateway: Gateway, requeue: str) -> None:
    dest = unique("queue")
    client = connect(gateway.stomp_port, "1.2")
    subscribe(client, dest, "s", ack="client-individual")
    client.send(dest, "poison")
    client.nack(client.get(), requeue=requeue)
    assert client.nothing()  # not requeued
    dlq = connect(gateway.stomp_port, "1.2")
    subscribe(dlq, dest + ".DLQ", "d")
    assert dlq.get().body == "poison"
    for c in (client, dlq):
        c.disconnect()


# ---- 8. durable topic subscriptions, RabbitMQ's way ----


def durable_client(raw: Raw, client_id: str) -> RawClient:
    client = raw()
    client.connect("1.2", **{"client-id": client_id})
    return client


def publish(raw: Raw, topic: str, *bodies: str) -> None:
    producer = raw()
    producer.connect()
    for i, body in enumerate(bodies):
        producer.frame("SEND", {"destination": topic, "receipt": f"p{i}"}, body.encode())
        assert read_until(producer, "RECEIPT").headers["receipt-id"] == f"p{i}"
    producer.close()


@pytest.mark.parametrize("flag", ["durable", "persistent"])
@pytest.mark.parametrize("leave", ["UNSUBSCRIBE", "DISCONNECT"])
def test_a_durable_subscription_keeps_its_backlog_across_a_plain_unsubscribe_or_disconnect(
    raw: Raw, flag: str, leave: str
) -> None:
    topic, client_id = unique("topic"), f"c{uuid.uuid4().hex[:8]}"
    sub = {"id": "d", "destination": topic, flag: "true", "ack": "client-individual"}
    client = durable_client(raw, client_id)
    client.frame("SUBSCRIBE", {**sub, "receipt": "s"})
    assert read_until(client, "RECEIPT").headers["receipt-id"] == "s"
    client.frame(leave, {"id": "d", "receipt": "gone"} if leave == "UNSUBSCRIBE" else {"receipt": "gone"})
    assert read_until(client, "RECEIPT").headers["receipt-id"] == "gone"
    client.close()
    publish(raw, topic, "b1", "b2")
    again = durable_client(raw, client_id)
    again.frame("SUBSCRIBE", {**sub, "receipt": "again"})
    # the RECEIPT comes first, then the backlog in order
    assert read_until(again, "RECEIPT").headers["receipt-id"] == "again"
    assert [read_until(again, "MESSAGE").body for _ in range(2)] == [b"b1", b"b2"]


@pytest.mark.parametrize("flag", ["durable", "persistent"])
def test_an_unsubscribe_saying_durable_deletes_the_subscription(raw: Raw, flag: str) -> None:
    topic, client_id = unique("topic"), f"c{uuid.uuid4().hex[:8]}"
    sub = {"id": "d", "destination": topic, flag: "true", "ack": "client-individual"}
    client = durable_client(raw, client_id)
    client.frame("SUBSCRIBE", {**sub, "receipt": "s"})
    assert read_until(client, "RECEIPT").headers["receipt-id"] == "s"
    client.frame("DISCONNECT", {"receipt": "bye"})
    assert read_until(client, "RECEIPT").headers["receipt-id"] == "bye"
    client.close()
    publish(raw, topic, "old1", "old2")  # a backlog, delivered below but never acknowledged
    again = durable_client(raw, client_id)
    again.frame("SUBSCRIBE", {**sub, "receipt": "s2"})
    assert read_until(again, "RECEIPT").headers["receipt-id"] == "s2"
    assert [read_until(again, "MESSAGE").body for _ in range(2)] == [b"old1", b"old2"]
    again.frame("UNSUBSCRIBE", {"id": "d", flag: "true", "receipt": "deleted"})
    assert read_until(again, "RECEIPT").headers["receipt-id"] == "deleted"
    # A new durable subscription with that id starts fresh: the unacknowledged backlog is not replayed.
    again.frame("SUBSCRIBE", {**sub, "receipt": "fresh"})
    assert read_until(again, "RECEIPT").headers["receipt-id"] == "fresh"
    publish(raw, topic, "new")
    first = read_until(again, "MESSAGE")
    assert first.body == b"new", first


# ---- 9. a body of exactly max_frame_bytes ----


def test_a_four_mib_body_round_trips(gateway: Gateway) -> None:
    queue, topic = unique("queue"), unique("topic")
    body = "x" * FOUR_MIB
    client = connect(gateway.stomp_port, "1.2")
    subscribe(client, topic, "t")
    client.send(queue, body, **{"content-type": "text/plain"})
    client.send(topic, body)
    live = client.get(timeout=20)
    assert len(live.body) == FOUR_MIB
    subscribe(client, queue, "q")
    stored = client.get(timeout=20)
    assert len(stored.body) == FOUR_MIB and stored.body == body
    assert not client.errors
    client.disconnect()


def test_a_body_over_max_frame_bytes_is_still_refused(raw: Raw) -> None:
    client = raw()
    client.connect()
    client.send(f"SEND\ndestination:{unique('queue')}\nreceipt:big\n\n".encode() + b"x" * (FOUR_MIB + 1) + b"\x00")
    error = read_until(client, "ERROR")
    assert error.headers["message"] == f"Frame too large\\c limit max_frame_bytes={FOUR_MIB}"  # escaped ':' (1.2)
    assert error.headers["receipt-id"] == "big"


def test_a_four_mib_body_round_trips_over_websocket(gateway: Gateway) -> None:
    async def run() -> None:
        url = f"ws://127.0.0.1:{gateway.http_port}/stomp"
        ws = WsStomp(await ws_connect(url, subprotocols=[Subprotocol("v12.stomp")], max_size=None, open_timeout=5))
        try:
            await ws.connect()
            dest = unique("queue")
            await ws.frame("SUBSCRIBE", {"id": "s", "destination": dest})
            await ws.frame("SEND", {"destination": dest, "receipt": "r"}, b"y" * FOUR_MIB)
            frames = [await ws.read(timeout=20), await ws.read(timeout=20)]
            assert sorted(f.command for f in frames) == ["MESSAGE", "RECEIPT"], [f.headers for f in frames]
            message = next(f for f in frames if f.command == "MESSAGE")
            assert len(message.body) == FOUR_MIB
        finally:
            await ws.close()

    asyncio.run(run())
